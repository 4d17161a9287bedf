"""A tiny model's train-mode forward/backward; BatchNorm statistics move in train mode only."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from csce_jax.hashing.loss import csce_loss


def _batch_stats(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.BatchStat))]


def test_train_mode_forward_backward_and_batch_stats(tiny_model):
    x = jax.random.normal(jax.random.key(0), (4, 128, 128, 3))
    labels = jnp.array([0, 3, 7, 3])
    before = _batch_stats(tiny_model)

    def loss_fn(model):
        out = model(x)
        return csce_loss(out.logits, out.codes, out.threshold, labels, 0.15)["loss"]

    loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(tiny_model)
    assert np.isfinite(float(loss))
    leaves = jax.tree.leaves(grads)
    assert all(np.all(np.isfinite(g)) for g in leaves)
    assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0
    assert np.abs(np.asarray(grads["backbone"]["conv1"]["kernel"])).sum() > 0
    after_train = _batch_stats(tiny_model)
    assert any(not np.array_equal(a, b) for a, b in zip(before, after_train, strict=True))

    tiny_model.eval()
    nnx.jit(lambda m, x: m(x))(tiny_model, x)
    after_eval = _batch_stats(tiny_model)
    for a, b in zip(after_train, after_eval, strict=True):
        np.testing.assert_array_equal(a, b)


def test_eval_mode_is_deterministic_per_example(tiny_model):
    tiny_model.eval()
    x = jax.random.normal(jax.random.key(1), (3, 128, 128, 3))
    forward = nnx.jit(lambda m, x: m(x).codes)
    full = forward(tiny_model, x)
    single = forward(tiny_model, x[1:2])
    np.testing.assert_allclose(np.asarray(full[1:2]), np.asarray(single), rtol=1e-5, atol=1e-6)


def test_centers_are_not_parameters(tiny_model):
    grads = nnx.jit(nnx.grad(lambda m: m(jnp.ones((2, 128, 128, 3))).logits.sum()))(tiny_model)
    assert "centers" not in grads
    assert tiny_model.centers[...].shape == (10, 16)
