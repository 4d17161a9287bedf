"""The training step: one pure, jitted function of (state, batch) and the loss it differentiates.

The step reads no config: :class:`~csce_jax.runs.parts.StepOptions` (built from a config by
:func:`csce_jax.runs.builders.run_parts`) carries what it needs, so that a compiled step depends on these
values only and the same step serves training, ``csce-plan`` and the PyTorch comparison. Its
randomness (the elastic margins) comes from ``fold_in(key(seed), step)``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from csce_jax.hashing.loss import LossOptions, csce_loss, elastic_margins
from csce_jax.models.csce import CSCEOutput
from csce_jax.runs.parts import StepOptions
from csce_jax.runtime import sharding


def fold_key(seed: int, step: jax.Array) -> jax.Array:
    """The per-step random key: a pure function of (seed, step), so resume is exact."""
    return jax.random.fold_in(jax.random.key(seed), step)


def forward_loss(
    params: Any,
    graphdef: Any,
    rest: Any,
    images: jax.Array,
    labels: jax.Array,
    margins: jax.Array,
    loss: LossOptions,
) -> tuple[jax.Array, tuple[dict[str, jax.Array], CSCEOutput, Any]]:
    """The training loss of one batch, differentiable in ``params``: (loss, (loss terms, the
    forward's outputs, the BatchNorm statistics it updated)). The training step and the
    gradient comparison with PyTorch (``csce_jax.bridge.gradients``) both go through it."""
    model = nnx.merge(graphdef, params, rest, copy=True)
    out = model(images)
    losses = csce_loss(out.logits, out.codes, out.threshold, labels, margins, loss)
    _, _, new_rest = nnx.split(model, nnx.Param, ...)
    return losses["loss"], (losses, out, new_rest)


def make_train_step(
    graphdef: Any, tx: Any, schedule: Any, options: StepOptions, mesh: jax.sharding.Mesh
) -> Any:
    """The jitted, donated training step: (state, batch) -> (state, metrics). ``batch`` holds
    "image" and "label" and, from the training loader, "flip" (the images to mirror first)."""
    o = options

    def step_fn(state, batch):
        step = state["step"]
        labels = batch["label"]
        if o.loss.multilabel:
            margins = jnp.asarray(o.margin, jnp.float32)
        else:
            margins = elastic_margins(
                fold_key(o.seed, step), labels.shape[0], o.margin, o.margin_std
            )

        images = batch["image"]
        if "flip" in batch:  # the release's random flip, on the devices (crops come unflipped)
            images = jnp.where(batch["flip"][:, None, None, None], images[:, :, ::-1], images)

        def loss_fn(params):
            return forward_loss(params, graphdef, state["rest"], images, labels, margins, o.loss)

        if o.remat:
            loss_fn = jax.checkpoint(loss_fn)
        grads, (losses, _, new_rest) = jax.grad(loss_fn, has_aux=True)(state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = {"params": params, "rest": new_rest, "opt": opt, "step": step + 1}
        out = {
            "loss": losses["loss"],
            "ce": losses["ce"],
            "quant": losses["quant"],
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(params),
            "lr": schedule(step),
        }
        return new_state, out

    repl = sharding.replicated(mesh)
    return jax.jit(
        step_fn,
        in_shardings=(repl, sharding.data_sharded(mesh)),
        out_shardings=(repl, repl),
        donate_argnums=(0,),
    )
