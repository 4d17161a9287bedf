"""ResNet-50 v1.5 in Flax NNX, laid out like torchvision's so a state_dict converts by a name table.

Attribute names follow torchvision (``conv1``, ``bn1``, ``layer1[0].conv2``,
``layer1[0].downsample[0]``); tensors are NHWC. v1.5: the stride of a stage sits on the 3x3 conv
of its first bottleneck. ``width`` scales every channel count and ``depths`` sets the number of
bottlenecks per stage, so tests and the CPU demo run a narrow model of the same shape: f3 is at
stride 16 and f4 at stride 32 whatever the width. ``kernels`` ("xla" or "cpu",
``layers.resolve_kernels``) picks the layer implementations; the parameters are the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from csce_jax.models.layers import BatchNorm, conv, max_pool_3x3_s2

Dtype = Any
EXPANSION = 4
RESNET50_DEPTHS = (3, 4, 6, 3)


def stage_widths(width: float) -> tuple[int, int, int, int, int]:
    """(stem, stage1..4 bottleneck widths) for a width multiplier; 1.0 gives torchvision's."""
    scaled = [max(1, round(c * width)) for c in (64, 64, 128, 256, 512)]
    return tuple(scaled)  # type: ignore[return-value]


def downsampled_size(size: int, halvings: int) -> int:
    """Spatial size after ``halvings`` stride-2 stages with PyTorch padding (ceil(size / 2) each)."""
    for _ in range(halvings):
        size = (size - 1) // 2 + 1
    return size


class Bottleneck(nnx.Module):
    """torchvision's Bottleneck: 1x1 -> 3x3 (stride here, v1.5) -> 1x1 (x4), plus shortcut."""

    def __init__(
        self,
        in_ch: int,
        width: int,
        stride: int,
        *,
        dtype: Dtype | None = None,
        kernels: str = "xla",
        rngs: nnx.Rngs,
    ):
        out_ch = width * EXPANSION
        self.conv1 = conv(in_ch, width, 1, dtype=dtype, kernels=kernels, rngs=rngs)
        self.bn1 = BatchNorm(width, dtype=dtype, kernels=kernels)
        self.conv2 = conv(
            width, width, 3, stride=stride, padding=1, dtype=dtype, kernels=kernels, rngs=rngs
        )
        self.bn2 = BatchNorm(width, dtype=dtype, kernels=kernels)
        self.conv3 = conv(width, out_ch, 1, dtype=dtype, kernels=kernels, rngs=rngs)
        self.bn3 = BatchNorm(out_ch, dtype=dtype, kernels=kernels)
        if stride != 1 or in_ch != out_ch:
            self.downsample = nnx.List(
                [
                    conv(in_ch, out_ch, 1, stride=stride, dtype=dtype, kernels=kernels, rngs=rngs),
                    BatchNorm(out_ch, dtype=dtype, kernels=kernels),
                ]
            )
        else:
            self.downsample = None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = jax.nn.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        shortcut = x
        if self.downsample is not None:
            shortcut = self.downsample[1](self.downsample[0](x))
        return jax.nn.relu(y + shortcut)


class ResNet(nnx.Module):
    """ResNet v1.5 trunk without avgpool/fc. ``__call__`` returns (f3, f4), NHWC."""

    def __init__(
        self,
        *,
        width: float = 1.0,
        depths: Sequence[int] = RESNET50_DEPTHS,
        dtype: Dtype | None = None,
        kernels: str = "xla",
        rngs: nnx.Rngs,
    ):
        if len(depths) != 4 or min(depths) < 1:
            raise ValueError(f"depths must be 4 positive stage depths, got {tuple(depths)}")
        stem, *widths = stage_widths(width)
        self.conv1 = conv(3, stem, 7, stride=2, padding=3, dtype=dtype, kernels=kernels, rngs=rngs)
        self.bn1 = BatchNorm(stem, dtype=dtype, kernels=kernels)
        in_ch = stem
        stages = []
        for stage, (w, depth) in enumerate(zip(widths, depths, strict=True)):
            blocks = []
            for i in range(depth):
                stride = 2 if (i == 0 and stage > 0) else 1
                blocks.append(Bottleneck(in_ch, w, stride, dtype=dtype, kernels=kernels, rngs=rngs))
                in_ch = w * EXPANSION
            stages.append(nnx.List(blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.kernels = kernels
        self.f3_channels = widths[2] * EXPANSION
        self.f4_channels = widths[3] * EXPANSION

    def stem(self, x: jax.Array) -> jax.Array:
        """conv1, bn1, relu, 3x3/2 max-pool with -inf padding (PyTorch's MaxPool2d(3, 2, 1))."""
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        return max_pool_3x3_s2(x, self.kernels)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = self.stem(x)
        for block in [*self.layer1, *self.layer2]:
            x = block(x)
        for block in self.layer3:
            x = block(x)
        f3 = x
        for block in self.layer4:
            x = block(x)
        return f3, x
