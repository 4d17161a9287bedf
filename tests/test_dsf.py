"""The dynamic sign function: table cases of docs/model.md and the STE's gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from csce_jax.hashing import balance_fill, binarize, dynamic_sign, squash


def _codes(v, t, **kw):
    return np.asarray(dynamic_sign(jnp.asarray(v, jnp.float32), jnp.asarray(t, jnp.float32), **kw))


@pytest.mark.parametrize("estimator", ["ste", "release"])
def test_band_is_filled(estimator):
    v = [[0.5, -0.005, 0.003, -0.7]]
    # 2 of 4 positive: not more than half, so the fill is +1.
    np.testing.assert_array_equal(_codes(v, [[0.01]], estimator=estimator), [[1, 1, 1, -1]])
    # Boundary values are outside the open band (-t, t).
    np.testing.assert_array_equal(_codes([[0.01, -0.01, 0.2, -0.3]], [[0.01]]), [[1, -1, 1, -1]])


@pytest.mark.parametrize(
    ("bits", "positives", "fill"),
    [(12, 7, -1), (12, 6, 1), (48, 25, -1), (48, 24, 1), (64, 33, -1), (64, 32, 1)],
)
def test_fill_rule_uses_half_of_k(bits, positives, fill):
    v = np.full((1, bits), -0.5, np.float32)
    v[0, :positives] = 0.5
    v[0, -1] = -0.001  # one entry in the band, not counted as positive
    codes = _codes(v, [[0.01]])
    assert codes[0, -1] == fill
    assert np.asarray(balance_fill(jnp.asarray(v)))[0, 0] == fill
    np.testing.assert_array_equal(codes[0, :-1], np.sign(v[0, :-1]))


def test_release_balance_constant_differs_at_48_bits():
    v = np.full((1, 48), -0.5, np.float32)
    v[0, :25] = 0.5
    v[0, -1] = 0.0001
    assert _codes(v, [[0.01]])[0, -1] == -1  # ours: 26 > 24 positives
    assert _codes(v, [[0.01]], balance=32)[0, -1] == 1  # the release's "> 32"


def test_nonpositive_threshold_is_plain_sign():
    v = [[0.004, -0.002, 0.3, -0.1]]
    for t in (0.0, -0.005):
        np.testing.assert_array_equal(_codes(v, [[t]]), [[1, -1, 1, -1]])


def test_zeros_become_fill_never_zero():
    v = np.array([[0.0, 0.0, 0.7, 0.2, 0.9]], np.float32)  # 3 of 5 positive -> fill -1
    for t in (0.0, 0.01, -1.0):
        codes = _codes(v, [[t]])
        np.testing.assert_array_equal(codes, [[-1, -1, 1, 1, 1]])
    assert set(np.unique(_codes(np.zeros((3, 8)), np.zeros((3, 1))))) <= {-1.0, 1.0}


def test_ste_forward_equals_release_forward():
    rng = np.random.default_rng(0)
    v = rng.uniform(-0.05, 0.05, (16, 32)).astype(np.float32)
    t = rng.uniform(-0.01, 0.03, (16, 1)).astype(np.float32)
    np.testing.assert_array_equal(_codes(v, t, estimator="ste"), _codes(v, t, estimator="release"))


def test_ste_gradients_reach_v_and_t():
    rng = np.random.default_rng(1)
    v = jnp.asarray(rng.uniform(-0.05, 0.05, (4, 16)), jnp.float32)
    t = jnp.full((4, 1), 0.01, jnp.float32)
    w = jnp.asarray(rng.standard_normal((4, 16)), jnp.float32)

    def f(v, t, estimator):
        return jnp.sum(w * dynamic_sign(v, t, estimator))

    gv, gt = jax.grad(f, argnums=(0, 1))(v, t, "ste")
    assert np.all(np.isfinite(gv)) and np.all(np.isfinite(gt))
    assert np.count_nonzero(np.asarray(gv)) > 0
    assert np.all(np.asarray(gt) != 0)
    gv_r, gt_r = jax.grad(f, argnums=(0, 1))(v, t, "release")
    assert not np.any(np.asarray(gv_r)) and not np.any(np.asarray(gt_r))


def _soft_numpy(v, t, tau=0.1):
    """The STE's soft relaxation with fill and sign(v) held fixed at (v0, t0) (numpy, float64)."""

    def soft(v, t, sign, fill):
        m = 1.0 / (1.0 + np.exp(-(np.abs(v) - t) / tau))
        return sign + (1.0 - m) * (fill - sign)

    sign = np.where(v >= 0, 1.0, -1.0)
    fill = np.where((v > 0).sum(-1, keepdims=True) > v.shape[-1] / 2, -1.0, 1.0)
    return lambda vv, tt: soft(vv, tt, sign, fill), sign, fill


def _ste_case():
    rng = np.random.default_rng(2)
    v = rng.uniform(-0.3, 0.3, (3, 12))
    v[np.abs(v) < 0.02] = 0.05  # keep away from the kink of |v| at 0
    t = rng.uniform(0.0, 0.2, (3, 1))
    w = rng.standard_normal((3, 12))
    return v, t, w


def test_ste_gradients_equal_the_closed_form():
    v, t, w = _ste_case()
    tau = 0.1
    gv, gt = jax.grad(
        lambda a, b: jnp.sum(jnp.asarray(w) * dynamic_sign(a, b, "ste", temperature=tau)),
        argnums=(0, 1),
    )(jnp.asarray(v, jnp.float32), jnp.asarray(t, jnp.float32))
    _, sign, fill = _soft_numpy(v, t, tau)
    m = 1.0 / (1.0 + np.exp(-(np.abs(v) - t) / tau))
    ds_dt = m * (1 - m) / tau * (fill - sign)
    ds_dv = -sign * m * (1 - m) / tau * (fill - sign)
    np.testing.assert_allclose(np.asarray(gv), w * ds_dv, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(gt), np.sum(w * ds_dt, axis=-1, keepdims=True), rtol=1e-4, atol=1e-6
    )
    assert np.count_nonzero(ds_dv) > 5  # the case exercises entries whose sign differs from fill


def test_ste_gradients_equal_a_finite_difference_of_the_soft_relaxation():
    v, t, w = _ste_case()
    soft, _, _ = _soft_numpy(v, t)
    gv, gt = jax.grad(
        lambda a, b: jnp.sum(jnp.asarray(w) * dynamic_sign(a, b, "ste")), argnums=(0, 1)
    )(jnp.asarray(v, jnp.float32), jnp.asarray(t, jnp.float32))
    h = 1e-6
    fd_t = np.sum(w * (soft(v, t + h) - soft(v, t - h)), axis=-1, keepdims=True) / (2 * h)
    fd_v = w * (soft(v + h, t) - soft(v - h, t)) / (2 * h)
    np.testing.assert_allclose(np.asarray(gt), fd_t, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gv), fd_v, rtol=1e-3, atol=1e-5)
    # Raising t pulls an entry whose sign differs from the fill into the band: its code moves
    # toward the fill (fill +1 here, v = -0.012 just outside t = 0.01).
    one = jnp.asarray([[-0.012, -0.5, -0.5, -0.5]], jnp.float32)
    assert float(jax.grad(lambda b: dynamic_sign(one, b)[0, 0])(jnp.asarray([[0.01]]))[0, 0]) > 0


def test_binarize_uses_one_band_definition():
    v = jnp.asarray([[0.008, -0.3, 0.4, 0.6]], jnp.float32)  # 3 of 4 positive: fill -1
    t = jnp.asarray([[0.01]], jnp.float32)
    # squash doubles small values: 0.016 is outside the band -> +1 (ours, as in training).
    np.testing.assert_array_equal(np.asarray(binarize(v, t)), [[1, -1, 1, 1]])
    # The release bands raw v at evaluation: 0.008 is inside -> fill -1.
    np.testing.assert_array_equal(np.asarray(binarize(v, t, raw_eval_band=True)), [[-1, -1, 1, 1]])
    np.testing.assert_allclose(
        np.asarray(squash(jnp.asarray([-2.0, -0.2, 0.3, 1.0]))), [-1.0, -0.4, 0.6, 1.0], rtol=1e-6
    )


def test_bad_estimator_is_named():
    with pytest.raises(ValueError, match="'sigmoid'"):
        dynamic_sign(jnp.ones((1, 4)), jnp.zeros((1, 1)), "sigmoid")
