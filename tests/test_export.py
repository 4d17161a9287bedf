"""The encoder as an artifact (csce-convert export --format onnx|stablehlo): codes equal to
csce_jax.encode's bit for bit, run where neither JAX nor csce_jax is importable, at batch sizes
1, 7 and 64; the preprocessing contract against our loader; bad input in one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image

import csce_jax
from csce_jax.convert import artifact
from csce_jax.data.images import eval_view, load_rgb
from csce_jax.errors import CodesError, ConversionError

EXAMPLE = ROOT / "examples" / "onnx_encode.py"
# Run a script with jax, flax and csce_jax unimportable: what a service without them sees.
WITHOUT_JAX = """
import runpy, sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED}:
            raise ImportError(f"{{name}} is not installed here")
sys.meta_path.insert(0, Refuse())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _jax_free(script: str, *args: str, blocked=("jax", "jaxlib", "flax", "csce_jax")):
    """Run ``script`` in $CSCE_ONNX_PYTHON (a venv with onnxruntime, numpy and Pillow only,
    which .ci/run makes), else in this Python with the JAX packages unimportable."""
    python = os.environ.get("CSCE_ONNX_PYTHON")
    if python and "jax" in blocked:
        cmd = [python, script, *args]
    else:
        cmd = [sys.executable, "-c", WITHOUT_JAX.format(BLOCKED=set(blocked)), script, *args]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    return done


def _photos(folder: Path, n: int, rng) -> list[Path]:
    """Smooth RGB pictures of several sizes and aspect ratios, as JPEG and PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        w, h = int(rng.integers(130, 400)), int(rng.integers(130, 400))
        y, x = np.mgrid[0:h, 0:w] / max(h, w)
        base = np.stack([np.sin(6 * x + i), np.cos(5 * y - i), np.sin(4 * (x + y))], -1)
        pixels = (127.5 * (1 + base) + rng.normal(0, 12, (h, w, 3))).clip(0, 255)
        path = folder / f"p{i:02d}.{'jpg' if i % 2 else 'png'}"
        Image.fromarray(pixels.astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def _convert(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """``csce-convert export ARGS`` as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "csce_jax.commands.convert", "export", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


pytest.importorskip("onnxruntime")
pytest.importorskip("jax2onnx")


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    """The demo run exported both ways by the command, and 12 photographs."""
    root = tmp_path_factory.mktemp("exported")
    for fmt, name in (("onnx", "m.onnx"), ("stablehlo", "m.stablehlo")):
        done = _convert(
            "--format", fmt, "--src", str(trained_run), "--dst", str(root / name), "--logits"
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert "checked against the model" in done.stdout
    photos = _photos(root / "photos", 12, np.random.default_rng(0))
    return root, photos, csce_jax.load_model(str(trained_run))


def test_the_onnx_file_encodes_without_jax_as_csce_jax_does(exported, tmp_path):
    root, photos, loaded = exported
    done = _jax_free(
        str(EXAMPLE), "--model", str(root / "m.onnx"), "--images", str(photos[0].parent),
        "--out", str(tmp_path / "codes.npz"), "--batch", "7",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    meta = json.loads(done.stdout.splitlines()[0])
    assert meta["bits"] == loaded.bits and meta["step"] == loaded.step
    got = np.load(tmp_path / "codes.npz")
    order = [str(p) for p in sorted(photos, key=str)]
    assert list(got["paths"]) == order
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in order]
    want = csce_jax.encode(loaded, arrays)
    np.testing.assert_array_equal(got["codes"], want)
    from csce_jax.retrieval.metrics import pack_codes

    np.testing.assert_array_equal(got["packed"], pack_codes(want))


def test_batches_of_1_7_and_64_and_the_logits(exported):
    import onnxruntime

    root, _, loaded = exported
    session = onnxruntime.InferenceSession(str(root / "m.onnx"), providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map["csce_jax"])
    assert meta["opset"] == artifact.ONNX_OPSET and meta["outputs"] == ["codes", "packed", "logits"]
    assert meta["centers_sha256"] == artifact.centers_digest(loaded.centers)
    rng = np.random.default_rng(1)
    fn = artifact.encoder_function(
        loaded.model, raw_eval_band=loaded.raw_eval_band, balance=loaded.balance, logits=True
    )
    for n in (1, 7, 64):
        images = rng.integers(0, 256, (n, loaded.crop, loaded.crop, 3), dtype=np.uint8)
        codes, packed, logits = session.run(None, {"images": images})
        np.testing.assert_array_equal(codes, loaded.encode_batch(images))
        want_logits = np.asarray(fn(images)[2])
        assert np.abs(logits - want_logits).max() <= 1e-4 * np.abs(want_logits).max()
        assert codes.dtype == np.int8 and packed.dtype == np.uint8


STABLEHLO_CALL = """
import sys, numpy as np, jax
exported = jax.export.deserialize(bytearray(open(sys.argv[1], "rb").read()))
outs = exported.call(np.load(sys.argv[2]))
np.savez(sys.argv[3], *[np.asarray(o) for o in outs])
"""


def test_the_stablehlo_file_runs_under_plain_jax(exported, tmp_path):
    root, photos, loaded = exported
    meta = json.loads((root / "m.stablehlo.json").read_text())
    assert meta["platforms"][0] == "cpu" and meta["bits"] == loaded.bits
    script = tmp_path / "call.py"
    script.write_text(STABLEHLO_CALL)
    views = [eval_view(load_rgb(p), resize=loaded.resize, crop=loaded.crop) for p in photos]
    for n in (1, 7):
        np.save(tmp_path / "x.npy", np.stack(views[:n]))
        done = _jax_free(
            str(script), str(root / "m.stablehlo"), str(tmp_path / "x.npy"), str(tmp_path / "y.npz"),
            blocked=("csce_jax", "flax"),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        out = np.load(tmp_path / "y.npz")
        np.testing.assert_array_equal(out["arr_0"], loaded.encode_batch(np.stack(views[:n])))


def test_the_preprocessing_contract_is_our_loaders_view(tmp_path):
    """examples/onnx_encode.preprocess gives our evaluation loader's pixels: RGB photographs,
    a grey one, a 16-bit one, one with transparency, portrait and landscape."""
    import runpy

    preprocess = runpy.run_path(str(EXAMPLE))["preprocess"]
    rng = np.random.default_rng(2)
    paths = _photos(tmp_path, 4, rng)
    grey = tmp_path / "grey.png"
    Image.fromarray(rng.integers(0, 256, (300, 170), dtype=np.uint8)).save(grey)
    deep = tmp_path / "deep.png"
    Image.fromarray(rng.integers(0, 65535, (190, 260), dtype=np.uint16)).save(deep)
    alpha = tmp_path / "alpha.png"
    Image.fromarray(rng.integers(0, 256, (220, 240, 4), dtype=np.uint8), "RGBA").save(alpha)
    for path in [*paths, grey, deep, alpha]:
        for resize, crop in ((128, 112), (256, 224)):
            want = eval_view(load_rgb(path), resize=resize, crop=crop)
            np.testing.assert_array_equal(preprocess(path, resize, crop), want, err_msg=str(path))


def test_bad_artifacts_and_images_are_one_line(exported, tmp_path):
    root, photos, _ = exported
    cut = tmp_path / "cut.onnx"
    cut.write_bytes((root / "m.onnx").read_bytes()[:5000])
    with pytest.raises(ConversionError, match="not a whole ONNX file"):
        artifact.read_onnx_metadata(cut)
    done = _jax_free(str(EXAMPLE), "--model", str(cut), "--images", str(photos[0].parent))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip() == f"error: cannot load {cut}: not a whole ONNX file (truncated?)"
    import runpy

    example = runpy.run_path(str(EXAMPLE))
    session, meta = example["load"](str(root / "m.onnx"))
    with pytest.raises(ValueError, match=r"the encoder takes uint8 \(N, 112, 112, 3\)"):
        example["encode"](session, meta, np.zeros((2, 100, 100, 3), np.uint8))
    refused = _convert(
        "--format", "onnx", "--src", str(root / "m.onnx"), "--dst", str(tmp_path / "x.stablehlo")
    )
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "--format onnx writes a .onnx file" in refused.stderr


@pytest.mark.slow
def test_a_full_size_resnet50_exports_with_codes_equal_to_encode(tmp_path):
    """CSCE-Net on a full ResNet-50 (random weights, 64 bits, 200 classes) through a
    converted .safetensors: the ONNX file's codes equal csce_jax.encode's on photographs."""
    import onnxruntime
    from flax import nnx

    from csce_jax.convert import flat_arrays, write_state_file
    from csce_jax.hashing import hash_centers
    from csce_jax.models import CSCENet

    model = CSCENet(hash_centers(200, 64), image_size=224, rngs=nnx.Rngs(0))
    write_state_file(flat_arrays(model), tmp_path / "full.safetensors")
    done = _convert(
        *("--format", "onnx", "--src", str(tmp_path / "full.safetensors")),
        *("--dst", str(tmp_path / "full.onnx")),
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = csce_jax.load_model(str(tmp_path / "full.safetensors"))
    photos = _photos(tmp_path / "photos", 7, np.random.default_rng(3))
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in photos]
    views = np.stack([eval_view(load_rgb(p), resize=loaded.resize, crop=224) for p in photos])
    session = onnxruntime.InferenceSession(
        str(tmp_path / "full.onnx"), providers=["CPUExecutionProvider"]
    )
    codes, _ = session.run(None, {"images": views})
    np.testing.assert_array_equal(codes, csce_jax.encode(loaded, arrays))


# Run a command with the model, training and checkpoint code unimportable: what a search
# service holding only an exported encoder runs.
WITHOUT_MODEL = """
import runpy, sys
BLOCKED = ("flax", "optax", "csce_jax.models", "csce_jax.runs", "csce_jax.retrieval.encoder",
           "csce_jax.search.encoder", "csce_jax.convert")
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"{name} is not importable here")
sys.meta_path.insert(0, Refuse())
sys.argv = ["csce-search", *sys.argv[1:]]
runpy.run_module("csce_jax.commands.search", run_name="__main__")
"""


def _search(*args: str, model_code: bool = True) -> subprocess.CompletedProcess:
    """``csce-search ARGS``; ``model_code=False``: with the model code unimportable."""
    lead = ["-m", "csce_jax.commands.search"] if model_code else ["-c", WITHOUT_MODEL]
    return subprocess.run(
        [sys.executable, *lead, *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def indexes(exported, trained_run):
    """The photographs indexed twice: with the run, and with its ONNX file (no model code)."""
    root, photos, _ = exported
    folder = str(photos[0].parent)
    by_run = _search("index", "--workdir", str(trained_run), "--images", folder,
                     "--out", str(root / "run.idx"))  # fmt: skip
    assert by_run.returncode == 0, by_run.stderr[-3000:]
    by_onnx = _search("index", "--encoder", str(root / "m.onnx"), "--images", folder,
                      "--out", str(root / "onnx.idx"), model_code=False)  # fmt: skip
    assert by_onnx.returncode == 0, by_onnx.stderr[-3000:]
    return root / "run.idx", root / "onnx.idx"


def test_an_index_built_with_the_onnx_encoder_holds_the_runs_codes(exported, indexes):
    from csce_jax.search import load_index

    root, photos, _ = exported
    by_run, by_onnx = (load_index(p) for p in indexes)
    assert by_onnx.paths == by_run.paths and len(by_run.paths) == len(photos)
    np.testing.assert_array_equal(by_onnx.codes, by_run.codes)
    for key in ("bits", "centers", "workdir", "step"):
        assert by_onnx.meta[key] == by_run.meta[key], key
    recorded = by_onnx.meta["encoder"]
    assert recorded["file"] == str(root / "m.onnx") and len(recorded["sha256"]) == 64
    assert "encoder" not in by_run.meta


def test_queries_through_the_onnx_encoder_get_the_runs_hits(exported, indexes, tmp_path):
    """Both indexes queried without model code (the ONNX index by the encoder it records,
    the run's by --encoder) give the hits the run gives through its checkpoint."""
    root, photos, _ = exported
    by_run, by_onnx = indexes
    asked = [str(p) for p in photos[:5]]

    def hits(index, *more, model_code=False):
        out = tmp_path / f"hits{len(list(tmp_path.iterdir()))}.json"
        done = _search("query", "--index", str(index), *asked, "-k", "4", "--out", str(out),
                       *more, model_code=model_code)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(out.read_text())

    want = hits(by_run, model_code=True)
    assert len(want["queries"]) == 5 and all(len(q["hits"]) == 4 for q in want["queries"])
    assert hits(by_onnx) == want
    assert hits(by_run, "--encoder", str(root / "m.onnx")) == want


def test_the_page_encodes_uploads_with_the_onnx_encoder(exported, indexes):
    from csce_jax.search import queries, server

    _, photos, _ = exported
    upload = photos[3].read_bytes()
    got = []
    for index in indexes:
        with queries.Searcher(index) as searcher:
            page = server.SearchServer(searcher, port=0)
            try:
                got.append(page.hits_of_upload(upload, 5)["hits"])
            finally:
                page.server_close()
    assert got[0] == got[1] and got[0][0]["path"] == str(photos[3])


def test_the_onnx_encoder_indexes_a_record_set_as_the_run_does(exported, trained_run, tmp_path):
    """A record set has no run config beside the encoder: its own settings are used."""
    root = exported[0]
    records = tmp_path / "records"
    done = subprocess.run(
        [sys.executable, "-m", "csce_jax.commands.prepare", "--config",
         str(ROOT / "configs" / "default.py"), f"--out={records}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    split = ("--prepared", str(records), "--split", "query")
    a = _search("index", "--workdir", str(trained_run), *split, "--out", str(tmp_path / "a"))
    b = _search("index", "--encoder", str(root / "m.onnx"), *split, "--out", str(tmp_path / "b"),
                model_code=False)  # fmt: skip
    assert a.returncode == 0 and b.returncode == 0, (a.stderr + b.stderr)[-3000:]
    from csce_jax.search import load_index

    ia, ib = load_index(tmp_path / "a"), load_index(tmp_path / "b")
    assert len(ia.paths) > 100 and ib.paths == ia.paths
    np.testing.assert_array_equal(ib.codes, ia.codes)


def test_an_encoder_that_does_not_fit_the_index_is_one_line(exported, indexes, tmp_path):
    """Another bit length, a truncated file, a file changed since the index was built, and
    both a run and an encoder: one line each, no traceback."""
    from flax import nnx

    from csce_jax.convert import flat_arrays, write_state_file
    from csce_jax.hashing import hash_centers
    from csce_jax.models import CSCENet

    root, photos, loaded = exported
    by_run = indexes[0]
    model = CSCENet(hash_centers(10, 16), image_size=loaded.crop, width=1 / 16, rngs=nnx.Rngs(0))
    write_state_file(flat_arrays(model), tmp_path / "b16.safetensors")
    done = _convert("--format", "onnx", "--src", str(tmp_path / "b16.safetensors"),
                    "--dst", str(tmp_path / "b16.onnx"))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]

    def refused(*args):
        done = _search("query", "--index", str(by_run), str(photos[0]), *args, model_code=False)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
        (line,) = done.stderr.strip().splitlines()
        return line

    line = refused("--encoder", str(tmp_path / "b16.onnx"))
    assert f"holds {loaded.bits}-bit codes" in line and "gives 16-bit codes" in line, line
    cut = tmp_path / "cut.onnx"
    cut.write_bytes((root / "m.onnx").read_bytes()[:5000])
    assert f"cannot load {cut}: not a whole ONNX file" in refused("--encoder", str(cut))
    assert f"encoder not found: {tmp_path / 'none.onnx'}" in refused(
        "--encoder", str(tmp_path / "none.onnx")
    )
    moved = tmp_path / "moved.idx"
    mine = tmp_path / "mine.onnx"
    mine.write_bytes((root / "m.onnx").read_bytes())
    done = _search("index", "--encoder", str(mine), "--images", str(photos[0].parent),
                   "--out", str(moved), model_code=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    mine.write_bytes((tmp_path / "b16.onnx").read_bytes())
    done = _search("query", "--index", str(moved), str(photos[0]), model_code=False)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"{mine} changed since the index was built with it" in done.stderr
    mine.unlink()
    done = _search("query", "--index", str(moved), str(photos[0]), model_code=False)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"built with the encoder {mine}, which is not there" in done.stderr
    from csce_jax.search import load_index
    from csce_jax.search.onnx_encoder import OnnxEncoder

    meta = load_index(by_run).meta
    with pytest.raises(CodesError, match=r"was built with step 99, but the encoder .* is step 3"):
        OnnxEncoder(root / "m.onnx").check_index({**meta, "step": 99}, "x.idx")
    both = _search("index", "--workdir", str(root), "--encoder", str(mine), "--images", "x",
                   "--out", str(tmp_path / "x"))  # fmt: skip
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
