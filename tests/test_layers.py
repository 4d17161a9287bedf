"""The CPU kernels' hand-written gradients agree with autodiff and PyTorch's rules, and both
kernel choices (``model.kernels``) compute the same layers."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_module
from flax import nnx

from csce_jax.errors import ConfigError
from csce_jax.models.cpu_kernels import (
    batch_norm_train,
    pointwise_matmul,
    pointwise_or_general_conv,
)
from csce_jax.models.layers import batch_norm_train_xla, max_pool_3x3_s2, resolve_kernels
from csce_jax.runtime import startup

DN = ("NHWC", "HWIO", "NHWC")


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.parametrize("cin,cout,stride", [(8, 32, 1), (32, 8, 1), (16, 24, 2), (12, 12, 2)])
def test_pointwise_conv_matches_lax_conv_and_its_gradients(cin, cout, stride):
    rng = np.random.default_rng(cin + cout + stride)
    x = jnp.asarray(rng.normal(size=(3, 7, 9, cin)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(1, 1, cin, cout)), jnp.float32)

    def ours(x, w):
        return pointwise_or_general_conv(x, w, (stride, stride), ((0, 0), (0, 0)))

    def ref(x, w):
        return jax.lax.conv_general_dilated(
            x, w, (stride, stride), ((0, 0), (0, 0)), dimension_numbers=DN
        )

    y, y_ref = ours(x, w), ref(x, w)
    assert y.shape == y_ref.shape
    assert _rel(y, y_ref) < 1e-5
    g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    dx, dw = jax.vjp(ours, x, w)[1](g)
    dx_ref, dw_ref = jax.vjp(ref, x, w)[1](g)
    assert _rel(dx, dx_ref) < 1e-5
    assert _rel(dw, dw_ref) < 1e-5


def test_non_pointwise_convs_go_to_lax_unchanged():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 4, 5)), jnp.float32)
    padding = ((1, 1), (1, 1))
    ours = pointwise_or_general_conv(x, w, (2, 2), padding, dimension_numbers=DN)
    ref = jax.lax.conv_general_dilated(x, w, (2, 2), padding, dimension_numbers=DN)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
    # a padded 1x1 conv is not a plain matmul either
    w1 = w[:1, :1]
    ours = pointwise_or_general_conv(x, w1, (1, 1), padding, dimension_numbers=DN)
    ref = jax.lax.conv_general_dilated(x, w1, (1, 1), padding, dimension_numbers=DN)
    assert ours.shape == (2, 10, 10, 5)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))


def test_pointwise_matmul_bf16_keeps_dtypes():
    x = jnp.ones((2, 3, 3, 4), jnp.bfloat16)
    w = jnp.ones((4, 6), jnp.bfloat16)
    y, vjp = jax.vjp(pointwise_matmul, x, w)
    dx, dw = vjp(jnp.ones_like(y))
    assert (y.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16,) * 3
    np.testing.assert_array_equal(np.asarray(dw, np.float32), np.full((4, 6), 18.0))


def _pool_reference(x: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's MaxPool2d(3, 2, 1) rule in numpy: -inf padding, gradient to the first max."""
    b, h, w, c = x.shape
    ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    y = np.empty((b, ho, wo, c), x.dtype)
    dx = np.zeros_like(x)
    for n in range(b):
        for i in range(ho):
            for j in range(wo):
                for ch in range(c):
                    best, where = -np.inf, None
                    for di in range(3):
                        for dj in range(3):
                            r, s = 2 * i - 1 + di, 2 * j - 1 + dj
                            if 0 <= r < h and 0 <= s < w and x[n, r, s, ch] > best:
                                best, where = x[n, r, s, ch], (r, s)
                    y[n, i, j, ch] = best
                    dx[n, where[0], where[1], ch] += g[n, i, j, ch]
    return y, dx


@pytest.mark.parametrize("kernels", ["cpu", "xla"])
@pytest.mark.parametrize("shape", [(2, 9, 9, 3), (1, 8, 7, 2), (1, 2, 3, 1)])
def test_max_pool_forward_and_first_max_gradient_with_ties(shape, kernels):
    rng = np.random.default_rng(sum(shape))
    # ReLU-like inputs: most windows hold ties (zeros), where the gradient rule matters
    x = np.maximum(rng.integers(-3, 3, shape), 0).astype(np.float32)
    pool = lambda v: max_pool_3x3_s2(v, kernels)  # noqa: E731
    y = pool(jnp.asarray(x))
    g = rng.normal(size=y.shape).astype(np.float32)
    dx = jax.vjp(pool, jnp.asarray(x))[1](jnp.asarray(g))[0]
    y_ref, dx_ref = _pool_reference(x, g)
    np.testing.assert_array_equal(np.asarray(y), y_ref)
    np.testing.assert_allclose(np.asarray(dx), dx_ref, atol=1e-6)
    flax_pool = nnx.max_pool(jnp.asarray(x), (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(flax_pool))


@pytest.mark.parametrize("kernels", ["cpu", "xla"])
def test_max_pool_gradient_matches_torch_with_ties(kernels):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    x = np.maximum(rng.integers(-2, 3, (2, 11, 10, 4)), 0).astype(np.float32)
    pool = lambda v: max_pool_3x3_s2(v, kernels)  # noqa: E731
    y = pool(jnp.asarray(x))
    g = rng.normal(size=y.shape).astype(np.float32)
    dx = jax.vjp(pool, jnp.asarray(x))[1](jnp.asarray(g))[0]
    xt = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    yt = torch.nn.functional.max_pool2d(xt, 3, 2, 1)
    yt.backward(torch.tensor(g.transpose(0, 3, 1, 2)))
    np.testing.assert_array_equal(np.asarray(y), yt.detach().numpy().transpose(0, 2, 3, 1))
    np.testing.assert_allclose(np.asarray(dx), xt.grad.numpy().transpose(0, 2, 3, 1), atol=1e-6)


def test_batch_norm_vjp_matches_autodiff_including_stat_cotangents():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 5, 3, 6)) * 3 + 1, jnp.float32)
    scale = jnp.asarray(rng.normal(size=6), jnp.float32)
    bias = jnp.asarray(rng.normal(size=6), jnp.float32)
    weights = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in (x.shape, (6,), (6,))]

    def objective(fn):
        return lambda x, s, b: sum(
            jnp.sum(o * w) for o, w in zip(fn(x, s, b), weights, strict=True)
        )

    ours = jax.grad(objective(lambda x, s, b: batch_norm_train(x, s, b, 1e-5)), (0, 1, 2))
    ref = jax.grad(objective(lambda x, s, b: batch_norm_train_xla(x, s, b, 1e-5)), (0, 1, 2))
    for got, want in zip(ours(x, scale, bias), ref(x, scale, bias), strict=True):
        assert _rel(got, want) < 1e-5
    # forward: the same numbers as the plain formula
    for got, want in zip(
        batch_norm_train(x, scale, bias, 1e-5),
        batch_norm_train_xla(x, scale, bias, 1e-5),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_auto_kernels_follow_the_default_backend(monkeypatch):
    assert resolve_kernels("auto") == "cpu"  # the tests run on the CPU backend
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert resolve_kernels("auto") == "xla"
    assert resolve_kernels("cpu") == "cpu" and resolve_kernels("xla") == "xla"
    with pytest.raises(ValueError, match="kernels must be one of"):
        resolve_kernels("triton")


def test_auto_kernels_follow_the_platform_a_program_is_compiled_for():
    assert resolve_kernels("auto", "tpu") == "xla"  # ahead of time for a TPU, on a CPU host
    assert resolve_kernels("auto", "gpu") == "xla"
    assert resolve_kernels("auto", "cpu") == "cpu"
    assert resolve_kernels("cpu", "tpu") == "cpu"  # asked for by name: kept


def test_the_cpu_kernels_get_their_xla_flag_only_on_gpu_hosts():
    off = startup.TRITON_GEMM_OFF
    assert startup.xla_flags_for("cpu", True, "") == off
    assert (
        startup.xla_flags_for("cpu", True, "--xla_dump_to=/tmp/x") == f"--xla_dump_to=/tmp/x {off}"
    )
    assert startup.xla_flags_for("cpu", True, "--xla_gpu_enable_triton_gemm=true") is None
    assert startup.xla_flags_for("cpu", False, "") is None  # a CPU or TPU host needs nothing
    assert startup.xla_flags_for("xla", True, "") is None
    assert startup.xla_flags_for("auto", True, "") is None


def test_the_flag_is_set_before_jax_starts_and_jax_runs_with_it():
    code = (
        "import os\n"
        "from csce_jax.runtime import startup\n"
        "from csce_jax.presets.default import get_config\n"
        "startup.gpu_present = lambda: True  # as on a GPU host\n"
        "c = get_config()\n"
        "c.model.kernels = 'cpu'\n"
        "startup.set_xla_flags(c)\n"
        "import jax.numpy as jnp\n"
        "print(os.environ['XLA_FLAGS'], float(jnp.ones(3).sum()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = run_module("-c", code, env=env)
    assert out.stdout.split() == [startup.TRITON_GEMM_OFF, "3.0"]


def test_a_gpu_backend_started_without_the_flag_is_refused(monkeypatch):
    from csce_jax.presets.default import get_config

    c = get_config()
    c.model.kernels = "cpu"
    jax.devices()  # the backends have started
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setattr(startup, "gpu_present", lambda: True)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # backends already started
    with pytest.raises(ConfigError, match="xla_gpu_enable_triton_gemm=false"):
        startup.set_xla_flags(c)
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    startup.set_xla_flags(c)  # on a CPU backend nothing is needed
    assert os.environ["XLA_FLAGS"] == ""


def test_a_tpu_host_gets_no_gpu_flag(monkeypatch):
    from csce_jax.presets.default import get_config

    c = get_config()
    c.model.kernels = "cpu"
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setattr(startup, "accelerator_present", lambda: True)  # /dev/accel0 or vfio
    monkeypatch.setattr(startup, "gpu_present", lambda: False)
    startup.set_xla_flags(c)
    assert os.environ["XLA_FLAGS"] == ""
