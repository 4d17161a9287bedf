"""CPU-tuned layer kernels (``model.kernels="cpu"``): the same mathematics as the plain XLA
layers, written so that XLA:CPU runs a training step faster.

- Unpadded 1x1 convolutions (two thirds of ResNet-50's) as matmuls whose kernel gradient
  transposes the narrower operand explicitly: XLA:CPU computed a convolution's kernel gradient
  as a second convolution over transposed activations, at 3-4x the cost of a matmul.
- Batch norm with a closed-form VJP (two per-channel sums, then one elementwise pass) instead
  of autodiff's chain of broadcasts.
- The stem's 3x3/2 max-pool as nine strided views with a written-out VJP (first maximum of each
  window, as PyTorch) instead of a variadic reduce-window and a scatter.

Measured on CPU only (docs/performance.md). On GPU these reshaped dots trip XLA:GPU's Triton
GEMM tiling, so ``model.kernels="auto"`` uses them only when JAX's default backend is the CPU.
Each is checked against autodiff of the plain formulation (``tests/test_layers.py``).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from csce_jax.models.dtypes import widened


def pointwise_or_general_conv(
    x: jax.Array,
    kernel: jax.Array,
    window_strides,
    padding,
    *,
    lhs_dilation=None,
    rhs_dilation=None,
    feature_group_count: int = 1,
    **kwargs,
) -> jax.Array:
    """``lax.conv_general_dilated`` (NHWC/HWIO), with unpadded 1x1 convs done as a matmul.

    Why: XLA:CPU computes a convolution's kernel gradient as a second convolution whose window
    is the whole feature map, over activations transposed to batch-last; for ResNet-50's 1x1
    convs (two thirds of its convs) that costs 3-4x a plain matmul (``benchmarks/
    bench_train_step.py``). As a matmul the kernel gradient is a matmul too. The mathematics is
    the same; only the order of the float32 sums may differ.
    """
    pointwise = (
        kernel.shape[:2] == (1, 1)
        and not isinstance(padding, str)
        and all(tuple(p) == (0, 0) for p in padding)
        and all(d == 1 for d in (lhs_dilation or (1, 1)))
        and feature_group_count == 1
    )
    if not pointwise:
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            feature_group_count=feature_group_count,
            **kwargs,
        )
    sh, sw = window_strides
    if (sh, sw) != (1, 1):
        x = x[:, ::sh, ::sw]
    return pointwise_matmul(x, kernel[0, 0])


@jax.custom_vjp
def pointwise_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` over the last axis of ``x`` (a 1x1 conv), with a transpose-aware kernel gradient.

    The kernel gradient sum_n x[n, i] dy[n, o] needs one operand transposed; XLA picked the
    larger one (often the 4x wider conv output, fused into batch norm's backward pass). Here
    the narrower one is transposed explicitly, so the product itself is a plain matmul.
    """
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _pointwise_fwd(x, w):
    return pointwise_matmul(x, w), (x, w)


def _pointwise_bwd(res, dy):
    x, w = res
    cin, cout = w.shape
    x2, dy2 = x.reshape(-1, cin), dy.reshape(-1, cout)
    dx = jax.lax.dot_general(dy, w, (((dy.ndim - 1,), (1,)), ((), ())))
    if cin <= cout:
        dw = jnp.matmul(x2.T, dy2.astype(x2.dtype))
    else:
        dw = jnp.matmul(dy2.T, x2.astype(dy2.dtype)).T
    return dx.astype(x.dtype), dw.astype(w.dtype)


pointwise_matmul.defvjp(_pointwise_fwd, _pointwise_bwd)


@jax.custom_vjp
def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """PyTorch's ``MaxPool2d(3, stride=2, padding=1)`` on NHWC: -inf padding, floor output size.

    The gradient goes to the first maximum of each window in row-major order, as in PyTorch.
    Written out (nine strided views, a custom VJP) because XLA:CPU's generic max-pool gradient
    (a variadic reduce-window over four index arrays, then a scatter) cost about 8 % of a
    ResNet-50 training step here.
    """
    return _max_pool_forward(x)[0]


def _max_pool_forward(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(pooled, index 0..8 of each window's first maximum), over nine strided views."""
    h, w = x.shape[1:3]
    ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    views = [
        xp[:, i : i + 2 * (ho - 1) + 1 : 2, j : j + 2 * (wo - 1) + 1 : 2]
        for i in range(3)
        for j in range(3)
    ]
    best, arg = views[0], jnp.zeros(views[0].shape, jnp.int8)
    for k, v in enumerate(views[1:], start=1):
        better = v > best  # strict: ties keep the earlier position
        best = jnp.where(better, v, best)
        arg = jnp.where(better, jnp.int8(k), arg)
    return best, arg


def _max_pool_fwd(x):
    y, arg = _max_pool_forward(x)
    return y, (arg, x.shape)


def _max_pool_bwd(res, g):
    arg, shape = res
    h, w = shape[1:3]
    ho, wo = g.shape[1:3]
    zero = jnp.zeros((), g.dtype)
    total = None
    for k in range(9):
        i, j = divmod(k, 3)
        part = jax.lax.pad(
            jnp.where(arg == k, g, zero),
            zero,
            (
                (0, 0, 0),
                (i, h + 2 - i - (2 * (ho - 1) + 1), 1),
                (j, w + 2 - j - (2 * (wo - 1) + 1), 1),
                (0, 0, 0),
            ),
        )
        total = part if total is None else total + part
    return (total[:, 1 : h + 1, 1 : w + 1],)


max_pool_3x3_s2.defvjp(_max_pool_fwd, _max_pool_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training-mode batch norm over every axis but the last: (float32 y, batch mean, biased var).

    The VJP is the closed form (two per-channel sums, then one elementwise pass) rather than
    autodiff's chain of broadcasts, which XLA:CPU ran as several passes over each activation.
    Cotangents of the returned mean and variance are honoured too.
    """
    return _bn_forward(x, scale, bias, epsilon)[0]


def _bn_forward(x, scale, bias, epsilon):
    xf = widened(x)
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(xf, axis=axes)
    var = jnp.mean(jnp.square(xf - mean), axis=axes)
    rstd = jax.lax.rsqrt(var + epsilon)
    y = (xf - mean) * rstd * scale + bias
    return (y, mean, var), (x, mean, rstd, scale)


def _bn_bwd(epsilon, res, cotangents):
    x, mean, rstd, scale = res
    dy, dmean, dvar = cotangents
    axes = tuple(range(x.ndim - 1))
    n = math.prod(x.shape[:-1])
    xhat = (widened(x) - mean) * rstd
    dy = dy.astype(xhat.dtype)
    dbias = jnp.sum(dy, axis=axes)
    dscale = jnp.sum(dy * xhat, axis=axes)
    # dx = rstd*scale*dy + xhat*b + c, with per-channel b and c (mean/var cotangents included).
    b = -rstd * scale * dscale / n + 2.0 * dvar / (n * rstd)
    c = -rstd * scale * dbias / n + dmean / n
    dx = (rstd * scale) * dy + xhat * b + c
    return dx.astype(x.dtype), dscale, dbias


batch_norm_train.defvjp(_bn_forward, _bn_bwd)
