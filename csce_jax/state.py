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

from csce_jax import builders, sharding
from csce_jax.checkpointing import Checkpoints, abstract_on
from csce_jax.errors import CheckpointError
from csce_jax.hashing import centers_fingerprint, hash_centers
from csce_jax.pretrained import initialize_from


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
    config: ml_collections.ConfigDict, num_classes: int, sharding: jax.sharding.Sharding
) -> TrainSetup:
    """Like :func:`create_train_state` but every array is a ``ShapeDtypeStruct`` on ``sharding``."""
    model = nnx.eval_shape(lambda: builders.create_model(config, num_classes))
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


def run_num_classes(workdir: str | Path) -> int:
    """The class count a run was trained with, from its newest checkpoint's record."""
    ckpts = Checkpoints(workdir, read_only=True)
    try:
        steps = ckpts.steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {ckpts.directory}")
        return int(ckpts.read_meta(steps[-1])["num_classes"])
    finally:
        ckpts.manager.close()


def restore_weights(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    num_classes: int,
    step: int | None = None,
    *,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[Any, dict[str, Any], int]:
    """(eval graphdef, {"params", "rest"}, step) of a run's best checkpoint, or of ``step``.

    The run folder is opened read-only. Without a recorded best, or when the best does not
    restore (damaged files), the newest checkpoint that does is used, and the log says so;
    an explicit ``step`` that does not restore is an error.
    """
    model = nnx.eval_shape(lambda: builders.create_model(config, num_classes))
    _, eval_graphdef, params, rest = _split(model)
    mesh = mesh if mesh is not None else sharding.make_mesh()
    target = abstract_on({"params": params, "rest": rest}, sharding.replicated(mesh))
    ckpts = Checkpoints(workdir, read_only=True)
    try:
        got_step = step if step is not None else ckpts.best_step()
        if got_step is None:
            steps = ckpts.steps()
            if not steps:
                raise CheckpointError(f"no checkpoint in {ckpts.directory}")
            got_step = steps[-1]
        got_step, weights, meta = ckpts.restore_weights(target, got_step, fallback=step is None)
    finally:
        ckpts.manager.close()
    expected = config_fingerprint(config, num_classes)
    if meta.get("centers") != expected:
        raise CheckpointError(
            f"checkpoint {ckpts.directory / str(got_step)} was made with other hash centres "
            "than this config gives (bits, classes or centers_seed)"
        )
    return eval_graphdef, weights, got_step


def weights_from_file(
    config: ml_collections.ConfigDict, num_classes: int, path: str
) -> tuple[Any, dict[str, Any]]:
    """(eval graphdef, {"params", "rest"}) of a weights file (converted or PyTorch), whole."""
    model = builders.create_model(config, num_classes)
    initialize_from(model, path, scope="model")
    _, eval_graphdef, params, rest = _split(model)
    return eval_graphdef, {"params": params, "rest": rest}
