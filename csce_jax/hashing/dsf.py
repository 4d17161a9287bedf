"""The dynamic sign function (DSF): sign with a per-image dead band filled by a balance value.

Forward (both estimators), per image with code v (K values) and threshold t:
  fill = -1 if more than ``balance`` entries of v are > 0 (default balance K/2), else +1;
  every entry with -t < v_k < t, and every exact zero, becomes ``fill``; the rest become sign(v_k).
The release returns 0 for an exact zero when t <= 0; we return ``fill`` so a code is always in
{-1, +1} (a measure-zero difference that never occurs on real-valued codes).

Backward:
- ``"release"``: no gradient at all, to v or t (the release detaches both).
- ``"ste"``: a straight-through surrogate. The hard forward is kept; gradients are those of the
  soft relaxation  s(v, t) = sign(v) + (1 - m) * (fill - sign(v)),  m = sigmoid((|v| - t) / tau),
  where m is a soft "outside the band" indicator and sign(v), fill are constants. Then
  ds/dt = m (1 - m) / tau * (fill - sign(v))   and   ds/dv = -sign(v) m (1 - m) / tau * (fill - sign(v)),
  both finite, and non-zero for entries whose sign differs from the fill value and that lie within
  a few tau of the band edge: moving t or v there is what would flip such a bit.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

Estimator = Literal["ste", "release"]


def balance_fill(v: jax.Array, balance: float | None = None) -> jax.Array:
    """Per-row fill value (..., 1): -1 where more than ``balance`` (default K/2) entries are > 0."""
    bits = v.shape[-1]
    limit = bits / 2 if balance is None else balance
    positives = jnp.sum(v > 0, axis=-1, keepdims=True)
    return jnp.where(positives > limit, -1.0, 1.0).astype(v.dtype)


def _hard_dsf(v: jax.Array, t: jax.Array, fill: jax.Array) -> jax.Array:
    in_band = ((v < t) & (v > -t)) | (v == 0)
    return jnp.where(in_band, fill, jnp.sign(v)).astype(v.dtype)


def dynamic_sign(
    v: jax.Array,
    t: jax.Array,
    estimator: Estimator = "ste",
    *,
    balance: float | None = None,
    temperature: float = 0.1,
) -> jax.Array:
    """Binary codes in {-1, +1} from continuous codes ``v`` (..., K) and thresholds ``t`` (..., 1).

    ``balance`` is the positive-count above which the fill is -1 (default K/2; the release
    hard-codes 32). ``temperature`` is the surrogate's tau (``"ste"`` only). See the module
    docstring for the exact forward and the surrogate gradient.
    """
    v = jnp.asarray(v)
    t = jnp.broadcast_to(jnp.asarray(t, v.dtype), (*v.shape[:-1], 1))
    fill = jax.lax.stop_gradient(balance_fill(v, balance))
    if estimator == "release":
        return jax.lax.stop_gradient(_hard_dsf(v, t, fill))
    if estimator != "ste":
        raise ValueError(f"estimator must be 'ste' or 'release', got {estimator!r}")
    hard = jax.lax.stop_gradient(_hard_dsf(v, t, fill))
    sign = jax.lax.stop_gradient(jnp.where(v >= 0, 1.0, -1.0).astype(v.dtype))
    outside = jax.nn.sigmoid((jnp.abs(v) - t) / temperature)
    soft = sign + (1.0 - outside) * (fill - sign)
    return soft + jax.lax.stop_gradient(hard - soft)


def squash(v: jax.Array) -> jax.Array:
    """u = 2 * hardtanh(v, -0.5, 0.5), in [-1, 1]: what the quantisation loss and the DSF see."""
    return 2.0 * jnp.clip(v, -0.5, 0.5)


def binarize(
    v: jax.Array,
    t: jax.Array,
    *,
    raw_eval_band: bool = False,
    balance: float | None = None,
) -> jax.Array:
    """Binary codes for retrieval: the DSF applied to ``squash(v)``, as in training.

    The release applies the band to raw v at evaluation but to squash(v) in training, so its
    evaluation band is twice as wide (docs/model.md, defect 4); ``raw_eval_band=True`` reproduces that.
    """
    x = v if raw_eval_band else squash(v)
    return dynamic_sign(x, t, "release", balance=balance)
