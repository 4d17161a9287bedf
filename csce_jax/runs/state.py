"""The training state: made from a model and an optimiser, concrete or abstract (a restore target).

The state is the pytree ``{"params", "rest", "opt", "step"}``: ``rest`` holds every
non-parameter variable (BatchNorm statistics and the hash centres). Abstract states come from a
model built under ``nnx.eval_shape`` (:func:`csce_jax.runs.builders.run_parts` with
``abstract=True``), so restoring allocates nothing twice and evaluation never builds an optimiser.
Nothing here reads a config.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from csce_jax.convert.pretrained import initialize_from
from csce_jax.errors import CheckpointError
from csce_jax.hashing import centers_fingerprint
from csce_jax.runs.checkpoints import abstract_on


@dataclasses.dataclass
class TrainSetup:
    """The model's structure (train and eval mode), its state, and the optimiser."""

    graphdef: Any
    eval_graphdef: Any
    state: dict[str, Any]
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    fingerprint: str


def model_of(setup: TrainSetup) -> nnx.Module:
    """The model (training mode) holding ``setup.state``'s parameters and statistics."""
    return nnx.merge(setup.graphdef, setup.state["params"], setup.state["rest"])


def split_model(model: nnx.Module) -> tuple[Any, Any, Any, Any]:
    """(training graphdef, evaluation graphdef, parameters, the other variables)."""
    eval_graphdef = nnx.graphdef(nnx.view(model, use_running_average=True))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, eval_graphdef, params, rest


def create_train_state(
    model: nnx.Module, tx: optax.GradientTransformation, schedule: optax.Schedule
) -> TrainSetup:
    """The initial state of ``model`` (a concrete one) under ``tx``, at step 0."""
    graphdef, eval_graphdef, params, rest = split_model(model)
    state = {
        "params": params,
        "rest": rest,
        "opt": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
    }
    fingerprint = centers_fingerprint(np.asarray(model.centers[...]))
    return TrainSetup(graphdef, eval_graphdef, state, tx, schedule, fingerprint)


def abstract_train_state(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    fingerprint: str,
    sharding: jax.sharding.Sharding,
) -> TrainSetup:
    """Like :func:`create_train_state` for an abstract ``model``: every array a
    ``ShapeDtypeStruct`` on ``sharding``; ``fingerprint``: its centres' (they are not there)."""
    graphdef, eval_graphdef, params, rest = split_model(model)
    state = {
        "params": params,
        "rest": rest,
        "opt": jax.eval_shape(tx.init, params),
        "step": jax.ShapeDtypeStruct((), jnp.int32),
    }
    return TrainSetup(
        graphdef, eval_graphdef, abstract_on(state, sharding), tx, schedule, fingerprint
    )


def check_centers(meta: dict[str, Any], fingerprint: str, where: Path) -> None:
    """A checkpoint must carry the hash centres this config gives (bits, classes, seed)."""
    if meta.get("centers") != fingerprint:
        raise CheckpointError(
            f"checkpoint {where} was made with other hash centres than this config gives "
            "(bits, classes or centers_seed)"
        )


def weights_from_file(model: nnx.Module, path: str) -> tuple[Any, dict[str, Any]]:
    """(eval graphdef, {"params", "rest"}) of ``model`` with a weights file (converted or
    PyTorch) loaded whole."""
    initialize_from(model, path, scope="model")
    _, eval_graphdef, params, rest = split_model(model)
    return eval_graphdef, {"params": params, "rest": rest}
