"""Test setup: 4 fake CPU devices (set before jax is imported) and shared tiny-model helpers."""

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))

import pytest

TINY = {"width": 1 / 16, "depths": (1, 1, 1, 1)}


@pytest.fixture
def tiny_model():
    """A narrow CSCE-Net (f3: 64 channels, f4: 128) at 128x128 with 10 classes, 16 bits."""
    from flax import nnx

    from csce_jax.hashing import hash_centers
    from csce_jax.models import CSCENet

    return CSCENet(hash_centers(10, 16), image_size=128, rngs=nnx.Rngs(0), **TINY)
