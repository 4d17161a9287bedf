"""The training state: creating it, and restoring it (or just the weights) into abstract targets.

The state is the pytree ``{"params", "rest", "opt", "step"}``: ``rest`` holds every
non-parameter variable (BatchNorm statistics and the hash centres). Restore targets are built
with ``nnx.eval_shape``, so restoring allocates nothing twice and evaluation never builds an
optimiser.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from csce_jax import builders
from csce_jax.checkpointing import abstract_on
from csce_jax.convert.pretrained import initialize_from
from csce_jax.errors import CheckpointError
from csce_jax.hashing import centers_fingerprint, hash_centers


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


def config_fingerprint(config: ml_collections.ConfigDict, num_classes: int) -> str:
    """The fingerprint of the hash centres this config gives for ``num_classes`` classes."""
    return centers_fingerprint(hash_centers(num_classes, config.bits, seed=config.centers_seed))


def _split(model: nnx.Module) -> tuple[Any, Any, Any, Any]:
    eval_graphdef = nnx.graphdef(nnx.view(model, use_running_average=True))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, eval_graphdef, params, rest


def create_train_state(
    config: ml_collections.ConfigDict, num_classes: int, init_from: str = ""
) -> TrainSetup:
    """Model, optimiser and the initial state (optionally loaded from ``init_from``)."""
    model = builders.create_model(config, num_classes)
    if init_from:
        initialize_from(model, init_from, scope=config.model.init_scope)
    graphdef, eval_graphdef, params, rest = _split(model)
    tx, schedule = builders.create_optimizer(config)
    state = {
        "params": params,
        "rest": rest,
        "opt": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
    }
    fingerprint = centers_fingerprint(np.asarray(model.centers[...]))
    return TrainSetup(graphdef, eval_graphdef, state, tx, schedule, fingerprint)


def abstract_train_state(
    config: ml_collections.ConfigDict,
    num_classes: int,
    sharding: jax.sharding.Sharding,
    *,
    platform: str | None = None,
) -> TrainSetup:
    """Like :func:`create_train_state` but every array is a ``ShapeDtypeStruct`` on ``sharding``.

    ``platform`` (where the step will run, see :func:`csce_jax.builders.create_model`)
    defaults to that of ``sharding``'s devices: a state laid on a TPU slice described on a CPU
    host (to compile ahead of time) gets the TPU's layers.
    """
    platform = platform or next(iter(sharding.device_set)).platform
    model = nnx.eval_shape(lambda: builders.create_model(config, num_classes, platform=platform))
    graphdef, eval_graphdef, params, rest = _split(model)
    tx, schedule = builders.create_optimizer(config)
    state = {
        "params": params,
        "rest": rest,
        "opt": jax.eval_shape(tx.init, params),
        "step": jax.ShapeDtypeStruct((), jnp.int32),
    }
    return TrainSetup(
        graphdef,
        eval_graphdef,
        abstract_on(state, sharding),
        tx,
        schedule,
        config_fingerprint(config, num_classes),
    )


def check_centers(meta: dict[str, Any], fingerprint: str, where: Path) -> None:
    """A checkpoint must carry the hash centres this config gives (bits, classes, seed)."""
    if meta.get("centers") != fingerprint:
        raise CheckpointError(
            f"checkpoint {where} was made with other hash centres than this config gives "
            "(bits, classes or centers_seed)"
        )


def weights_from_file(
    config: ml_collections.ConfigDict, num_classes: int, path: str
) -> tuple[Any, dict[str, Any]]:
    """(eval graphdef, {"params", "rest"}) of a weights file (converted or PyTorch), whole."""
    model = builders.create_model(config, num_classes)
    initialize_from(model, path, scope="model")
    _, eval_graphdef, params, rest = _split(model)
    return eval_graphdef, {"params": params, "rest": rest}
