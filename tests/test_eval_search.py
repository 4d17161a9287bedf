"""eval.py and the search CLI end to end on a tiny trained checkpoint."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image

from csce_jax.data.digits import digits_images
from csce_jax.errors import CodesError
from csce_jax.retrieval import metrics, pictures
from csce_jax.runs.reader import RunReader


@pytest.fixture
def trained(trained_run):
    return trained_run


def _run(*args):
    out = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    return out


def test_eval_writes_every_output(trained):
    out = _run("eval.py", "--workdir", str(trained))
    assert out.returncode == 0, out.stderr[-3000:]
    ev = trained / "eval"
    result = json.loads((ev / "metrics.json").read_text())
    assert result["checkpoint_step"] == 3 and result["bits"] == 64
    assert result["num_query"] == 300 and result["num_database"] == 1497
    assert 0 <= result["map"] <= 1 and result["map"] == result["map@all"]
    assert set(result["precision_at_k"]) >= {"1", "10", "100", "1000"}
    q = np.load(ev / "query_codes.npy")
    assert q.dtype == np.uint8 and q.shape == (300, 8)
    labels, index = np.load(ev / "query_labels.npy"), np.load(ev / "query_index.npy")
    assert index.tolist() == list(range(300)) and labels.shape == (300,)
    # The written codes re-score to the reported mAP.
    db = np.load(ev / "database_codes.npy")
    again = metrics.mean_average_precision(
        q, db, labels, np.load(ev / "database_labels.npy"), bits=64
    )
    assert abs(again - result["map"]) < 1e-12
    for name, size in (
        ("pr_curve.png", pictures.PR_CURVE_SIZE),
        ("retrieval_grid.png", ((pictures.GRID_CELL + 8) * 11 + 12, (pictures.GRID_CELL + 8) * 5)),
    ):
        with Image.open(ev / name) as img:
            assert img.format == "PNG" and img.size == size, name
            img.verify()


def test_eval_scores_codes_made_elsewhere(trained, tmp_path):
    ev = trained / "eval"
    if not (ev / "query_codes.npy").exists():
        assert _run("eval.py", "--workdir", str(trained), "--export_codes").returncode == 0
    unpacked = {
        n: metrics.unpack_codes(np.load(ev / f"{n}_codes.npy"), 64) for n in ("query", "database")
    }
    for n, c in unpacked.items():
        np.save(tmp_path / f"{n}.npy", c.astype(np.float32))  # e.g. PyTorch's sign() output
    out = _run(
        "eval.py",
        "--query_codes",
        str(tmp_path / "query.npy"),
        "--db_codes",
        str(tmp_path / "database.npy"),
        "--query_labels",
        str(ev / "query_labels.npy"),
        "--db_labels",
        str(ev / "database_labels.npy"),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    scored = json.loads(out.stdout[out.stdout.index("{") :])
    expect = metrics.mean_average_precision(
        unpacked["query"],
        unpacked["database"],
        np.load(ev / "query_labels.npy"),
        np.load(ev / "database_labels.npy"),
    )
    assert abs(scored["map"] - expect) < 1e-12


def test_eval_errors_name_what_is_wrong(tmp_path):
    out = _run("eval.py", "--workdir", str(tmp_path))
    assert out.returncode == 1 and "is not a training run (it holds no checkpoints/)" in out.stderr


def test_search_round_trip_and_corrupt_image(trained, tmp_path):
    images, _ = digits_images()
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i in range(12):
        Image.fromarray(images[i]).convert("RGB").save(
            folder / ("sub" if i % 2 else "") / f"d{i:02d}.png"
        )
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    index = tmp_path / "photos.idx"
    out = _run(
        "-m",
        "csce_jax.commands.search",
        "index",
        "--workdir",
        str(trained),
        "--images",
        str(folder),
        "--out",
        str(index),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "skipped unreadable image" in out.stderr and "broken.jpg" in out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["indexed"] == 12 and summary["skipped"] == 1
    query = folder / "d00.png"
    out = _run(
        "-m",
        "csce_jax.commands.search",
        "query",
        "--index",
        str(index),
        str(query),
        "-k",
        "3",
        "--picture",
        str(tmp_path / "hits.png"),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0].split("\t") == ["rank", "distance", "label", "path"] and len(lines) == 4
    rank, dist, label, path = lines[1].split("\t")
    assert (rank, dist, path) == ("1", "0", str(query))  # an indexed image finds itself first
    assert label == "-"  # at the folder's top: no sub-folder to name a class
    assert Image.open(tmp_path / "hits.png").size == (128 * 4 + 8, 128 + 16)  # + captions


def test_search_refuses_a_mismatched_index(trained, tmp_path):
    """An index whose record names other hash centres than its run now gives is refused, and
    a file or junk in place of an index folder is named."""
    from csce_jax import search
    from csce_jax.utils.digest import json_digest

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (80 * i, 40, 200 - 60 * i)).save(photos / f"p{i}.png")
    search.build_index(str(trained), str(tmp_path / "idx"), images=str(photos))
    manifest = tmp_path / "idx" / "index.json"
    record = json.loads(manifest.read_text())
    record["centers"] = "0" * 16
    manifest.write_text(json.dumps({**record, "digest": json_digest(record)}))
    with pytest.raises(CodesError, match="was built with 64-bit codes under centres 0000"):
        search.search(str(tmp_path / "idx"), str(photos / "p0.png"))
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(CodesError, match="is a file, not an index folder"):
        search.load_index(str(tmp_path / "junk.npz"))


def test_eval_scores_a_weights_file_like_its_checkpoint(trained, tmp_path):
    from csce_jax.convert import flat_arrays, write_state_file

    with RunReader(trained) as run:
        restored = run.weights(run.config())
    step = restored.step
    converted = tmp_path / "converted.safetensors"
    write_state_file(flat_arrays(restored.model()), converted)
    out = _run(
        "eval.py",
        "--config",
        "configs/default.py",
        "--weights",
        str(converted),
        "--workdir",
        str(tmp_path / "scored"),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    scored = json.loads((tmp_path / "scored" / "eval" / "metrics.json").read_text())
    if not (trained / "eval" / "metrics.json").exists():
        assert _run("eval.py", "--workdir", str(trained)).returncode == 0
    reference = json.loads((trained / "eval" / "metrics.json").read_text())
    assert step == 3 and scored["map"] == reference["map"]
    assert scored["checkpoint_step"].startswith("weights file")


def test_load_model_with_the_release_code_rule(trained):
    """release_codes=True: the DSF band on raw v and the "more than 32 positive" fill."""
    import jax.numpy as jnp

    import csce_jax
    from csce_jax.hashing import binarize

    ours, release = csce_jax.load_model(trained), csce_jax.load_model(trained, release_codes=True)
    assert (release.raw_eval_band, release.balance) == (True, 32.0)
    pixels = np.repeat(digits_images()[0][:16, :, :, None], 3, axis=-1)
    from csce_jax.data.images import eval_view, load_rgb

    crops = [eval_view(load_rgb(p), resize=release.resize, crop=release.crop) for p in pixels]
    out = release.model(jnp.asarray(np.stack(crops)))
    expect = binarize(out.codes, out.threshold, raw_eval_band=True, balance=32.0)
    assert np.array_equal(csce_jax.encode(release, pixels), np.asarray(expect).astype(np.int8))
    assert csce_jax.encode(ours, pixels).shape == (16, ours.bits)
