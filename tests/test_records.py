"""Prepared record sets: the same batches as the image files, refused when they do not fit,
resumed after a kill to the same bytes."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import children_of, with_file_size_limit
from PIL import Image

from csce_jax.config import data_config
from csce_jax.data import EvalLoader, TrainLoader, ViewConfig, Workers, load_data
from csce_jax.data.prepare import prepare
from csce_jax.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
VIEW = ViewConfig(resize=24, crop=20, flip=True)


def _folder(root: Path, per_class: int = 6) -> Path:
    """3 classes of JPEGs and PNGs of awkward sizes (odd aspect ratios, grey, alpha)."""
    rng = np.random.default_rng(0)
    for c in range(3):
        for i in range(per_class):
            w, h = int(rng.integers(25, 60)), int(rng.integers(25, 60))
            arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            path = root / f"class{c}" / f"im{i}.{'png' if i % 3 == 0 else 'jpg'}"
            path.parent.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray(arr)
            if i % 4 == 1:
                img = img.convert("L")
            img.save(path)
    return root


def _config(root: Path, prepared: str = ""):
    import ml_collections

    c = ml_collections.ConfigDict()
    c.data = data_config("folder")
    c.data.image_root = str(root)
    c.data.resize, c.data.crop = VIEW.resize, VIEW.crop
    c.data.query_fraction, c.data.val_fraction = 0.3, 0.2
    c.data.prepared = prepared
    return c


@pytest.fixture(scope="module")
def record_set(tmp_path_factory):
    base = tmp_path_factory.mktemp("records")
    root = _folder(base / "images")
    out = base / "set"
    summary = prepare(_config(root), out, workers=2, shard_size=4)
    return root, out, summary


def _train_batches(data, workers=None):
    workers = workers or Workers(2)
    loader = TrainLoader(data.fit, global_batch=4, num_steps=5, seed=3, view=VIEW, workers=workers)
    return list(loader.batches())


def _eval_batches(src):
    view = ViewConfig(VIEW.resize, VIEW.crop, False)
    return list(EvalLoader(src, global_batch=4, view=view).batches())


def test_records_give_the_image_files_batches(record_set):
    root, out, summary = record_set
    files, recs = load_data(_config(root).data), load_data(_config(root, str(out)).data)
    assert summary["images"] == len(files.train) + len(files.query) and summary["unreadable"] == 0
    assert recs.num_classes == files.num_classes == 3
    for name in ("train", "fit", "val", "database", "query"):
        a, b = getattr(files, name), getattr(recs, name)
        assert np.array_equal(a.labels, b.labels) and list(a.where) == list(b.where)
    for a, b in zip(_train_batches(files), _train_batches(recs), strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert np.array_equal(a[k], b[k]), k
    for src in ("val", "query", "database"):
        for a, b in zip(
            _eval_batches(getattr(files, src)), _eval_batches(getattr(recs, src)), strict=True
        ):
            assert all(np.array_equal(a[k], b[k]) for k in a)


def test_records_in_worker_processes_and_resumed_mid_stream(record_set):
    root, out, _ = record_set
    recs = load_data(_config(root, str(out)).data)
    threads = _train_batches(recs)
    loader = TrainLoader(
        recs.fit, global_batch=4, num_steps=5, seed=3, view=VIEW, workers=Workers(2, True)
    )
    resumed = list(loader.batches(start_step=2))
    assert len(resumed) == 3
    for a, b in zip(threads[2:], resumed, strict=True):
        assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["index"], b["index"])


@pytest.mark.parametrize(("key", "value"), [("resize", 32), ("split_seed", 1), ("name", "lists")])
def test_a_record_set_of_other_settings_is_refused(record_set, key, value):
    root, out, _ = record_set
    cfg = _config(root, str(out))
    cfg.data[key] = value
    with pytest.raises(DataError, match=rf"prepared with data.{key}=.*config has data.{key}="):
        load_data(cfg.data)


def test_truncated_or_missing_shards_are_named(record_set, tmp_path):
    root, out, _ = record_set
    import shutil

    copy = tmp_path / "set"
    shutil.copytree(out, copy)
    shard = sorted(copy.glob("*.array_record"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(DataError, match=rf"{shard.name}: \d+ bytes, the manifest records"):
        load_data(_config(root, str(copy)).data)
    good = sorted(out.glob("*.array_record"))[0].read_bytes()
    shard.write_bytes(good[:1000] + bytes(255 - b for b in good[1000:5000]) + good[5000:])
    data = load_data(_config(root, str(copy)).data)  # same size: found when a record is read
    with pytest.raises(DataError, match=rf"{shard.name}"):
        for i in range(len(data.train)):
            data.train.images[i]
    shard.unlink()
    with pytest.raises(DataError, match=rf"{shard.name}: shard missing"):
        load_data(_config(root, str(copy)).data)
    (copy / "manifest.json").unlink()
    with pytest.raises(DataError, match=r"no manifest.json .*did not finish"):
        load_data(_config(root, str(copy)).data)


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


def _prepare_command(root: Path, out: Path, workers: int) -> list[str]:
    """``csce-prepare`` of the test's image folder into ``out``, shards of 4 images."""
    return [
        sys.executable,
        "-m",
        "csce_jax.commands.prepare",
        "--config",
        str(ROOT / "tests" / "folder_config.py"),
        f"--config.data.image_root={root}",
        f"--out={out}",
        f"--workers={workers}",
        "--shard_size=4",
    ]


def test_a_killed_prepare_resumes_to_the_same_bytes(record_set, tmp_path):
    root, out, _ = record_set
    cmd = _prepare_command(root, tmp_path / "set", workers=1)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "set").glob("*.array_record.json")):
        assert proc.poll() is None and time.monotonic() < deadline, "prepare ended early"
        time.sleep(0.05)
    workers = children_of(proc.pid)
    assert workers  # the decoding pool and multiprocessing's resource tracker
    proc.kill()  # SIGKILL: no cleanup
    proc.wait()
    deadline = time.monotonic() + 20  # the workers notice their parent is gone and exit
    while any(Path(f"/proc/{p}").exists() for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in workers if Path(f"/proc/{p}").exists()], "workers outlived prepare"
    assert not (tmp_path / "set" / "manifest.json").exists()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "already written" in done.stdout and " 0 already written" not in done.stdout
    assert not list((tmp_path / "set").glob("*.tmp"))
    assert _digests(tmp_path / "set") == _digests(out)


def test_prepare_on_a_full_disk_says_one_line_and_leaves_no_partial_file(record_set, tmp_path):
    root, out, _ = record_set
    cmd = _prepare_command(root, tmp_path / "set", workers=2)
    full = subprocess.run(  # a shard of 4 images of 24 px fits in 32 KiB, not more
        with_file_size_limit(cmd, 32 << 10), cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert full.returncode == 1, full.stderr[-2000:]
    lines = [ln for ln in full.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in full.stderr, full.stderr[-3000:]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, full.stderr[-3000:]
    assert re.fullmatch(
        r"error: .*/set/\w+-\d{5}-of-\d{5}\.array_record: File too large", errors[0]
    ), errors[0]
    assert not list((tmp_path / "set").glob("*.tmp"))
    assert not (tmp_path / "set" / "manifest.json").exists()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _digests(tmp_path / "set") == _digests(out)


def test_unreadable_images_named_and_skipped_only_when_asked(tmp_path):
    root = _folder(tmp_path / "images", per_class=4)
    bad = root / "class1" / "im1.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(DataError, match=r"(?s)1 unreadable image\(s\).*class1/im1.jpg"):
        prepare(_config(root), tmp_path / "a", workers=1, shard_size=4)
    assert not (tmp_path / "a" / "manifest.json").exists()
    cfg = _config(root)
    cfg.data.skip_corrupt = True
    assert prepare(cfg, tmp_path / "b", workers=1, shard_size=4)["unreadable"] == 1
    cfg.data.prepared = str(tmp_path / "b")
    data = load_data(cfg.data)
    src = data.train if any("im1" in w for w in data.train.where) else data.query
    loader = EvalLoader(
        src, global_batch=4, view=ViewConfig(VIEW.resize, VIEW.crop, False), skip_corrupt=True
    )
    batches = list(loader.batches())
    assert loader.corrupt.count == 1 and "im1.jpg" in next(iter(loader.corrupt.names))
    assert sum(int((b["index"] >= 0).sum()) for b in batches) == len(src) - 1


def test_jpeg_records_are_smaller_and_close(tmp_path):
    root = tmp_path / "images"
    for c in range(2):
        for i in range(3):  # smooth photo-like content, 240 x 180
            y, x = np.mgrid[0:180, 0:240]
            arr = np.stack([x + 40 * c, y + 20 * i, x + y], -1) % 256
            (root / f"c{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr.astype(np.uint8)).save(root / f"c{c}" / f"{i}.png")

    def cfg(prepared=""):
        c = _config(root, prepared)
        c.data.resize, c.data.crop = 160, 128
        return c

    raw = prepare(cfg(), tmp_path / "raw", workers=1)
    jpg = prepare(cfg(), tmp_path / "jpg", workers=1, image_format="jpeg")
    assert jpg["bytes"] < raw["bytes"] / 2
    a = load_data(cfg(str(tmp_path / "raw")).data).train
    b = load_data(cfg(str(tmp_path / "jpg")).data).train
    for i in range(len(a)):
        x, y = a.images[i].astype(int), b.images[i].astype(int)
        assert x.shape == y.shape and np.abs(x - y).mean() < 3


@pytest.mark.slow
def test_eval_and_search_read_a_record_set(trained_run, tmp_path):
    """eval.py --prepared and search index --prepared give the image path's codes."""
    import json
    import shutil

    from conftest import run_module, tiny_config

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("eval", ".lock"))
    prepare(tiny_config(), tmp_path / "digits", workers=1)
    out = run_module("eval.py", "--workdir", str(run), "--export_codes")
    assert out.returncode == 0, out.stderr[-3000:]
    files = {n: np.load(run / "eval" / f"{n}_codes.npy") for n in ("query", "database")}
    shutil.rmtree(run / "eval")
    out = run_module(
        "eval.py", "--workdir", str(run), "--export_codes", f"--prepared={tmp_path / 'digits'}"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for name, codes in files.items():
        assert np.array_equal(np.load(run / "eval" / f"{name}_codes.npy"), codes), name
    index = tmp_path / "q.idx"
    out = run_module(
        "-m",
        "csce_jax.commands.search",
        "index",
        "--workdir",
        str(run),
        "--prepared",
        str(tmp_path / "digits"),
        "--split",
        "query",
        "--out",
        str(index),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["indexed"] == 300
    from csce_jax.search import load_index

    assert np.array_equal(load_index(index).codes, files["query"])
