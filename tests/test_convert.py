"""The converter's files and command line, and model.init_from (no network, torch optional)."""

import hashlib
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT
from flax import nnx

from csce_jax.commands.convert import main as convert_main
from csce_jax.convert import (
    ConversionError,
    export_torch_state_dict,
    flat_arrays,
    normalize_release_keys,
    pretrained,
    read_state_file,
    write_state_file,
)
from csce_jax.hashing import hash_centers
from csce_jax.models import CSCENet

TINY = {"width": 1 / 16, "depths": (1, 2, 1, 1)}


def _model(seed=0, classes=10, bits=16, **kw):
    return CSCENet(
        hash_centers(classes, bits, seed=seed),
        image_size=224,
        rngs=nnx.Rngs(seed),
        **{**TINY, **kw},
    )


def _assert_same(a, b, only=None):
    fa, fb = flat_arrays(a), flat_arrays(b)
    keys = [k for k in fa if only is None or k.startswith(only)]
    assert keys
    for k in keys:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def test_cli_round_trip_without_torch(tmp_path):
    model = _model(seed=1)
    torch_layout = tmp_path / "release.safetensors"
    write_state_file(export_torch_state_dict(model), torch_layout)
    ours = tmp_path / "ours.safetensors"
    back = tmp_path / "back.safetensors"
    for args in (
        ["torch-to-jax", "--src", str(torch_layout), "--dst", str(ours)],
        ["jax-to-torch", "--src", str(ours), "--dst", str(back)],
    ):
        convert_main(args)  # the command line's own entry (its error path: test_bridge)
    restored = _model(seed=2)
    pretrained.initialize_from(restored, str(ours))
    _assert_same(model, restored)
    exported, again = read_state_file(torch_layout), read_state_file(back)
    # The export is the release's full layout: the input.* copies and BN counters besides.
    assert set(again) - set(exported) and set(normalize_release_keys(again)) == set(exported)
    assert sum(k.endswith("num_batches_tracked") for k in again) == sum(
        k.endswith("running_var") for k in again
    )
    for k in exported:
        np.testing.assert_array_equal(exported[k], again[k], err_msg=k)


def test_cli_reports_bad_files(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x00" * 40)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "csce_jax.commands.convert",
            "torch-to-jax",
            "--src",
            str(bad),
            "--dst",
            str(tmp_path / "x.safetensors"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (
        out.returncode != 0 and "cannot read" in out.stderr and "broken.safetensors" in out.stderr
    )
    assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        read_state_file(tmp_path / "missing.pth")


def test_init_from_torchvision_layout_loads_the_backbone_only(tmp_path):
    source = _model(seed=3)
    sd = {
        k: v
        for k, v in export_torch_state_dict(source).items()
        if not k.startswith(("localmodel", "conv_f4", "conv_last", "fc", "ce_fc"))
    }
    sd["fc.weight"] = np.zeros((1000, 128), np.float32)  # torchvision's ImageNet classifier
    sd["fc.bias"] = np.zeros(1000, np.float32)
    path = tmp_path / "resnet50.safetensors"
    write_state_file(sd, path)
    target = _model(seed=4, classes=7, bits=12)
    before = flat_arrays(target)
    # A whole model is asked for by default: refused, nothing loaded, the fix named.
    with pytest.raises(ConversionError, match=r"(?s)missing keys: ce_fc.*init_scope=backbone"):
        pretrained.initialize_from(target, str(path))
    for k, v in flat_arrays(target).items():
        np.testing.assert_array_equal(v, before[k])
    assert pretrained.initialize_from(target, str(path), scope="backbone") == "backbone"
    _assert_same(source, target, only="backbone/")
    np.testing.assert_array_equal(flat_arrays(target)["hash_fc/kernel"], before["hash_fc/kernel"])


def test_init_from_converted_file_with_other_bits_is_all_or_nothing(tmp_path):
    source = _model(seed=5, classes=10, bits=16)
    path = tmp_path / "converted.safetensors"
    write_state_file(flat_arrays(source), path)
    target = _model(seed=6, classes=30, bits=48)
    before = flat_arrays(target)
    with pytest.raises(ConversionError, match=r"(?s)mis-shaped: .*hash_fc/kernel.*init_scope"):
        pretrained.initialize_from(target, str(path))
    for k, v in flat_arrays(target).items():  # nothing loaded half-way
        np.testing.assert_array_equal(v, before[k])
    assert pretrained.initialize_from(target, str(path), scope="backbone") == "backbone"
    _assert_same(source, target, only="backbone/")


def test_torchvision_weights_come_from_the_cache_with_the_hash_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("CSCE_JAX_CACHE", str(tmp_path))

    def no_network(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(pretrained.urllib.request, "urlopen", no_network)
    with pytest.raises(
        ConversionError, match=r"cannot download .*resnet50-0676ba61.pth.*put it at"
    ):
        pretrained.initialize_from(_model(), "torchvision:IMAGENET1K_V1")
    assert not list(tmp_path.iterdir())  # no partial file left behind

    source = _model(seed=7)
    sd = export_torch_state_dict(source)
    blob = tmp_path / "staging.safetensors"
    write_state_file(
        {
            k: v
            for k, v in sd.items()
            if not k.startswith(("localmodel", "conv_f4", "conv_last", "fc", "ce_fc"))
        },
        blob,
    )
    prefix = hashlib.sha256(blob.read_bytes()).hexdigest()[:8]
    cached = tmp_path / f"resnet50-{prefix}.safetensors"
    blob.rename(cached)
    monkeypatch.setitem(
        pretrained.TORCHVISION_WEIGHTS,
        "LOCAL_TEST",
        f"https://example.invalid/models/{cached.name}",
    )
    target = _model(seed=8)
    assert pretrained.initialize_from(target, "torchvision:LOCAL_TEST") == "backbone"
    _assert_same(source, target, only="backbone/")
    cached.write_bytes(cached.read_bytes()[:-1] + b"\x00")  # corrupt the cached copy
    with pytest.raises(ConversionError, match="does not start with the .* published"):
        pretrained.initialize_from(_model(), "torchvision:LOCAL_TEST")
    with pytest.raises(ConversionError, match="unknown torchvision weights 'V9'"):
        pretrained.initialize_from(_model(), "torchvision:V9")


def test_a_bad_download_is_checked_before_it_enters_the_cache(tmp_path, monkeypatch):
    cache, served = tmp_path / "cache", tmp_path / "served"
    served.mkdir()
    monkeypatch.setenv("CSCE_JAX_CACHE", str(cache))
    (served / "resnet50-0badc0de.pth").write_bytes(b"not the published file")
    monkeypatch.setitem(
        pretrained.TORCHVISION_WEIGHTS, "LOCAL_BAD", (served / "resnet50-0badc0de.pth").as_uri()
    )
    with pytest.raises(ConversionError, match="does not start with the 0badc0de published"):
        pretrained.initialize_from(_model(), "torchvision:LOCAL_BAD")
    assert list(cache.iterdir()) == []  # neither the file nor a partial download stays


def test_pth_files_need_torch_or_load_with_it(tmp_path):
    torch = pytest.importorskip("torch")
    source = _model(seed=9)
    path = tmp_path / "release.pth"
    torch.save(
        {k: torch.tensor(np.array(v)) for k, v in export_torch_state_dict(source).items()}, path
    )
    target = _model(seed=10)
    assert pretrained.initialize_from(target, str(path)) == "model"
    _assert_same(source, target)


def test_a_trained_run_exports_to_a_file_that_encodes_as_the_run_does(trained_run, tmp_path):
    import csce_jax
    from csce_jax.api import export_run

    images = np.random.default_rng(0).integers(0, 255, (6, 112, 112, 3), dtype=np.uint8)
    run = csce_jax.load_model(str(trained_run))
    summary = export_run(str(trained_run), str(tmp_path / "model.safetensors"))
    assert f"step {run.step}" in summary
    exported = csce_jax.load_model(str(tmp_path / "model.safetensors"))
    np.testing.assert_array_equal(csce_jax.encode(exported, images), csce_jax.encode(run, images))
    pytest.importorskip("torch")
    export_run(str(trained_run), str(tmp_path / "model.pt"))
    from csce_jax.convert import model_from_release

    back = model_from_release(read_state_file(tmp_path / "model.pt"), image_size=112)
    assert back.bits == run.bits  # the release's layout, read back


def test_convert_refuses_to_overwrite_its_input_foreign_files_and_nan_weights(tmp_path):
    from safetensors.numpy import save_file

    from csce_jax.convert import convert_file
    from csce_jax.errors import ConversionError

    model = CSCENet(
        hash_centers(10, 16), image_size=128, rngs=nnx.Rngs(0), width=1 / 16, depths=(1, 1, 1, 1)
    )
    arrays = flat_arrays(model)
    write_state_file(arrays, tmp_path / "m.safetensors")
    before = (tmp_path / "m.safetensors").read_bytes()
    with pytest.raises(ConversionError, match="is --src"):
        convert_file(
            "jax-to-torch", str(tmp_path / "m.safetensors"), str(tmp_path / "m.safetensors")
        )
    assert (tmp_path / "m.safetensors").read_bytes() == before
    save_file({"fc.weight": np.zeros((2, 2), np.float32)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ConversionError, match="foreign.safetensors is not a csce_jax converted"):
        convert_file("jax-to-torch", str(tmp_path / "foreign.safetensors"), str(tmp_path / "o.pt"))
    key = next(k for k in arrays if k.endswith("kernel"))
    bad = {**arrays, key: np.full_like(arrays[key], np.nan)}
    with pytest.raises(ConversionError, match=f"{key} holds .* non-finite"):
        write_state_file(bad, tmp_path / "nan.safetensors")
    assert not (tmp_path / "nan.safetensors").exists()
    save_file(
        {k: np.ascontiguousarray(v) for k, v in bad.items()}, str(tmp_path / "nan.safetensors")
    )
    with pytest.raises(ConversionError, match="non-finite"):  # eval.py --weights reads this way
        pretrained.initialize_from(model, str(tmp_path / "nan.safetensors"), scope="model")


def test_convert_speaks_in_its_own_words_and_export_needs_a_run(tmp_path):
    """A damaged file is named with what it should have been, not the library's message;
    export pointed at something that is not a run says so, naming --src (its own flag)."""
    from csce_jax.errors import ConversionError

    for name, junk in (("w.npz", b"PK\x03\x04 not a zip"), ("w.safetensors", b"\x10\x00junk")):
        (tmp_path / name).write_bytes(junk)
        with pytest.raises(ConversionError) as refused:
            read_state_file(tmp_path / name)
        message = str(refused.value)
        assert message.startswith(f"cannot read {tmp_path / name}: not a whole")
        assert "Error" not in message and "\n" not in message
    out = subprocess.run(
        [
            *(sys.executable, "-m", "csce_jax.commands.convert", "export"),
            *("--src", str(tmp_path), "--dst", str(tmp_path / "x.safetensors")),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"error: --src {tmp_path}: not a training run" in out.stderr
    assert "--workdir" not in out.stderr


class Opaque:
    """A class a safe torch.load does not know."""


def test_a_damaged_pth_is_told_apart_from_one_holding_python_objects(tmp_path):
    """Garbage under a .pth name is 'not a whole PyTorch file'; a pickle holding a class of
    its own is refused by the safe load, and said so."""
    torch = pytest.importorskip("torch")
    from csce_jax.errors import ConversionError

    (tmp_path / "junk.pth").write_bytes(b"garbage")
    with pytest.raises(ConversionError, match="not a whole PyTorch file"):
        read_state_file(tmp_path / "junk.pth")
    torch.save({"w": torch.zeros(2), "note": Opaque()}, tmp_path / "objects.pth")
    with pytest.raises(ConversionError, match="holds Python objects besides tensors"):
        read_state_file(tmp_path / "objects.pth")


def test_a_torch_file_without_tensors_is_named_for_what_it_holds(tmp_path):
    """``{'state_dict': 'not a dict'}`` holds no tensor at all: the message says what it holds,
    not an empty list of keys; a state dict of other tensors lists the keys it has."""
    torch = pytest.importorskip("torch")
    from csce_jax.convert import convert_file
    from csce_jax.errors import ConversionError

    src, dst = tmp_path / "w.pth", tmp_path / "w.safetensors"
    torch.save({"state_dict": "not a dict"}, src)
    with pytest.raises(ConversionError) as refused:
        convert_file("torch-to-jax", str(src), str(dst), 224)
    assert str(refused.value) == f"{src} holds no tensors: a dict of {{'state_dict': str}}"
    torch.save({}, src)
    with pytest.raises(ConversionError, match="holds no tensors: an empty dict$"):
        convert_file("torch-to-jax", str(src), str(dst), 224)
    torch.save({"fc.weight": torch.zeros(2, 2)}, src)
    with pytest.raises(ConversionError, match=r"no 'conv1.weight' \(keys: fc.weight\)$"):
        convert_file("torch-to-jax", str(src), str(dst), 224)
    assert not dst.exists()
