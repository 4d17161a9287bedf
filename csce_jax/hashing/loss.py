"""The CSCE-Net loss (the release's "OrthoHashLoss"): margin cross-entropy plus quantisation.

Pure functions of arrays, computed in float32 (float64 for float64 inputs, :mod:`csce_jax.models.dtypes`). The
per-sample elastic margin is drawn from a JAX key by :func:`elastic_margins`, so a step is
reproducible from (seed, step).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from csce_jax.hashing.dsf import Estimator, dynamic_sign, squash
from csce_jax.models.dtypes import widened

ARC_CLIP = 0.99999


def elastic_margins(key: jax.Array, batch: int, mean: float, std: float = 0.125) -> jax.Array:
    """Per-sample margins m_i ~ Normal(mean, std), shape (batch,)."""
    return mean + std * jax.random.normal(key, (batch,), jnp.float32)


def margin_logits(
    logits: jax.Array,
    targets: jax.Array,
    margins: jax.Array | float,
    *,
    margin_type: Literal["arc", "cos"] = "arc",
    scale: float = 10.0,
    clip_all_logits: bool = False,
) -> jax.Array:
    """Scaled logits with the margin applied where ``targets`` is 1.

    ``targets`` is a one-hot or multi-hot (B, C) mask; ``margins`` a scalar or per-sample (B,).
    Arc: cos(arccos(clip(l)) + m); cos: l - m. With ``clip_all_logits`` every logit (not only the
    targets') goes through the clip/arccos/cos round trip, as in the release.
    """
    logits = widened(logits)
    targets = targets.astype(logits.dtype)
    m = jnp.broadcast_to(jnp.asarray(margins, logits.dtype), logits.shape[:1])[:, None] * targets
    if margin_type == "cos":
        out = logits - m
    elif margin_type == "arc":
        arc = jnp.arccos(jnp.clip(logits, -ARC_CLIP, ARC_CLIP))
        if clip_all_logits:
            out = jnp.cos(arc + m)
        else:
            out = jnp.where(targets > 0, jnp.cos(arc + m), logits)
    else:
        raise ValueError(f"margin_type must be 'arc' or 'cos', got {margin_type!r}")
    return scale * out


def single_label_ce(scaled_logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy for class-index labels (B,)."""
    logp = jax.nn.log_softmax(scaled_logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1))


def multi_label_ce(
    scaled_logits: jax.Array,
    targets: jax.Array,
    kind: Literal["label_smoothing", "bce"] = "label_smoothing",
) -> jax.Array:
    """Multi-label loss: softmax CE against targets / (number of positives), or mean BCE."""
    targets = targets.astype(scaled_logits.dtype)
    if kind == "label_smoothing":
        logp = jax.nn.log_softmax(scaled_logits, axis=-1)
        dist = targets / jnp.maximum(jnp.sum(targets, axis=-1, keepdims=True), 1.0)
        return -jnp.mean(jnp.sum(dist * logp, axis=-1))
    if kind == "bce":
        x = scaled_logits
        per = jnp.maximum(x, 0) - x * targets + jnp.log1p(jnp.exp(-jnp.abs(x)))
        return jnp.mean(per)
    raise ValueError(f"multi-label loss must be 'label_smoothing' or 'bce', got {kind!r}")


def quantization_loss(
    v: jax.Array,
    t: jax.Array,
    *,
    kind: Literal["cs", "l1", "l2"] = "cs",
    estimator: Estimator = "ste",
    balance: float | None = None,
    temperature: float = 0.1,
) -> jax.Array:
    """Distance between u = 2*hardtanh(v) and its DSF code b = DSF(u, t).

    With ``estimator="release"`` b carries no gradient (the release); with ``"ste"`` the loss
    reaches t (and v through b) via the DSF's surrogate gradient.
    """
    u = squash(widened(v))
    b = dynamic_sign(u, t.astype(u.dtype), estimator, balance=balance, temperature=temperature)
    if kind == "cs":
        dot = jnp.sum(u * b, axis=-1)
        nu = jnp.maximum(jnp.linalg.norm(u, axis=-1), 1e-8)
        nb = jnp.maximum(jnp.linalg.norm(b, axis=-1), 1e-8)
        return jnp.mean(1.0 - dot / (nu * nb))
    if kind == "l1":
        return jnp.mean(jnp.abs(u - b))
    if kind == "l2":
        return jnp.mean(jnp.square(u - b))
    raise ValueError(f"quantisation kind must be 'cs', 'l1' or 'l2', got {kind!r}")


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """How :func:`csce_loss` computes (built from a config by ``builders.loss_options``).

    ``multilabel``: multi-hot labels and a fixed margin; ``margin_type``: ArcFace ("arc") or
    CosFace ("cos") margins at ``scale``; ``ce_weight``/``quan_weight``: the two terms'
    weights; ``quan_type``: the quantisation loss ("cs", "l1", "l2"); ``multilabel_loss``:
    "label_smoothing" (the release's) or "bce"; ``estimator``, ``balance``, ``temperature``:
    the DSF's gradient estimator, fill rule and soft-sign temperature; ``clip_all_logits``: the
    release's clipping of every logit, not only the targets'.
    """

    multilabel: bool = False
    margin_type: Literal["arc", "cos"] = "arc"
    scale: float = 10.0
    ce_weight: float = 1.0
    quan_weight: float = 1.0
    quan_type: Literal["cs", "l1", "l2"] = "cs"
    multilabel_loss: Literal["label_smoothing", "bce"] = "label_smoothing"
    estimator: Estimator = "ste"
    clip_all_logits: bool = False
    balance: float | None = None
    temperature: float = 0.1


def csce_loss(
    logits: jax.Array,
    v: jax.Array,
    t: jax.Array,
    labels: jax.Array,
    margins: jax.Array | float,
    options: LossOptions | None = None,
) -> dict[str, jax.Array]:
    """Total = ce_weight * CE + quan_weight * quantisation; returns {"loss", "ce", "quant"}.

    Single-label: ``labels`` are class indices (B,) and ``margins`` per-sample elastic margins
    (see :func:`elastic_margins`). Multi-label: ``labels`` are multi-hot (B, C) and ``margins``
    the fixed margin m, applied to every positive. ``options``: the loss's settings
    (:class:`LossOptions`; its defaults when None).
    """
    o = options or LossOptions()
    num_classes = logits.shape[-1]
    if o.multilabel:
        targets = labels.astype(jnp.float32)
    else:
        targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    z = margin_logits(
        logits,
        targets,
        margins,
        margin_type=o.margin_type,
        scale=o.scale,
        clip_all_logits=o.clip_all_logits,
    )
    ce = (
        multi_label_ce(z, targets, o.multilabel_loss)
        if o.multilabel
        else single_label_ce(z, labels)
    )
    if o.quan_weight:
        quant = quantization_loss(
            v,
            t,
            kind=o.quan_type,
            estimator=o.estimator,
            balance=o.balance,
            temperature=o.temperature,
        )
    else:
        quant = jnp.zeros((), jnp.float32)
    return {"loss": o.ce_weight * ce + o.quan_weight * quant, "ce": ce, "quant": quant}
