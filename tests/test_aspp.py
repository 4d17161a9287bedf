"""The ASPP block (the paper figure's variant): shapes, parity with PyTorch, one training step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from csce_jax.models.csce import ASPP
from csce_jax.runs import state as train_state
from csce_jax.runs.builders import run_parts
from csce_jax.runtime import sharding
from csce_jax.train.step import make_train_step


def test_aspp_keeps_the_shape_and_splits_channels_four_ways():
    block = ASPP(64, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 14, 14, 64))
    y = block(x)
    assert y.shape == (2, 14, 14, 64)
    assert [c.kernel.shape for c in block.dilated] == [(3, 3, 64, 16)] * 3
    assert block.pooled.kernel.shape == (1, 1, 64, 16)
    # The pooled quarter is one vector per image, the same at every position, and >= 0.
    pooled = np.asarray(y[..., 48:])
    np.testing.assert_allclose(pooled, np.broadcast_to(pooled[:, :1, :1], pooled.shape))
    assert pooled.min() >= 0
    with pytest.raises(ValueError, match="divisible by 4"):
        ASPP(66, rngs=nnx.Rngs(0))


def test_aspp_matches_a_pytorch_transcription():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    block = ASPP(32, rngs=nnx.Rngs(3))
    x = np.asarray(jax.random.normal(jax.random.key(2), (2, 14, 14, 32)), np.float32)
    ours = np.asarray(block(jnp.asarray(x)))
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)

    def weights(conv):
        w = torch.from_numpy(np.asarray(conv.kernel[...])).permute(3, 2, 0, 1)
        return w, torch.from_numpy(np.asarray(conv.bias[...]))

    outs = []
    for conv, d in zip(block.dilated, (3, 6, 9), strict=True):
        w, b = weights(conv)
        outs.append(F.conv2d(xt, w, b, padding=d, dilation=d))
    w, b = weights(block.pooled)
    g = F.relu(F.conv2d(F.adaptive_avg_pool2d(xt, 1), w, b))
    outs.append(F.interpolate(g, size=(14, 14), mode="bilinear", align_corners=False))
    theirs = torch.cat(outs, dim=1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_one_training_step_with_aspp_moves_its_weights():
    c = tiny_config()
    c.model.use_aspp = True
    mesh = sharding.make_mesh()
    parts = run_parts(c, 10)
    setup = train_state.create_train_state(parts.model, parts.tx, parts.schedule)
    before = jax.tree.map(np.asarray, setup.state["params"]["aspp"])
    step = make_train_step(setup.graphdef, setup.tx, setup.schedule, parts.step, mesh)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 255, (8, 112, 112, 3), dtype=np.uint8),
        "label": rng.integers(0, 10, 8).astype(np.int32),
    }
    state = jax.device_put(setup.state, sharding.replicated(mesh))
    for _ in range(2):  # warm-up starts at lr 0
        state, metrics = step(state, sharding.global_batch(mesh, batch))
    assert np.isfinite(float(metrics["loss"]))
    after = jax.tree.map(np.asarray, state["params"]["aspp"])
    moved = [
        np.abs(a - b).max()
        for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True)
    ]
    assert len(moved) == 8 and min(moved) > 0
