"""Layers with PyTorch semantics: BatchNorm statistics and PyTorch's default initialisers.

A converted PyTorch checkpoint must behave the same in training mode too, so BatchNorm here
normalises with the biased batch variance but updates its running variance with the unbiased one,
exactly like ``torch.nn.BatchNorm2d``. Flax's own ``nnx.BatchNorm`` uses the biased variance for
both, which drifts from PyTorch by a factor n / (n - 1) per update.

Each layer takes ``kernels``: ``"xla"`` is plain lax (convolutions, autodiff batch norm, a
``reduce_window`` max-pool); ``"cpu"`` uses the CPU-tuned gradients of ``cpu_kernels``;
:func:`resolve_kernels` turns ``"auto"`` into one of them by the platform the model runs on.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import csce_jax.models.cpu_kernels as cpu_kernels
from csce_jax.config.schema import choices
from csce_jax.models.dtypes import widened

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


KERNELS = choices("model.kernels")


def resolve_kernels(kernels: str, platform: str | None = None) -> str:
    """``"auto"`` -> ``"cpu"`` where the model will run on a CPU, else ``"xla"``.

    ``platform`` is where the model's programs will run ("cpu", "tpu", "gpu"); by default JAX's
    default backend. A program compiled ahead of time for a TPU on a CPU host passes "tpu", so
    that the CPU-tuned layers never reach a TPU or GPU program through "auto".
    """
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    if kernels == "auto":
        return "cpu" if (platform or jax.default_backend()) == "cpu" else "xla"
    return kernels


def max_pool_3x3_s2_xla(x: jax.Array) -> jax.Array:
    """PyTorch's ``MaxPool2d(3, stride=2, padding=1)`` on NHWC as one ``reduce_window``."""
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
    )


def max_pool_3x3_s2(x: jax.Array, kernels: str = "xla") -> jax.Array:
    """The stem's max-pool with the chosen kernels (the same values either way)."""
    return cpu_kernels.max_pool_3x3_s2(x) if kernels == "cpu" else max_pool_3x3_s2_xla(x)


def batch_norm_train_xla(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training-mode batch norm, differentiated by autodiff: (float32 y, mean, biased var)."""
    xf = widened(x)
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(xf, axis=axes)
    var = jnp.mean(jnp.square(xf - mean), axis=axes)
    y = (xf - mean) * jax.lax.rsqrt(var + epsilon) * scale + bias
    return y, mean, var


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
    kernels: str = "xla",
    rngs: nnx.Rngs,
) -> nnx.Conv:
    """An NHWC conv with PyTorch's symmetric explicit padding (never Flax's asymmetric 'SAME').

    ``kernels="cpu"`` computes unpadded 1x1 convolutions as matmuls (``cpu_kernels``).
    """
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
        conv_general_dilated=(
            cpu_kernels.pointwise_or_general_conv
            if kernels == "cpu"
            else jax.lax.conv_general_dilated
        ),
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
        kernels: str = "xla",
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
        self.kernels = kernels

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Hook for ``nnx.view`` / ``Module.eval()``: switch between batch and running stats."""
        if use_running_average is not None:
            self.use_running_average = use_running_average

    def __call__(self, x: jax.Array) -> jax.Array:
        out_dtype = self.dtype or x.dtype
        if self.use_running_average:
            xf = widened(x)
            y = (xf - self.mean[...]) * jax.lax.rsqrt(self.var[...] + self.epsilon)
            return (y * self.scale[...] + self.bias[...]).astype(out_dtype)
        train = cpu_kernels.batch_norm_train if self.kernels == "cpu" else batch_norm_train_xla
        y, mean, var = train(x, self.scale[...], self.bias[...], self.epsilon)
        n = math.prod(x.shape[:-1])
        unbiased = var * (n / max(n - 1, 1))
        m = self.momentum
        self.mean[...] = (1.0 - m) * self.mean[...] + m * jax.lax.stop_gradient(mean)
        self.var[...] = (1.0 - m) * self.var[...] + m * jax.lax.stop_gradient(unbiased)
        return y.astype(out_dtype)
