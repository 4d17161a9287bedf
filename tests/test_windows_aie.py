"""Sliding-window unfold order and AIE against numpy transcriptions of docs/model.md."""

import jax.numpy as jnp
import numpy as np
import pytest

from csce_jax.models.csce import aie_orthogonal, unfold_windows


def numpy_unfold(x_nchw: np.ndarray, k: int) -> np.ndarray:
    """torch.nn.Unfold(kernel_size=k, stride=1) semantics: (B, C*k*k, L)."""
    b, c, h, w = x_nchw.shape
    ho, wo = h - k + 1, w - k + 1
    out = np.zeros((b, c * k * k, ho * wo), x_nchw.dtype)
    for ch in range(c):
        for i in range(k):
            for j in range(k):
                for p in range(ho):
                    for q in range(wo):
                        out[:, ch * k * k + i * k + j, p * wo + q] = x_nchw[:, ch, p + i, q + j]
    return out


@pytest.mark.parametrize(("k", "h", "w"), [(2, 7, 7), (4, 7, 7), (3, 5, 6)])
def test_unfold_matches_torch_order(k, h, w):
    x = np.random.default_rng(k).standard_normal((2, 3, h, w)).astype(np.float32)
    ours = np.asarray(unfold_windows(jnp.asarray(x.transpose(0, 2, 3, 1)), k))  # (B, L, C*k*k)
    ref = numpy_unfold(x, k).transpose(0, 2, 1)
    np.testing.assert_array_equal(ours, ref)


def test_unfold_rejects_small_maps():
    with pytest.raises(ValueError, match="4x4 window does not fit a 3x3"):
        unfold_windows(jnp.zeros((1, 3, 3, 2)), 4)


def test_aie_matches_numpy_transcription():
    rng = np.random.default_rng(0)
    b, d, nw, h, w = 3, 16, 52, 14, 14
    g = rng.standard_normal((b, d, nw))  # G: B x D x W (PyTorch layout)
    local = rng.standard_normal((b, d, h, w))
    lflat = local.reshape(b, d, h * w)
    s = np.sqrt((g**2).sum(axis=(1, 2)))
    p = np.einsum("bdw,bwn->bdn", g, np.einsum("bdw,bdn->bwn", g, lflat)) / (s**2)[:, None, None]
    ref = (lflat - p).mean(axis=2)
    ours = aie_orthogonal(
        jnp.asarray(g.transpose(0, 2, 1), jnp.float32),
        jnp.asarray(local.transpose(0, 2, 3, 1), jnp.float32),
    )
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-5, atol=1e-5)
