"""The PyTorch bridge: exports the release loads, the side-by-side comparison, the public API."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from conftest import run_module
from flax import nnx

import csce_jax
from csce_jax.convert import (
    convert_file,
    flat_arrays,
    load_torch_state_dict,
    release_state_dict,
    write_state_file,
)
from csce_jax.data.digits import digits_sources
from csce_jax.errors import ConversionError
from csce_jax.hashing import binarize, hash_centers
from csce_jax.models import CSCENet
from csce_jax.retrieval import metrics
from csce_jax.runs.reader import RunReader


def _model(seed=0, classes=10, bits=64):
    return CSCENet(
        hash_centers(classes, bits),
        image_size=112,
        width=1 / 16,
        depths=(1, 1, 1, 1),
        rngs=nnx.Rngs(seed),
    )


@pytest.mark.slow
def test_a_pt_export_loads_strictly_into_the_release_network_and_gives_its_codes(tmp_path):
    torch = pytest.importorskip("torch")
    from csce_jax.bridge.reference import ReleaseNet, release_dsf

    model = _model(seed=1)
    write_state_file(flat_arrays(model), tmp_path / "ours.safetensors")
    convert_file("jax-to-torch", str(tmp_path / "ours.safetensors"), str(tmp_path / "net.pt"))
    state_dict = torch.load(tmp_path / "net.pt")  # the release's own loading: weights_only
    assert any(k.startswith("input.4.") for k in state_dict)
    assert state_dict["bn1.num_batches_tracked"].dtype == torch.int64
    net = ReleaseNet(
        state_dict["ce_fc.centroids"], width=1 / 16, depths=(1, 1, 1, 1), num_windows=10
    )
    net.load_state_dict(state_dict, strict=True)
    net.eval()
    images = np.random.default_rng(0).normal(size=(3, 112, 112, 3)).astype(np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(images.transpose(0, 3, 1, 2)))
    model.eval()
    ours = model(images)
    np.testing.assert_allclose(np.asarray(ours.codes), ref["v"].numpy(), atol=1e-4)
    codes_ref = release_dsf(ref["v"], ref["t"]).numpy()
    codes = binarize(ours.codes, ours.threshold, raw_eval_band=True, balance=32)
    np.testing.assert_array_equal(np.asarray(codes), codes_ref)


def test_exports_refuse_unknown_suffixes(tmp_path):
    write_state_file(flat_arrays(_model()), tmp_path / "ours.safetensors")
    for direction, dst in (
        ("jax-to-torch", "x.npz"),
        ("jax-to-torch", "x.bin"),
        ("torch-to-jax", "x.pt"),
    ):
        with pytest.raises(ConversionError, match="unknown output format"):
            convert_file(direction, str(tmp_path / "ours.safetensors"), str(tmp_path / dst))
    out = run_module(
        "-m",
        "csce_jax.commands.convert",
        "jax-to-torch",
        "--src",
        str(tmp_path / "ours.safetensors"),
        "--dst",
        str(tmp_path / "back.ckpt"),
    )
    assert out.returncode == 1 and out.stderr.strip().startswith("error: --dst")
    assert "Traceback" not in out.stderr


def test_a_transposed_key_is_reported_in_pytorch_layout():
    model = _model()
    sd = release_state_dict(model)
    sd["fc.weight"] = sd["fc.weight"].T.copy()  # (64, 128) stored as (128, 64)
    with pytest.raises(
        ConversionError, match=r"fc.weight: checkpoint \(128, 64\), model wants \(64, 128\)"
    ):
        load_torch_state_dict(_model(seed=3), sd)


def test_load_model_and_encode_give_eval_py_codes(trained_run, tmp_path):
    if not (trained_run / "eval" / "query_codes.npy").exists():
        out = run_module("eval.py", "--workdir", str(trained_run), "--export_codes")
        assert out.returncode == 0, out.stderr[-2000:]
    expected = metrics.unpack_codes(np.load(trained_run / "eval" / "query_codes.npy"), 64)
    _, query = digits_sources()
    images = [query[i]["image"] for i in range(len(query))]
    model = csce_jax.load_model(trained_run)
    assert model.bits == 64 and model.centers.shape == (10, 64) and model.step == 3
    codes = csce_jax.encode(model, images, batch_size=128)
    assert codes.dtype == np.int8 and set(np.unique(codes)) <= {-1, 1}
    np.testing.assert_array_equal(codes, expected)
    # The same weights as a converted file encode the same (a 224-free, 112 px model).
    with RunReader(trained_run) as run:
        restored = run.weights(run.config())
    write_state_file(flat_arrays(restored.model()), tmp_path / "model.safetensors")
    from_file = csce_jax.load_model(tmp_path / "model.safetensors")
    assert (from_file.crop, from_file.resize) == (112, 128)
    np.testing.assert_array_equal(
        csce_jax.encode(from_file, images[:20], batch_size=8), expected[:20]
    )
    with pytest.raises(ValueError, match="expected uint8"):
        csce_jax.encode(model, [np.zeros((8, 8), np.float32)])


@pytest.mark.slow
def test_compare_torch_trains_both_sides_on_the_same_batches(tmp_path):
    pytest.importorskip("torch")
    out = run_module(
        "-m",
        "csce_jax.commands.compare",
        "--config",
        "configs/default.py",
        "--steps",
        "3",
        "--workdir",
        str(tmp_path),
        "--config.eval_batch_size=256",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 3
    # Float32 rounding grows step by step (docs/results.md), but three steps stay close.
    assert summary["max_loss_rel_diff"] < 1e-4
    assert abs(summary["map_jax"] - summary["map_torch"]) < 0.01
    assert summary["code_bits_differing"] < 0.01 * summary["code_bits_total"]
    # The rounding floor: PyTorch float32 against float64, on the same run.
    assert summary["floor"] == "both" and summary["within_floor"] is True
    assert abs(summary["map_torch64"] - summary["map_torch"]) < 0.01
    assert abs(summary["map_torch_nudged"] - summary["map_torch"]) < 0.01
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert [r["step"] for r in saved["steps"]] == [1, 2, 3]
    assert saved["steps"][0]["loss_rel_diff"] < 1e-5
    assert {"loss_floor", "loss_jax_vs_torch64", "loss_nudged_floor"} <= set(saved["steps"][0])
    assert (tmp_path / "loss_curves.png").stat().st_size > 1000


def test_floor_verdict_and_release_size_check():
    """The median gap within 3x the larger median floor (never below float32's 1e-5) passes,
    whatever one step does; beyond, it fails and names the series. A non-release-size config
    names the flags to change."""
    from csce_jax.bridge import compare as ct
    from csce_jax.bridge import sides
    from csce_jax.errors import ConfigError
    from csce_jax.presets.default import get_config

    def rows(gaps, floor64=1e-4, nudged=None, others=1e-4):
        out = []
        for step, gap in enumerate(gaps, 1):
            r = {"step": step}
            for k in ct.SERIES:
                r[f"{k}_rel_diff"] = gap if k == "quant" else others
                r[f"{k}_floor"] = floor64
                if nudged is not None:
                    r[f"{k}_nudged_floor"] = nudged
            out.append(r)
        return out

    ok = ct.floor_verdict(rows((5e-3, 1e-4, 2e-4, 1e-4, 3e-4)))  # one jump at step 1
    assert ok["within_floor"] and ok["median_gap_over_floor"]["quant"] == pytest.approx(2.0)
    bad = ct.floor_verdict(rows((5e-4, 4e-4, 6e-4)))
    assert not bad["within_floor"] and bad["worst_series"] == "quant"
    # The larger floor counts (here the nudged run's), and float32's tolerance bounds it below.
    assert ct.floor_verdict(rows((5e-4, 4e-4, 6e-4), nudged=2e-4))["within_floor"]
    tiny = ct.floor_verdict(rows((2e-6, 3e-6, 1e-6), floor64=1e-8, nudged=1e-9, others=1e-6))
    assert tiny["within_floor"] and tiny["median_gap_over_floor"]["quant"] == pytest.approx(0.2)
    with pytest.raises(ConfigError, match=r"--config.model.width=1.0 .*--config.data.crop=224"):
        sides.check_release_size(get_config())


def test_compare_torch_starts_from_a_run_folder_through_the_run_reader(trained_run):
    from csce_jax.bridge import sides
    from csce_jax.config import release_training

    with RunReader(trained_run) as run:
        config = release_training(run.config())
        restored = run.weights(config)
    setup = sides.initial_state(config, 10, str(trained_run))
    got = jax.tree.leaves((setup.state["params"], setup.state["rest"]))
    want = jax.tree.leaves(restored.pair)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _side(scale=1.0, fc_t=0.0, seed=0):
    """A synthetic side of the gradient comparison: float64 values, optionally perturbed."""
    from csce_jax.bridge.gradients import SidePoint

    rng = np.random.default_rng(seed)
    base = np.random.default_rng(99)
    names = ["conv1.weight", "fc.weight"] + [f"layer1.0.conv{i}.weight" for i in (1, 2, 3)]
    grads = {
        n: base.normal(size=(4, 3)) * (1 + scale * 1e-6 * rng.normal(size=(4, 3))) for n in names
    }
    grads["fc_t.weight"] = np.full((1, 3), fc_t)
    same = {n: g.copy() for n, g in grads.items()}
    output = {"loss": np.float64(1.0), "v": base.normal(size=(2, 8)), "t": np.full((2, 1), 0.01)}
    return SidePoint(gradient=grads, update=same, statistic={}, output=output)


def test_gradient_verdict_judges_group_medians_against_pytorch_float32():
    """A group passes while its median error is within 2x PyTorch float32's (one tensor far
    worse is an excursion, named with its worst channel, not a failure); a group whose median
    is far worse fails; a gradient where float64 has none fails at once."""
    from csce_jax.bridge.gradients import compare_point

    exact = _side(scale=0.0)
    torch32 = _side(scale=50.0, seed=1)
    ours = _side(scale=50.0, seed=2)
    point = compare_point(ours, torch32, exact)
    assert point["ok"] and point["failed_groups"] == []
    assert point["groups"]["gradient/stage1"]["tensors"] == 3
    # One tensor 1000x worse in one channel: listed, explained, not failed (its group has three).
    ours.gradient["layer1.0.conv1.weight"][2] *= 1 + 1e-3
    point = compare_point(ours, torch32, exact)
    (exc,) = [e for e in point["excursions"] if e["kind"] == "gradient"]
    assert exc["name"] == "layer1.0.conv1.weight" and exc["excursion"]["worse"] == "ours"
    assert exc["excursion"]["channel"] == 2 and exc["excursion"]["share"] > 0.9
    assert point["groups"]["gradient/stage1"]["ok"]
    # Most of the stage far worse: its median fails.
    ours.gradient["layer1.0.conv2.weight"] *= 1 + 1e-3
    point = compare_point(ours, torch32, exact)
    assert not point["ok"] and point["failed_groups"] == ["gradient/stage1"]
    # A gradient let through where the release has none.
    point = compare_point(_side(scale=50.0, seed=2, fc_t=1e-3), torch32, exact)
    assert not point["ok"] and point["gradient_flow_mismatch"] == ["fc_t.weight"]


@pytest.mark.slow
def test_compare_gradients_passes_the_port_at_two_points(tmp_path):
    pytest.importorskip("torch")
    out = run_module(
        "-m",
        "csce_jax.commands.compare",
        "--gradients",
        "--config",
        "configs/default.py",
        "--config.batch_size=8",
        "--workdir",
        str(tmp_path),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["mode"] == "gradients" and summary["points"] == 2
    assert summary["port_ok"] is True, summary
    assert summary["failed"] == [] and summary["gradient_flow_mismatch"] == []
    # Our float32 gradient is no further from float64 than PyTorch's own float32 (a margin).
    assert all(r < 2.0 for r in summary["whole_gradient_ratio"])
    report = json.loads((tmp_path / "gradients.json").read_text())
    names = {t["name"] for t in report["points"][0]["tensors"] if t["kind"] == "gradient"}
    assert {"conv1.weight", "layer4.0.conv3.weight", "localmodel.conv1.weight"} <= names
    assert {"conv_last.weight", "fc.weight", "fc_t.weight"} <= names
    groups = report["points"][1]["groups"]
    assert {"gradient/stem", "update/heads", "statistic/stage4", "output/loss and codes"} <= set(
        groups
    )
    assert (tmp_path / "gradients.png").stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.parametrize("error", ["batchnorm_without_epsilon", "threshold_estimator"])
def test_compare_gradients_flags_a_planted_porting_error(tmp_path, monkeypatch, error):
    """A BatchNorm whose variance lacks the epsilon, or the loss reaching v through the DSF's
    surrogate (the release stops it): the port is failed, by whole groups of gradients."""
    pytest.importorskip("torch")
    from csce_jax.bridge.gradients import compare_gradients
    from csce_jax.models import layers
    from csce_jax.presets.default import get_config
    from csce_jax.runs import builders

    if error == "batchnorm_without_epsilon":
        init = layers.BatchNorm.__init__

        def without_epsilon(self, *args, **kwargs):
            init(self, *args, **{**kwargs, "epsilon": 0.0})

        monkeypatch.setattr(layers.BatchNorm, "__init__", without_epsilon)
    else:
        options = builders.loss_options
        monkeypatch.setattr(
            builders,
            "loss_options",
            lambda c, m: dataclasses.replace(options(c, m), estimator="ste"),
        )
    config = get_config()
    config.batch_size = 8
    summary = compare_gradients(config, str(tmp_path), points=1)
    assert summary["port_ok"] is False
    assert "initial weights: gradient/stage3" in summary["failed"]
    assert min(summary["whole_gradient_ratio"]) > 10
