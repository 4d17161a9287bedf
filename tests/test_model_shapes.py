"""Full-size shapes via jax.eval_shape (no FLOPs) and parameter counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from csce_jax.hashing import hash_centers
from csce_jax.models import CSCENet, ResNet
from csce_jax.models.csce import num_windows


def _param_count(module) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(module, nnx.Param))))


def _abstract_intermediates(model_fn, batch, size):
    model = nnx.eval_shape(model_fn)
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    return jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).intermediates(x), state, x)


def test_backbone_parameter_count_matches_torchvision():
    # torchvision resnet50 has 25,557,032 parameters; its fc layer 2048*1000 + 1000 of them.
    abstract = nnx.eval_shape(lambda: ResNet(rngs=nnx.Rngs(0)))
    assert _param_count(abstract) == 25_557_032 - 2_049_000 == 23_508_032


@pytest.mark.parametrize(
    ("size", "f3", "f4", "windows"),
    [(224, 14, 7, 52), (256, 16, 8, 74), (320, 20, 10, 81 + 49)],
)
def test_full_size_shapes(size, f3, f4, windows):
    centers = hash_centers(100, 64)
    out = _abstract_intermediates(
        lambda: CSCENet(centers, image_size=size, rngs=nnx.Rngs(0)), 2, size
    )
    assert out["f3"].shape == (2, f3, f3, 1024)
    assert out["f4"].shape == (2, f4, f4, 2048)
    assert out["windows"].shape == (2, windows, 1024)
    assert out["f_local"].shape == (2, f3, f3, 1024)
    assert out["f_e"].shape == (2, 2048)
    assert out["v"].shape == (2, 64)
    assert out["logits"].shape == (2, 100)
    assert out["t"].shape == (2, 1)
    assert num_windows((f4, f4), (2, 4)) == windows


def test_full_model_parameter_count():
    centers = hash_centers(100, 64)
    model = nnx.eval_shape(lambda: CSCENet(centers, rngs=nnx.Rngs(0)))
    head = (
        1024 * 1024
        + 1024  # local conv1
        + 2 * 1024  # local bn
        + 1024
        + 1  # local conv2
        + 2048 * 256
        + 256
        + 2048 * 64
        + 64  # window projections
        + 52
        + 1  # window fusion
        + 2048 * 64
        + 64  # hash fc
        + 2048
        + 1  # threshold fc
    )
    assert _param_count(model) == 23_508_032 + head
    # Fixed centres are state, not parameters: they are saved but never optimised.
    assert nnx.state(model, nnx.Param).get("centers") is None
    learned = nnx.eval_shape(lambda: CSCENet(centers, learn_centers=True, rngs=nnx.Rngs(0)))
    assert _param_count(learned) == 23_508_032 + head + 100 * 64


def test_tiny_model_keeps_strides(tiny_model):
    out = tiny_model.intermediates(jnp.zeros((2, 128, 128, 3)))
    assert out["f3"].shape == (2, 8, 8, 64)  # stride 16
    assert out["f4"].shape == (2, 4, 4, 128)  # stride 32
    assert out["windows"].shape == (2, 9 + 1, 64)
    assert out["v"].shape == (2, 16)


def test_too_small_input_is_refused():
    with pytest.raises(ValueError, match="too small for 4x4 windows"):
        CSCENet(
            hash_centers(10, 16), image_size=64, width=1 / 16, depths=(1, 1, 1, 1), rngs=nnx.Rngs(0)
        )
