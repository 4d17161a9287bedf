"""CSCE-Net: ResNet trunk, local attention branch, global sliding windows, AIE and hash head.

Layout is NHWC throughout. Shapes in comments are for a 224x224 input at full width
(D = 1024 = f3 channels; the window projections keep D values per window at any width).
The network takes uint8 RGB images and applies the ImageNet normalisation itself, in float32,
then casts to its compute dtype: the dtype is decided in one place, the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from csce_jax.models.dtypes import widened
from csce_jax.models.layers import BatchNorm, conv, linear, resolve_kernels, torch_uniform_init
from csce_jax.models.resnet import RESNET50_DEPTHS, ResNet, downsampled_size

Dtype = Any
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_images(images: jax.Array, dtype: Dtype | None = None) -> jax.Array:
    """uint8 NHWC RGB -> ImageNet-normalised float32, cast to ``dtype`` if given."""
    x = images.astype(jnp.float32) / 255.0
    x = (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)
    return x.astype(dtype) if dtype is not None else x


@struct.dataclass
class CSCEOutput:
    """What one forward pass returns (all float32; float64 for a float64 input under x64)."""

    logits: jax.Array  # (B, C): cosine similarity of v to each class centre
    codes: jax.Array  # (B, K): continuous code v
    threshold: jax.Array  # (B, 1): DSF threshold t, clipped to [-signt, signt]
    features: jax.Array  # (B, 2D): f_e = concat(f_g, f_orth)


class HashCenters(nnx.Variable):
    """Fixed (untrained) class centres: saved with the model state, never given to the optimiser."""


def num_windows(size: tuple[int, int], window_sizes: Sequence[int]) -> int:
    """Number of stride-1 windows over an (h, w) map: sum over k of (h-k+1)(w-k+1)."""
    h, w = size
    return sum((h - k + 1) * (w - k + 1) for k in window_sizes)


def unfold_windows(x: jax.Array, k: int) -> jax.Array:
    """All k x k stride-1 windows of an NHWC map, in PyTorch ``nn.Unfold`` order.

    Returns (B, L, C*k*k): windows numbered row-major by their top-left corner; within a window
    the value index is c*k*k + i*k + j (channel-major), as nn.Unfold lays it out.
    """
    b, h, w, c = x.shape
    ho, wo = h - k + 1, w - k + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"a {k}x{k} window does not fit a {h}x{w} feature map")
    taps = [x[:, i : i + ho, j : j + wo, :] for i in range(k) for j in range(k)]
    patches = jnp.stack(taps, axis=-1)  # (B, ho, wo, C, k*k), tap index i*k + j
    return patches.reshape(b, ho * wo, c * k * k)


def aie_orthogonal(windows: jax.Array, local: jax.Array) -> jax.Array:
    """AIE's f_orth: mean over positions of L - G (G^T L) / ||G||_F^2 (docs/model.md).

    ``windows`` is G as (B, W, D) (window-major), ``local`` is L as (B, h, w, D). The mean over
    the N positions commutes with the projection, so it is taken first: the result is
    mean(L) - G (G^T mean(L)) / s^2, which avoids forming the (B, D, N) projection.
    """
    g = widened(windows)
    lbar = jnp.mean(widened(local), axis=(1, 2))  # (B, D)
    s2 = jnp.sum(jnp.square(g), axis=(1, 2))  # (B,)
    coeff = jnp.einsum("bwd,bd->bw", g, lbar)
    proj = jnp.einsum("bwd,bw->bd", g, coeff) / s2[:, None]
    return lbar - proj


def torch_default_conv(in_ch: int, out_ch: int, k: int, **kwargs) -> nnx.Module:
    """A biased conv with PyTorch's default init (kaiming_uniform with a = sqrt(5), i.e.
    variance scaling 1/3, fan in, uniform), as the release's own heads are built."""
    init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
    return conv(in_ch, out_ch, k, bias=True, kernel_init=init, **kwargs)


class ASPP(nnx.Module):
    """Multi-atrous block (paper variant, after DOLG): three dilated 3x3 convs and a pooled branch."""

    def __init__(
        self,
        channels: int,
        dilations: Sequence[int] = (3, 6, 9),
        *,
        dtype: Dtype | None = None,
        kernels: str = "xla",
        rngs: nnx.Rngs,
    ):
        branches = len(dilations) + 1
        if channels % branches:
            raise ValueError(f"ASPP needs channels divisible by {branches}, got {channels}")
        hidden = channels // branches
        kw = {"dtype": dtype, "kernels": kernels, "rngs": rngs}
        self.dilated = nnx.List(
            [
                torch_default_conv(channels, hidden, 3, padding=d, dilation=d, **kw)
                for d in dilations
            ]
        )
        self.pooled = torch_default_conv(channels, hidden, 1, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        outs = [c(x) for c in self.dilated]
        g = jax.nn.relu(self.pooled(jnp.mean(x, axis=(1, 2), keepdims=True)))
        outs.append(jnp.broadcast_to(g, x.shape[:3] + g.shape[3:]))
        return jnp.concatenate(outs, axis=-1)


class SpatialAttention(nnx.Module):
    """Local branch (release "SpatialAttention2d"): a = softplus(conv2(relu(bn(conv1(x))))),
    output a * normalize(bn(conv1(x))) over channels."""

    def __init__(
        self, channels: int, *, dtype: Dtype | None = None, kernels: str = "xla", rngs: nnx.Rngs
    ):
        self.conv1 = conv(channels, channels, 1, bias=True, dtype=dtype, kernels=kernels, rngs=rngs)
        # The release builds this BN with PyTorch momentum 0.9.
        self.bn = BatchNorm(channels, momentum=0.9, dtype=dtype, kernels=kernels)
        self.conv2 = conv(channels, 1, 1, bias=True, dtype=dtype, kernels=kernels, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.bn(self.conv1(x))
        xf = widened(x)
        norm = jnp.sqrt(jnp.sum(jnp.square(xf), axis=-1, keepdims=True))
        normalized = xf / jnp.maximum(norm, 1e-12)
        score = jax.nn.softplus(widened(self.conv2(jax.nn.relu(x))))
        return (score * normalized).astype(x.dtype)


def _f4_size(size: tuple[int, int], window_sizes: Sequence[int]) -> tuple[int, int]:
    """The trunk's last feature map for ``size`` inputs; refused if smaller than a window."""
    f4 = (downsampled_size(size[0], 5), downsampled_size(size[1], 5))
    if min(f4) < max(window_sizes):
        w = max(window_sizes)
        raise ValueError(
            f"image_size {size} gives a {f4[0]}x{f4[1]} f4 map, too small for {w}x{w} "
            f"windows (need >= {32 * (w - 1) + 1} pixels per side)"
        )
    return f4


def cosine_logits(v: jax.Array, centers: jax.Array) -> jax.Array:
    """cos(v, c_j) for every class centre: (B, K) x (C, K) -> (B, C), float32 (float64 for v)."""
    v = widened(v)
    c = centers.astype(v.dtype)
    nv = v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
    nc = c / jnp.maximum(jnp.linalg.norm(c, axis=-1, keepdims=True), 1e-12)
    return nv @ nc.T


class CSCENet(nnx.Module):
    """The full network. ``__call__(images)`` takes uint8 NHWC RGB images and normalises them.

    A floating-point input is taken as already ImageNet-normalised (what a PyTorch pipeline
    feeds its network), which the parity tests use; it is cast to the compute dtype.

    ``image_size`` fixes the number of global windows (the fusion conv has one weight per
    window): (h-1)(w-1) + (h-3)(w-3) = 52 for 224x224, with f4 of size h x w = ceil(size/32).
    ``kernels``: "auto" (the CPU-tuned layers where JAX's default backend is the CPU, plain XLA
    layers elsewhere), "xla" or "cpu"; the parameters and the mathematics are the same.
    """

    def __init__(
        self,
        centers: np.ndarray | jax.Array,
        *,
        image_size: int | tuple[int, int] = 224,
        width: float = 1.0,
        depths: Sequence[int] = RESNET50_DEPTHS,
        window_sizes: Sequence[int] = (2, 4),
        use_aspp: bool = False,
        learn_centers: bool = False,
        signt: float = 0.01,
        dtype: Dtype | None = None,
        kernels: str = "auto",
        rngs: nnx.Rngs,
    ):
        kernels = resolve_kernels(kernels)
        centers = jnp.asarray(centers, jnp.float32)
        num_classes, bits = centers.shape
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        f4_size = _f4_size(size, window_sizes)
        self.backbone = ResNet(width=width, depths=depths, dtype=dtype, kernels=kernels, rngs=rngs)
        d3, d4 = self.backbone.f3_channels, self.backbone.f4_channels
        for k in window_sizes:
            if d3 % (k * k):
                raise ValueError(f"f3 channels {d3} not divisible by window area {k * k}")
        self.aspp = ASPP(d3, dtype=dtype, kernels=kernels, rngs=rngs) if use_aspp else None
        self.local = SpatialAttention(d3, dtype=dtype, kernels=kernels, rngs=rngs)
        kw = {"dtype": dtype, "kernels": kernels, "rngs": rngs}
        self.window_proj = nnx.List(
            [torch_default_conv(d4, d3 // (k * k), 1, **kw) for k in window_sizes]
        )
        n_windows = num_windows(f4_size, window_sizes)
        self.window_fusion = nnx.Linear(
            n_windows,
            1,
            kernel_init=torch_uniform_init(n_windows),
            bias_init=torch_uniform_init(n_windows),
            param_dtype=jnp.float32,
            rngs=rngs,
        )
        self.hash_fc = linear(2 * d3, bits, dtype=dtype, rngs=rngs)
        self.threshold_fc = linear(2 * d3, 1, dtype=dtype, rngs=rngs)
        self.centers = nnx.Param(centers) if learn_centers else HashCenters(centers)
        self.window_sizes = tuple(window_sizes)
        self.image_size = size
        self.signt = signt
        self.dtype = dtype
        self.bits = bits
        self.num_classes = num_classes

    def prepare_input(self, images: jax.Array) -> jax.Array:
        """uint8 images -> normalised at the compute dtype; floats are taken as normalised."""
        if images.dtype == jnp.uint8:
            return normalize_images(images, self.dtype)
        return images.astype(self.dtype) if self.dtype is not None else images

    def intermediates(self, images: jax.Array) -> dict[str, jax.Array]:
        """Every named tensor of the forward pass (for parity tests and inspection)."""
        f3, f4 = self.backbone(self.prepare_input(images))  # (B,14,14,1024), (B,7,7,2048)
        local_in = self.aspp(f3) if self.aspp is not None else f3
        f_local = self.local(local_in)  # (B,14,14,D)
        windows = jnp.concatenate(
            [
                unfold_windows(p(f4), k)
                for p, k in zip(self.window_proj, self.window_sizes, strict=True)
            ],
            axis=1,
        )  # (B, 52, D)
        f_orth = aie_orthogonal(windows, f_local)  # (B, D)
        f_g = self.window_fusion(jnp.swapaxes(widened(windows), 1, 2))[..., 0]
        f_e = jnp.concatenate([f_g, f_orth], axis=-1)  # (B, 2D): global part first
        v = widened(self.hash_fc(f_e))
        t = jnp.clip(widened(self.threshold_fc(f_e)), -self.signt, self.signt)
        logits = cosine_logits(v, self.centers[...])
        return {
            "f3": f3,
            "f4": f4,
            "f_local": f_local,
            "windows": windows,
            "f_orth": f_orth,
            "f_g": f_g,
            "f_e": f_e,
            "v": v,
            "t": t,
            "logits": logits,
        }

    def __call__(self, images: jax.Array) -> CSCEOutput:
        out = self.intermediates(images)
        return CSCEOutput(
            logits=out["logits"], codes=out["v"], threshold=out["t"], features=out["f_e"]
        )
