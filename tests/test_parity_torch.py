"""Numerical parity with the PyTorch reference (csce_jax/bridge/reference.py) through the converter.

Skipped only where torch is absent; CI installs it (requirements-dev.txt).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

from csce_jax.bridge.reference import ReleaseNet, release_dsf, release_loss  # noqa: E402
from csce_jax.convert import (  # noqa: E402
    export_torch_state_dict,
    load_torch_state_dict,
    model_from_release,
    normalize_release_keys,
)
from csce_jax.hashing import binarize, hash_centers  # noqa: E402
from csce_jax.hashing.loss import LossOptions, csce_loss  # noqa: E402
from csce_jax.runs.optimizer import torch_rmsprop, with_frozen  # noqa: E402

BITS, CLASSES = 64, 100


def _randomize_batchnorm(net, seed):
    """Random affine BN parameters, then running statistics calibrated on random images, so that
    activations have the scale of a trained network (O(1), not the O(1000) of a raw init)."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    residual = {id(b.bn3) for b in net.modules() if hasattr(b, "bn3")}
    for m in bns:
        n = m.num_features
        # The last BN of a residual branch has small gammas in trained ResNets; with gammas
        # near 1 a random network amplifies rounding by ~1.4x per block.
        low, high = (0.05, 0.3) if id(m) in residual else (0.5, 1.5)
        m.weight.data = low + (high - low) * torch.rand(n, generator=g)
        m.bias.data = 0.1 * torch.randn(n, generator=g)
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 1.0
    net.train()
    with torch.no_grad():
        net(torch.randn(8, 3, 224, 224, generator=g))
    for m, mom in zip(bns, momenta, strict=True):
        m.momentum = mom
        # Channels a ReLU left (almost) dead get a variance floor, as in trained networks;
        # otherwise 1/sqrt(var + eps) magnifies float32 rounding a hundredfold.
        m.running_var.data.clamp_(min=0.05)


def _reference(width=1.0, depths=(3, 4, 6, 3), seed=0):
    torch.manual_seed(seed)
    centers = torch.tensor(hash_centers(CLASSES, BITS), dtype=torch.float32)
    net = ReleaseNet(centers, width=width, depths=depths)
    _randomize_batchnorm(net, seed)
    return net


def _state_dict(net):
    return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}


def _nchw_to_ours(name, a):
    if a.ndim == 4:
        return a.transpose(0, 2, 3, 1)
    if name == "windows":
        return a.transpose(0, 2, 1)
    return a


def _images(seed, batch=2, size=224):
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def full_size_reference():
    return _reference()


@pytest.mark.slow
@pytest.mark.parametrize("kernels", ["cpu", "xla"])
def test_eval_mode_parity_full_size(full_size_reference, kernels):
    net = full_size_reference
    model = model_from_release(_state_dict(net), kernels=kernels)
    net.eval()
    model.eval()
    x = _images(0)
    with torch.no_grad():
        ref = net(torch.from_numpy(x.transpose(0, 3, 1, 2)))
    ours = nnx.jit(lambda m, x: m.intermediates(x))(model, jnp.asarray(x))
    for name in ("f3", "f4", "f_local", "windows", "f_orth", "f_g", "f_e", "v", "t", "logits"):
        a = np.asarray(ours[name])
        b = _nchw_to_ours(name, ref[name].numpy())
        assert a.shape == b.shape, name
        err = np.abs(a - b).max()
        assert err <= 1e-4, f"{name}: max abs error {err:.3g}"
    # Binary codes: the release's evaluation encoding (raw v, 64-bit balance) bit for bit.
    codes_ref = release_dsf(ref["v"], ref["t"]).numpy()
    codes_ours = np.asarray(binarize(ours["v"], ours["t"], raw_eval_band=True, balance=32))
    np.testing.assert_array_equal(codes_ours, codes_ref)


@pytest.mark.parametrize("kernels", ["cpu", "xla"])
def test_train_mode_batchnorm_parity(kernels):
    net = _reference(width=0.25, depths=(1, 2, 1, 1), seed=1)
    model = model_from_release(_state_dict(net), kernels=kernels)
    net.train()
    x = _images(1, batch=4)
    with torch.no_grad():
        ref = net(torch.from_numpy(x.transpose(0, 3, 1, 2)))
    ours = nnx.jit(lambda m, x: m.intermediates(x))(model, jnp.asarray(x))
    for name in ("f3", "f4", "f_local", "f_e", "v", "logits"):
        err = np.abs(np.asarray(ours[name]) - _nchw_to_ours(name, ref[name].numpy())).max()
        assert err <= 1e-4, f"{name}: max abs error {err:.3g}"
    # Updated running statistics (PyTorch's unbiased running variance, per-module momentum).
    exported = export_torch_state_dict(model)
    sd = normalize_release_keys(_state_dict(net))
    stats = [k for k in sd if k.endswith(("running_mean", "running_var"))]
    assert len(stats) > 20
    for key in stats:
        np.testing.assert_allclose(exported[key], sd[key], rtol=1e-4, atol=1e-5, err_msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("kernels", ["cpu", "xla"])
def test_loss_gradients_and_one_rmsprop_step_parity(kernels):
    net = _reference(width=0.25, depths=(1, 1, 1, 1), seed=2)
    sd0 = _state_dict(net)
    model = model_from_release(sd0, kernels=kernels)
    net.train()
    x = _images(2, batch=4)
    labels = np.array([3, 17, 3, 99])
    margins = np.array([0.15, 0.02, 0.31, 0.2], np.float32)

    opt_t = torch.optim.RMSprop(
        [p for p in net.parameters() if p.requires_grad], lr=1e-5, weight_decay=1e-5
    )
    out = net(torch.from_numpy(x.transpose(0, 3, 1, 2)))
    loss_t, ce_t, q_t = release_loss(
        out["logits"], out["v"], torch.from_numpy(labels), out["t"], torch.from_numpy(margins)
    )
    opt_t.zero_grad()
    loss_t.backward()
    torch_grads = {
        k: (p.grad.numpy().copy() if p.grad is not None else np.zeros(tuple(p.shape), np.float32))
        for k, p in net.named_parameters()
    }
    assert not np.any(torch_grads["fc_t.weight"])  # the release's threshold head gets nothing
    opt_t.step()

    # The loss in float32 against the release's float32 run.
    losses = nnx.jit(_loss)(nnx.clone(model), x, labels, margins)
    np.testing.assert_allclose(float(losses["loss"]), loss_t.item(), rtol=1e-5)
    np.testing.assert_allclose(float(losses["ce"]), ce_t.item(), rtol=1e-5)
    np.testing.assert_allclose(float(losses["quant"]), q_t.item(), rtol=1e-5, atol=1e-7)

    # Gradients, tensor by tensor, both sides in float64: the same mathematics to 1e-7 of each
    # tensor's scale (seen: 5e-10 at most; this small net's BatchNorms amplify rounding). (In
    # float32 a pre-activation within ~1e-5 of zero may fall on either side of a ReLU depending
    # on the CPU's summation order; one such flip in layer4 moves every gradient upstream of it
    # by ~1e-3 of its scale on one machine and not on another, on either side of the port.)
    net64 = _reference(width=0.25, depths=(1, 1, 1, 1), seed=2).double().train()
    out64 = net64(torch.from_numpy(x.transpose(0, 3, 1, 2)).double())
    release_loss(
        out64["logits"],
        out64["v"],
        torch.from_numpy(labels),
        out64["t"],
        torch.from_numpy(margins).double(),
    )[0].backward()
    with jax.enable_x64(True):
        model64 = _as_float64(model)
        graphdef, params, rest = nnx.split(model64, nnx.Param, ...)

        def loss_fn(params, rest):
            m = nnx.merge(graphdef, params, rest, copy=True)
            losses = _loss(m, x.astype(np.float64), labels, margins.astype(np.float64))
            return losses["loss"], losses

        grads, losses64 = jax.jit(jax.grad(loss_fn, has_aux=True))(params, rest)
        assert losses64["loss"].dtype == jnp.float64
        ours_grad = export_torch_state_dict(_with_params(model64, grads))
    compared = 0
    for key, p in net64.named_parameters():
        if p.grad is None:
            continue
        g = p.grad.numpy()
        assert ours_grad[key].dtype == np.float64, key
        scale = np.abs(g).max()
        if scale < 1e-12:  # mathematically zero (a conv bias before train-mode BN)
            assert np.abs(ours_grad[key]).max() < 1e-12, key
            continue
        np.testing.assert_allclose(ours_grad[key] / scale, g / scale, atol=1e-7, err_msg=key)
        compared += 1
    assert compared > 40

    # The optimiser: our RMSprop on the release's gradients gives torch's parameters. (Fed our
    # own gradients, entries with |g| ~ 1e-9 may flip sign: RMSprop's first step is ~lr*sign(g).)
    grad_model = model_from_release({**normalize_release_keys(sd0), **torch_grads})
    grads_from_torch = nnx.state(grad_model, nnx.Param)
    tx = with_frozen(torch_rmsprop(1e-5, weight_decay=1e-5), ("threshold_fc",))
    params = nnx.state(model, nnx.Param)
    updates, _ = tx.update(grads_from_torch, tx.init(params), params)
    nnx.update(model, optax.apply_updates(params, updates))
    exported = export_torch_state_dict(model)
    checked = 0
    for key, p in normalize_release_keys(_state_dict(net)).items():
        if key.endswith(("running_mean", "running_var")):
            continue
        np.testing.assert_allclose(exported[key], p, rtol=1e-6, atol=1e-9, err_msg=key)
        checked += 1
    assert checked > 40


def _loss(model, x, labels, margins):
    """The release's loss on ``model``'s training-mode forward (as its training script calls it)."""
    o = model(jnp.asarray(x))
    return csce_loss(
        o.logits,
        o.codes,
        o.threshold,
        jnp.asarray(labels),
        jnp.asarray(margins),
        LossOptions(estimator="release", balance=32, clip_all_logits=True),
    )


def _as_float64(model):
    """A copy of ``model`` with every floating-point variable in float64 (under jax x64)."""
    clone = nnx.clone(model)
    state = nnx.state(clone)
    wide = jax.tree.map(
        lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, state
    )
    nnx.update(clone, wide)
    return clone


def _with_params(model, params):
    clone = nnx.clone(model)
    nnx.update(clone, params)
    return clone


def test_release_checkpoint_round_trip_and_aliases():
    net = _reference(width=0.25, depths=(1, 1, 1, 1), seed=3)
    sd = _state_dict(net)
    assert "input.0.weight" in sd and "input.4.0.conv1.weight" in sd
    model = model_from_release(sd)
    exported = export_torch_state_dict(model)
    canonical = normalize_release_keys(sd)
    assert set(exported) == set(canonical)
    for k, v in canonical.items():
        np.testing.assert_array_equal(exported[k], v, err_msg=k)
    # The duplicated spellings must agree.
    bad = dict(sd)
    bad["input.4.0.conv1.weight"] = bad["input.4.0.conv1.weight"] + 1
    with pytest.raises(ValueError, match=r"layer1\.0\.conv1\.weight"):
        normalize_release_keys(bad)


def test_bad_state_dicts_name_every_key():
    net = _reference(width=0.25, depths=(1, 1, 1, 1), seed=4)
    sd = _state_dict(net)
    model = model_from_release(sd)
    before = export_torch_state_dict(model)
    bad = dict(sd)
    del bad["fc_t.bias"]
    bad["extra.weight"] = np.zeros(3, np.float32)
    bad["fc.weight"] = np.zeros((5, 5), np.float32)
    bad["layer4.0.conv1.weight"] = bad["layer4.0.conv1.weight"] * 2
    with pytest.raises(ValueError) as err:
        load_torch_state_dict(model, bad)
    msg = str(err.value)
    assert "missing keys: fc_t.bias" in msg
    assert "unknown keys: extra.weight" in msg
    assert "fc.weight: checkpoint (5, 5)" in msg
    # Nothing was loaded half-way.
    after = export_torch_state_dict(model)
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])
