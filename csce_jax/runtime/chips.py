"""What each accelerator chip offers: memory, peak FLOP/s and memory bandwidth, with sources.

Read by the MFU figure of training (:func:`csce_jax.train.flops.peak_flops`) and by the run planner
(``csce-plan``), which compares a compiled step's memory with ``hbm_bytes`` and bounds its
time by ``peak_bf16``/``peak_fp32`` and ``hbm_bytes_per_s``. Figures are the vendors'
data-sheet numbers per chip (dense, no sparsity); a TPU chip in megacore mode (v4, v5p) is one
JAX device, so "per chip" is "per device" for every TPU here.

On a TPU, JAX's default matmul precision computes float32 products in one bfloat16 pass, so
``peak_fp32`` of a TPU is its bfloat16 peak; on NVIDIA GPUs it is the TF32 tensor-core peak
(JAX's default precision there).
"""

from __future__ import annotations

import dataclasses

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip kind, as JAX names it (``device.device_kind``)."""

    name: str  # the product name people use (v5e, H100)
    device_kind: str  # JAX's device_kind (exact for TPUs, a fragment for GPUs)
    hbm_bytes: int
    peak_bf16: float  # FLOP/s, dense
    peak_fp32: float  # FLOP/s at JAX's default precision (see the module docstring)
    hbm_bytes_per_s: float
    source: str


# fmt: off
CHIPS: tuple[Chip, ...] = (
    Chip("v4", "TPU v4", 32 * GIB, 275e12, 275e12, 1228e9, "https://cloud.google.com/tpu/docs/v4"),
    Chip("v5e", "TPU v5 lite", 16 * GIB, 197e12, 197e12, 819e9, "https://cloud.google.com/tpu/docs/v5e"),
    Chip("v5p", "TPU v5", 95 * GIB, 459e12, 459e12, 2765e9, "https://cloud.google.com/tpu/docs/v5p"),
    Chip("v6e", "TPU v6 lite", 32 * GIB, 918e12, 918e12, 1638e9, "https://cloud.google.com/tpu/docs/v6e"),
    Chip("H200", "H200", 141 * 10**9, 989e12, 494e12, 4.8e12, "https://www.nvidia.com/en-us/data-center/h200/"),
    Chip("H100", "H100", 80 * GIB, 989e12, 494e12, 3.35e12, "https://www.nvidia.com/en-us/data-center/h100/"),
    Chip("A100", "A100", 80 * GIB, 312e12, 156e12, 2.039e12, "https://www.nvidia.com/en-us/data-center/a100/"),
)
# fmt: on


def chip_of(device_kind: str) -> Chip | None:
    """The chip of a JAX ``device_kind`` ("TPU v5 lite", "NVIDIA H100 80GB HBM3"), if known.

    TPU kinds match exactly ("TPU v5" is v5p, "TPU v5 lite" is v5e); GPU kinds by fragment.
    """
    kind = device_kind or ""
    for chip in CHIPS:
        if chip.device_kind.startswith("TPU"):
            if kind == chip.device_kind:
                return chip
        elif chip.device_kind.lower() in kind.lower():
            return chip
    return None


def chip_named(name: str) -> Chip | None:
    """The chip called ``name`` (v5e, h100, ...), case-insensitive."""
    return next((c for c in CHIPS if c.name.lower() == name.lower()), None)


def peak(chip: Chip, dtype: str) -> float:
    """The chip's peak FLOP/s for a model computing in ``dtype`` (bfloat16 or float32)."""
    return chip.peak_bf16 if dtype == "bfloat16" else chip.peak_fp32
