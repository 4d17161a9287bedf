"""The floating-point width of statistics, norms and losses.

Every reduction the model and the loss take (batch statistics, norms, cosines, the loss itself)
runs in float32 whatever the compute dtype, so bfloat16 activations never set their precision.
A float64 input (under ``jax.enable_x64``) stays float64 all the way: the porting checks run
the whole step at float64 on both sides, where float32 rounding would flip ReLU masks at
pre-activations within ~1e-5 of zero and move gradients by more than any port error.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def wide_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """float32, or float64 where ``dtype`` already is float64."""
    return jnp.promote_types(dtype, jnp.float32)


def widened(x: jax.Array) -> jax.Array:
    """``x`` cast to :func:`wide_dtype` of its own dtype (float32 for bfloat16 and float32)."""
    return x.astype(wide_dtype(x.dtype))
