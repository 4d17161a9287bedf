"""Loss values against numpy transcriptions of the loss in docs/model.md, for fixed margins."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from csce_jax.hashing.dsf import balance_fill
from csce_jax.hashing.loss import LossOptions, csce_loss, elastic_margins, margin_logits

RNG = np.random.default_rng(0)
B, C, K = 6, 5, 16
LOGITS = RNG.uniform(-0.95, 0.95, (B, C)).astype(np.float32)
LOGITS[0, 1] = 0.999999  # beyond the arc clip
V = RNG.normal(0, 0.4, (B, K)).astype(np.float32)
V[1, :3] = [0.003, -0.002, 0.0]  # entries in the DSF band
T = np.full((B, 1), 0.01, np.float32)
LABELS = np.array([1, 0, 4, 2, 2, 3])
MARGINS = np.array([0.15, 0.3, -0.05, 0.1, 0.2, 0.0], np.float32)


def np_log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def np_dsf(u, t):
    out = np.sign(u)
    for i in range(len(u)):
        fill = -1.0 if (u[i] > 0).sum() > u.shape[1] / 2 else 1.0
        band = ((u[i] < t[i]) & (u[i] > -t[i])) | (u[i] == 0)
        out[i, band] = fill
    return out


def np_quant(v, t, kind):
    u = 2 * np.clip(v.astype(np.float64), -0.5, 0.5)
    b = np_dsf(u, t)
    if kind == "cs":
        return np.mean(1 - (u * b).sum(1) / (np.linalg.norm(u, axis=1) * np.linalg.norm(b, axis=1)))
    if kind == "l1":
        return np.mean(np.abs(u - b))
    return np.mean((u - b) ** 2)


@pytest.mark.parametrize("clip_all", [False, True])
@pytest.mark.parametrize("margin_type", ["arc", "cos"])
@pytest.mark.parametrize("quan_type", ["cs", "l1", "l2"])
def test_single_label_loss_matches_numpy(margin_type, quan_type, clip_all):
    x = LOGITS.astype(np.float64)
    onehot = np.eye(C)[LABELS]
    m = MARGINS[:, None] * onehot
    if margin_type == "arc":
        arc = np.cos(np.arccos(np.clip(x, -0.99999, 0.99999)) + m)
        z = 10 * (arc if clip_all else np.where(onehot > 0, arc, x))
    else:
        z = 10 * (x - m)
    ce = -np.mean(np_log_softmax(z)[np.arange(B), LABELS])
    q = np_quant(V, T, quan_type)
    out = csce_loss(
        jnp.asarray(LOGITS),
        jnp.asarray(V),
        jnp.asarray(T),
        jnp.asarray(LABELS),
        jnp.asarray(MARGINS),
        LossOptions(
            margin_type=margin_type,
            quan_type=quan_type,
            clip_all_logits=clip_all,
            estimator="release",
        ),
    )
    np.testing.assert_allclose(float(out["ce"]), ce, rtol=1e-5)
    np.testing.assert_allclose(float(out["quant"]), q, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(out["loss"]), ce + q, rtol=1e-5)


@pytest.mark.parametrize("kind", ["label_smoothing", "bce"])
def test_multi_label_loss_matches_numpy(kind):
    labels = (RNG.random((B, C)) < 0.4).astype(np.float32)
    labels[0] = 0
    labels[0, 2] = 1
    x = LOGITS.astype(np.float64)
    arc = np.cos(np.arccos(np.clip(x, -0.99999, 0.99999)) + 0.2 * labels)
    z = 10 * np.where(labels > 0, arc, x)
    if kind == "label_smoothing":
        ce = -np.mean((labels / labels.sum(1, keepdims=True) * np_log_softmax(z)).sum(1))
    else:
        p = 1 / (1 + np.exp(-z))
        ce = -np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    out = csce_loss(
        jnp.asarray(LOGITS),
        jnp.asarray(V),
        jnp.asarray(T),
        jnp.asarray(labels),
        0.2,
        LossOptions(multilabel=True, multilabel_loss=kind, quan_weight=0.0),
    )
    np.testing.assert_allclose(float(out["ce"]), ce, rtol=1e-5)
    assert float(out["quant"]) == 0.0


def test_fixed_fill_rule_in_numpy_reference_matches_library():
    np.testing.assert_array_equal(
        np.asarray(balance_fill(jnp.asarray(V)))[:, 0],
        [(-1.0 if (row > 0).sum() > K / 2 else 1.0) for row in V],
    )


def test_elastic_margins_are_reproducible_and_distributed():
    key = jax.random.key(3)
    a = elastic_margins(key, 20000, 0.15, 0.125)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(elastic_margins(key, 20000, 0.15)))
    assert abs(float(a.mean()) - 0.15) < 0.005 and abs(float(a.std()) - 0.125) < 0.005


def test_ste_quantisation_sends_gradient_to_threshold():
    def quant(t, estimator):
        return csce_loss(
            jnp.asarray(LOGITS),
            jnp.asarray(V),
            t,
            jnp.asarray(LABELS),
            jnp.asarray(MARGINS),
            LossOptions(estimator=estimator),
        )["quant"]

    g_ste = jax.grad(quant)(jnp.asarray(T), "ste")
    g_rel = jax.grad(quant)(jnp.asarray(T), "release")
    assert np.all(np.isfinite(g_ste)) and np.any(np.asarray(g_ste) != 0)
    assert not np.any(np.asarray(g_rel))


def test_bad_margin_type_is_named():
    with pytest.raises(ValueError, match="'angle'"):
        margin_logits(jnp.zeros((1, 2)), jnp.ones((1, 2)), 0.1, margin_type="angle")


def test_csce_loss_takes_typed_options():
    """Six parameters: the arrays and one frozen options object, whose fields change the loss."""
    import inspect

    assert len(inspect.signature(csce_loss).parameters) == 6
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.uniform(-1, 1, (6, 5)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(6, 16)), jnp.float32)
    t = jnp.asarray(rng.normal(size=(6, 1)) * 0.1, jnp.float32)
    labels = jnp.asarray([0, 1, 2, 3, 4, 0])
    options = LossOptions(scale=5.0, quan_type="l1", quan_weight=0.5, margin_type="cos")
    typed = csce_loss(logits, v, t, labels, 0.2, options)
    default = csce_loss(logits, v, t, labels, 0.2)
    assert float(typed["loss"]) != float(default["loss"])
    with pytest.raises(TypeError):
        csce_loss(logits, v, t, labels, 0.2, scale=5.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.scale = 1.0


def test_the_step_options_come_from_the_config():
    from csce_jax.presets.default import get_config
    from csce_jax.runs import builders

    c = get_config()
    c.loss.margin, c.loss.scale, c.model.remat, c.seed = 0.3, 12.0, True, 5
    o = builders.step_options(c, multilabel=True)
    assert (o.seed, o.margin, o.remat) == (5, 0.3, True)
    assert o.loss.multilabel and o.loss.scale == 12.0 and o.loss.estimator == c.dsf.estimator
