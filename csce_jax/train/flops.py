"""FLOPs of CSCE-Net counted from its shapes, independent of any backend's cost analysis.

Convention:

- **forward**: every convolution and matrix product of the network's forward pass, 2 FLOPs per
  multiply-add, read off the traced forward program (its jaxpr) from the operand shapes;
- **train** (a training step: forward, backward and update) = 3 x forward: the backward pass
  computes, for every convolution and matmul, the gradient of its input and of its weights,
  each as many multiply-adds as the forward product;
- elementwise work (batch norm, activations, the loss, the optimiser update) is not counted.
  For ResNet-50 at 224 px this comes within a few percent of what XLA:CPU's cost analysis
  counts for the compiled step (``tests/test_flops.py`` holds it to 5 %).

XLA:GPU's cost analysis leaves out the convolutions it hands to cuDNN, so it cannot give MFU
there; this count can (``mfu``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx
from jax.extend import core as jax_core

from csce_jax.runs import builders
from csce_jax.runtime import chips


def _conv_flops(eqn) -> int:
    lhs, rhs = (v.aval for v in eqn.invars[:2])
    out = eqn.outvars[0].aval
    dn = eqn.params["dimension_numbers"]
    rhs_spec = dn.rhs_spec  # (out feature dim, in feature dim, spatial...)
    window = math.prod(rhs.shape[d] for d in rhs_spec[2:])
    in_features = rhs.shape[rhs_spec[1]]
    del lhs
    return 2 * math.prod(out.shape) * window * in_features


def _dot_flops(eqn) -> int:
    lhs, _ = (v.aval for v in eqn.invars[:2])
    out = eqn.outvars[0].aval
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    k = math.prod(lhs.shape[d] for d in lhs_contract)
    return 2 * math.prod(out.shape) * k


def _sub_jaxprs(params: dict[str, Any]):
    for value in params.values():
        items = value if isinstance(value, list | tuple) else [value]
        for item in items:
            if isinstance(item, jax_core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jax_core.Jaxpr):
                yield item


def jaxpr_flops(jaxpr: jax_core.Jaxpr) -> int:
    """Convolution and matmul FLOPs of a jaxpr, sub-programs (jit, custom VJPs, remat) included."""
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "dot_general":
            total += _dot_flops(eqn)
        for sub in _sub_jaxprs(eqn.params):
            total += jaxpr_flops(sub)
    return total


def count_flops(fn: Callable[..., Any], *args: Any) -> int:
    """Convolution and matmul FLOPs of ``fn(*args)`` (arrays or ShapeDtypeStructs)."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def model_flops_per_image(
    config: Any, num_classes: int, platform: str | None = None
) -> dict[str, float]:
    """{"forward", "train"} FLOPs per image of the configured CSCE-Net (see the convention)."""
    model = nnx.eval_shape(lambda: builders.create_model(config, num_classes, platform=platform))
    crop = config.data.crop
    images = jax.ShapeDtypeStruct((1, crop, crop, 3), jax.numpy.uint8)
    forward = float(count_flops(lambda m, x: m(x).logits, model, images))
    return {"forward": forward, "train": 3.0 * forward}


def peak_flops(device: jax.Device, dtype: str) -> float | None:
    """The device's dense peak FLOP/s for ``dtype`` (:mod:`csce_jax.runtime.chips`), if known."""
    chip = chips.chip_of(getattr(device, "device_kind", "") or "")
    return chips.peak(chip, dtype) if chip is not None else None


def mfu(flops_per_image: float, images_per_sec: float, devices: int, peak: float | None):
    """Model FLOPs utilisation: achieved FLOP/s over the devices' peak (None if unknown)."""
    if not peak or not flops_per_image:
        return None
    return flops_per_image * images_per_sec / (peak * devices)
