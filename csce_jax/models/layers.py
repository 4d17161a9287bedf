"""Layers with PyTorch semantics: BatchNorm statistics and PyTorch's default initialisers.

A converted PyTorch checkpoint must behave the same in training mode too, so BatchNorm here
normalises with the biased batch variance but updates its running variance with the unbiased one,
exactly like ``torch.nn.BatchNorm2d``. Flax's own ``nnx.BatchNorm`` uses the biased variance for
both, which drifts from PyTorch by a factor n / (n - 1) per update.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Dtype = Any


def torch_uniform_init(fan_in: int) -> nnx.Initializer:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default for Linear/Conv weights and biases."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# Normal(0, sqrt(2 / fan_out)) with fan_out = k*k*out_channels: torchvision's ResNet conv init
# (kaiming_normal_, mode="fan_out") and the release's ``init_weights`` for the local branch.
conv_fan_out_normal = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(
    in_ch: int,
    out_ch: int,
    kernel: int,
    *,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    bias: bool = False,
    kernel_init: nnx.Initializer = conv_fan_out_normal,
    dtype: Dtype | None = None,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    """An NHWC conv with PyTorch's symmetric explicit padding (never Flax's asymmetric 'SAME')."""
    fan_in = in_ch * kernel * kernel
    return nnx.Conv(
        in_ch,
        out_ch,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        kernel_dilation=(dilation, dilation),
        use_bias=bias,
        kernel_init=kernel_init,
        bias_init=torch_uniform_init(fan_in),
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


def linear(
    in_features: int, out_features: int, *, dtype: Dtype | None = None, rngs: nnx.Rngs
) -> nnx.Linear:
    """A Linear layer with PyTorch's default initialisation."""
    return nnx.Linear(
        in_features,
        out_features,
        kernel_init=torch_uniform_init(in_features),
        bias_init=torch_uniform_init(in_features),
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


class BatchNorm(nnx.Module):
    """BatchNorm over the last axis with ``torch.nn.BatchNorm2d`` semantics.

    ``momentum`` is PyTorch's: running = (1 - momentum) * running + momentum * batch_statistic.
    Statistics are computed in float32 over every axis but the last; under ``jax.jit`` with a
    sharded batch that is the global batch. The output is cast to ``dtype`` (compute dtype).
    """

    def __init__(
        self,
        num_features: int,
        *,
        momentum: float = 0.1,
        epsilon: float = 1e-5,
        use_running_average: bool = False,
        dtype: Dtype | None = None,
    ):
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        self.num_features = num_features
        self.momentum = momentum
        self.epsilon = epsilon
        self.use_running_average = use_running_average
        self.dtype = dtype

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Hook for ``nnx.view`` / ``Module.eval()``: switch between batch and running stats."""
        if use_running_average is not None:
            self.use_running_average = use_running_average

    def __call__(self, x: jax.Array) -> jax.Array:
        out_dtype = self.dtype or x.dtype
        xf = x.astype(jnp.float32)
        if self.use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(xf, axis=axes)
            var = jnp.mean(jnp.square(xf - mean), axis=axes)
            n = math.prod(x.shape[:-1])
            unbiased = var * (n / max(n - 1, 1))
            m = self.momentum
            self.mean[...] = (1.0 - m) * self.mean[...] + m * mean
            self.var[...] = (1.0 - m) * self.var[...] + m * unbiased
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
        y = y * self.scale[...] + self.bias[...]
        return y.astype(out_dtype)
