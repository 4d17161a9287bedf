"""Faults and bad inputs: each is refused or survived with nothing lost and one clear line."""

import errno
import fcntl
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import (
    ROOT,
    SESSION_MARK,
    leftover_processes,
    read_rows,
    run_module,
    run_train,
    saved_steps,
    tiny_config,
    with_file_size_limit,
)
from PIL import Image

from csce_jax.commands import cli
from csce_jax.config import check_config
from csce_jax.data import load_data
from csce_jax.data.images import load_rgb
from csce_jax.data.official import aircraft_sources
from csce_jax.data.sources import folder_source, tfds_source
from csce_jax.errors import CheckpointError, CodesError, ConfigError, DataError, WorkdirError
from csce_jax.retrieval import evaluator, metrics
from csce_jax.runs import report
from csce_jax.runs.checkpoints import Checkpoints
from csce_jax.runs.writer import RunWriter
from csce_jax.train import loop
from csce_jax.train.writers import MetricsLog

SHORT = [
    "--config.total_steps=2",
    "--config.eval_every_steps=2",
    "--config.checkpoint_every_steps=2",
]


@pytest.fixture
def finished_run(trained_run):
    return trained_run


# --- Losing or corrupting work ------------------------------------------------------------------


def _plausible_damage(step_folder):
    """32 bytes of plausible floats (0.05) over the middle of the step's largest data file."""
    big = max(
        (f for f in (step_folder / "weights").rglob("*") if f.is_file()),
        key=lambda f: f.stat().st_size,
    )
    data = bytearray(big.read_bytes())
    mid = len(data) // 2 // 4 * 4
    data[mid : mid + 32] = np.full(8, 0.05, np.float32).tobytes()
    big.write_bytes(bytes(data))


@pytest.mark.parametrize("tamper", ["deleted", "not json", "edited to the new rate"])
def test_the_resume_policy_reads_the_checkpoint_not_config_json(tmp_path, tamper):
    c = tiny_config(2)
    loop.train_and_evaluate(c, tmp_path)
    record = tmp_path / "config.json"
    if tamper == "deleted":
        record.unlink()
    elif tamper == "not json":
        record.write_text("{ not json")
    else:
        edited = json.loads(record.read_text())
        edited["optimizer"]["lr"] = c.optimizer.lr * 10
        record.write_text(json.dumps(edited))
    c2 = tiny_config(4)
    c2.optimizer.lr = c.optimizer.lr * 10
    with pytest.raises(WorkdirError, match=r"optimizer\.lr"):
        loop.train_and_evaluate(c2, tmp_path)
    assert saved_steps(tmp_path) == [2]


@pytest.mark.slow
def test_damaged_checkpoint_data_are_refused_and_the_run_goes_on_from_a_sound_one(tmp_path, caplog):
    from csce_jax.runs.reader import RunReader

    c = tiny_config(4)
    c.checkpoint_every_steps, c.eval_every_steps, c.keep_checkpoints = 2, 4, 2
    whole = tmp_path / "whole"
    loop.train_and_evaluate(tiny_config(6), whole)  # the same run, never interrupted
    run = tmp_path / "run"
    loop.train_and_evaluate(c, run)
    assert saved_steps(run) == [2, 4]
    _plausible_damage(run / "checkpoints" / "4")
    # Readers: step 4 (the best, the only scored one) is refused; the newest sound one is used.
    with RunReader(run) as reader:
        assert reader.weights(c).step == 2
    # Asked for by name: no substitute, and the one-line error says why (the digest).
    with pytest.raises(CheckpointError, match="no checkpoint could be restored: .*do not match"):
        with RunReader(run) as reader:
            reader.weights(c, step=4)
    assert saved_steps(run) == [2, 4]  # readers move nothing
    # The trainer resumes from step 2, sets step 4 aside, and ends as the whole run did.
    c.total_steps = 6
    caplog.clear()
    with caplog.at_level("INFO"):
        loop.train_and_evaluate(c, run)
    assert "resumed from step 2" in caplog.text
    (aside,) = (run / "corrupt_checkpoints").iterdir()
    assert aside.name.startswith("4-")
    assert [r["step"] for r in read_rows(run) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(_final_params(run, 6), _final_params(whole, 6), strict=True):
        np.testing.assert_array_equal(a, b)


def _final_params(workdir, steps):
    from conftest import final_params

    return [np.asarray(x) for x in __import__("jax").tree.leaves(final_params(workdir, steps))]


def test_a_junk_step_folder_holds_no_slot_of_the_keep_policy(tmp_path):
    c = tiny_config(2)
    c.keep_checkpoints = 1
    loop.train_and_evaluate(c, tmp_path)
    (tmp_path / "checkpoints" / "1").mkdir()  # a junk numeric folder below the newest step
    (tmp_path / "checkpoints" / "1" / "junk").write_text("not a checkpoint")
    c.total_steps = 4
    loop.train_and_evaluate(c, tmp_path)
    assert 1 not in saved_steps(tmp_path) and 4 in saved_steps(tmp_path)
    assert [p.name.split("-")[0] for p in (tmp_path / "corrupt_checkpoints").iterdir()] == ["1"]


def test_no_readable_checkpoint_record_stops_the_run_and_start_over_is_explicit(tmp_path):
    """Every step's record gone: the trainer names each step, moves nothing and does not
    start again from step 0 by itself; ``start_over`` sets them aside and trains from 0."""
    c = tiny_config(2)
    c.checkpoint_every_steps = 1
    loop.train_and_evaluate(c, tmp_path)
    assert saved_steps(tmp_path) == [1, 2]
    for step in (1, 2):
        metadata = tmp_path / "checkpoints" / str(step) / "meta" / "metadata"
        assert metadata.is_file()
        metadata.unlink()
    rows = read_rows(tmp_path)
    c.total_steps = 3
    with pytest.raises(CheckpointError) as refused:
        loop.train_and_evaluate(c, tmp_path)
    message = str(refused.value)
    assert "\n" not in message and "step 1: " in message and "step 2: " in message
    assert "--start_over" in message and "nothing was moved" in message
    assert saved_steps(tmp_path) == [1, 2] and not (tmp_path / "corrupt_checkpoints").exists()
    assert read_rows(tmp_path) == rows  # nothing rewritten
    out = loop.train_and_evaluate(c, tmp_path, start_over=True)
    assert out["step"] == 3
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "corrupt_checkpoints").iterdir()) == [
        "1",
        "2",
    ]
    assert [r["step"] for r in read_rows(tmp_path) if "loss" in r] == [1, 2, 3]


def test_readers_never_write_into_a_run(finished_run, tmp_path):
    """eval.py and search index on a run that is (as far as they know) still saving a step."""
    in_progress = finished_run / "checkpoints" / "3.orbax-checkpoint-tmp-1234567"
    in_progress.mkdir()
    (in_progress / "partial").write_bytes(b"half a checkpoint")
    before = sorted(p.relative_to(finished_run) for p in (finished_run / "checkpoints").rglob("*"))
    try:
        out = run_module("eval.py", "--workdir", str(finished_run), "--export_codes")
        assert out.returncode == 0, out.stderr[-2000:]
        folder = tmp_path / "photos"
        folder.mkdir()
        Image.new("RGB", (40, 40), "white").save(folder / "a.png")
        out = run_module(
            "-m",
            "csce_jax.commands.search",
            "index",
            "--workdir",
            str(finished_run),
            "--images",
            str(folder),
            "--out",
            str(tmp_path / "i.npz"),
        )
        assert out.returncode == 0, out.stderr[-2000:]
        after = sorted(
            p.relative_to(finished_run) for p in (finished_run / "checkpoints").rglob("*")
        )
        assert after == before  # the trainer's temporary step is untouched, nothing added
    finally:
        for f in in_progress.iterdir():
            f.unlink()
        in_progress.rmdir()


def test_a_second_trainer_is_refused_and_a_killed_one_leaves_no_lock(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; sys.path.insert(0, '.');"
            "from csce_jax.runs.writer import RunWriter;"
            f"f = RunWriter({str(tmp_path)!r}).__enter__(); print('locked', flush=True);"
            "time.sleep(600)",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    out = run_train(tmp_path, *SHORT, check=False)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith(f"error: workdir {tmp_path} is in use")
    assert f"pid {holder.pid}" in out.stderr
    assert not (tmp_path / "metrics.jsonl").exists() and saved_steps(tmp_path) == []
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with RunWriter(tmp_path):  # the kernel dropped the dead process's lock
        fd = os.open(tmp_path / ".lock", os.O_RDWR)
        with pytest.raises(OSError):  # and this process holds it now
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)


@pytest.mark.slow
def test_a_refused_resume_writes_nothing_and_allowed_changes_are_recorded(tmp_path):
    loop.train_and_evaluate(tiny_config(2), tmp_path)  # what SHORT gives through train.py
    config_before = (tmp_path / "config.json").read_bytes()
    history_before = (tmp_path / "config_history.jsonl").read_bytes()
    rows_before = (tmp_path / "metrics.jsonl").read_bytes()
    for change, named in (
        ("--config.bits=32", "bits: 64 -> 32"),
        ("--config.optimizer.lr=0.01", "optimizer.lr: 0.002 -> 0.01"),
    ):
        out = run_train(tmp_path, *SHORT, change, check=False)
        assert out.returncode == 1 and named in out.stderr, out.stderr[-2000:]
        assert (tmp_path / "config.json").read_bytes() == config_before
        assert (tmp_path / "config_history.jsonl").read_bytes() == history_before
        assert (tmp_path / "metrics.jsonl").read_bytes() == rows_before
    c = tiny_config(2)
    c.total_steps = 3
    loop.train_and_evaluate(c, tmp_path)
    history = [json.loads(x) for x in (tmp_path / "config_history.jsonl").read_text().splitlines()]
    assert [h["start_step"] for h in history] == [0, 2]
    assert history[1]["changes"] == {"total_steps": [2, 3]}
    assert json.loads((tmp_path / "config.json").read_text())["total_steps"] == 3
    assert read_rows(tmp_path)[-1]["step"] == 3


def test_a_corrupt_best_checkpoint_falls_back_and_keeps_the_final_row(tmp_path, monkeypatch):
    # Evaluations at steps 2 and 4, the final one, then at 6 and the final one of the resumed
    # run: the first evaluation (step 2) stays the best.
    scores = iter([0.9, 0.5, 0.5, 0.3, 0.3])
    real = evaluator.score
    monkeypatch.setattr(evaluator, "score", lambda *a, **k: {**real(*a, **k), "map": next(scores)})
    c = tiny_config(4)
    c.eval_every_steps = c.checkpoint_every_steps = 2
    c.keep_checkpoints = 1
    loop.train_and_evaluate(c, tmp_path)
    assert saved_steps(tmp_path) == [2, 4]  # latest 1 + the best
    for f in (tmp_path / "checkpoints" / "2" / "weights").rglob("*"):
        if f.is_file() and f.stat().st_size > 64:
            f.write_bytes(f.read_bytes()[:16])
    c.total_steps = 6  # resume past the finished run: the final row is recomputed
    final = loop.train_and_evaluate(c, tmp_path)
    assert final["best_step"] == 6 and np.isfinite(final["query_map"])
    rows = read_rows(tmp_path)
    assert rows[-1] == json.loads(json.dumps(final, sort_keys=True))
    again = loop.train_and_evaluate(c, tmp_path)  # a finished run: nothing redone or lost
    assert again == rows[-1] and read_rows(tmp_path) == rows


def test_a_failed_save_stops_the_run_naming_path_and_cause(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    def disk_full(self, step, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "save", disk_full)
    c = tiny_config(4)
    c.checkpoint_every_steps = 2
    with pytest.raises(CheckpointError, match=r"step 2 in .*checkpoints: No space left on device"):
        loop.train_and_evaluate(c, tmp_path)
    assert max(r["step"] for r in read_rows(tmp_path)) == 2  # it did not train on


@pytest.mark.slow
def test_a_full_disk_at_a_fresh_start_is_one_line_and_the_rerun_trains(tmp_path):
    """The first checkpoint cannot be written: one line naming the folder, the step and the
    system's words (no Orbax or asyncio tracebacks), and a rerun with room trains from 0."""
    from conftest import TINY_OVERRIDES

    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "train.py",
        "--config",
        "configs/default.py",
        "--workdir",
        str(run),
        *TINY_OVERRIDES,
        "--config.total_steps=4",
        "--config.eval_every_steps=4",
        "--config.checkpoint_every_steps=2",
        "--config.compilation_cache=",
    ]
    full = subprocess.run(  # the logs fit in 20 KiB, a checkpoint's weights do not
        with_file_size_limit(cmd, 20 << 10), cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert full.returncode == 1, full.stdout[-2000:] + full.stderr[-3000:]
    told = [ln for ln in full.stderr.splitlines() if ln.strip() and not ln.startswith("I")]
    assert len(told) == 1, full.stderr[-4000:]
    assert told[0].startswith(f"error: cannot save the checkpoint of step 2 in {run}/checkpoints: ")
    assert "File too large" in told[0] and "no checkpoint was saved before it" in told[0]
    assert saved_steps(run) == []
    again = run_train(run, *cmd[-4:])
    assert saved_steps(run) == [2, 4], again.stderr[-2000:]


def test_metrics_truncation_leaves_no_temporary_file_when_the_disk_is_full(tmp_path, monkeypatch):
    log = MetricsLog(tmp_path)
    for step in (1, 2, 3):
        log.write({"step": step, "loss": 1.0})
    original = (tmp_path / "metrics.jsonl").read_bytes()
    from csce_jax.utils import atomic

    class FullDisk:  # the file is created (0 bytes), its first write fails
        def __init__(self, path, mode):
            self.f = open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "open", FullDisk, raising=False)
    with pytest.raises(OSError) as failed:
        log.truncate_after(2)
    assert failed.value.filename == str(tmp_path / "metrics.jsonl")  # the error names the file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    assert (tmp_path / "metrics.jsonl").read_bytes() == original


def test_the_error_boundary_prints_one_line_for_os_errors(capsys):
    def full():
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/metrics.jsonl")

    with pytest.raises(SystemExit) as stop:
        cli.error_boundary(full)
    assert stop.value.code == 1
    assert capsys.readouterr().err == "error: /runs/x/metrics.jsonl: No space left on device\n"


# --- Silently wrong answers ---------------------------------------------------------------------


def _codes_files(tmp_path, q, d, ql, dl):
    paths = {}
    for name, arr in (("q", q), ("d", d), ("ql", ql), ("dl", dl)):
        paths[name] = str(tmp_path / f"{name}.npy")
        np.save(paths[name], arr)
    return paths


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("widths", "64-bit codes but .* 32-bit codes"),
        ("nan", "non-finite code values"),
        ("fraction", "labels must be whole numbers"),
        ("packed_bits", "8 bytes per code, but --bits 32 packs into 4"),
        ("one_d", "codes must be a 2-D array"),
        ("packed_no_bits", "packed uint8 codes: pass --bits"),
        ("not_binary", "codes must be -1 or \\+1"),
        ("empty", "no codes \\(an array of shape \\(0, 64\\)\\)"),
        ("complex", "complex; expected -1 or \\+1"),
        ("labels_1d_vs_2d", "holds class indices \\(1-D\\) but .*0/1 label vectors \\(2-D\\)"),
        ("topk_negative", "--topk -5: must be positive \\(or -1"),
        ("topk_zero", "--topk 0: must be positive"),
    ],
)
def test_scoring_codes_refuses_malformed_input(tmp_path, case, message):
    rng = np.random.default_rng(0)
    q = np.where(rng.random((5, 64)) > 0.5, 1, -1).astype(np.int8)
    d = np.where(rng.random((9, 64)) > 0.5, 1, -1).astype(np.int8)
    ql, dl = rng.integers(0, 3, 5), rng.integers(0, 3, 9)
    bits = None
    if case == "widths":
        d = d[:, :32]
    elif case == "nan":
        q = q.astype(np.float32)
        q[0, 0] = np.nan
    elif case == "fraction":
        ql = ql + 0.5
    elif case == "packed_bits":
        q, d, bits = metrics.pack_codes(q), metrics.pack_codes(d), 32
    elif case == "one_d":
        q = q[:, 0]
    elif case == "packed_no_bits":
        q, d = metrics.pack_codes(q), metrics.pack_codes(d)
    elif case == "not_binary":
        q = q * 3
    elif case == "empty":
        q, ql = q[:0], ql[:0]
    elif case == "complex":
        q = q.astype(np.complex64)
    elif case == "labels_1d_vs_2d":
        dl = np.eye(3, dtype=np.int64)[dl]
    topk = {"topk_negative": -5, "topk_zero": 0}.get(case)
    p = _codes_files(tmp_path, q, d, ql, dl)
    with pytest.raises(CodesError, match=message):
        report.score_npy(p["q"], p["d"], p["ql"], p["dl"], topk, bits)
    if case == "topk_negative":  # eval.py passes -5 on (only -1 means the whole database)
        out = run_module(
            "eval.py",
            *("--query_codes", p["q"], "--db_codes", p["d"]),
            *("--query_labels", p["ql"], "--db_labels", p["dl"], "--topk", "-5"),
        )
        assert out.returncode == 1 and "error: --topk -5: must be positive" in out.stderr


def test_eval_py_reports_bad_codes_in_one_line(tmp_path):
    q = np.ones((3, 64), np.int8)
    p = _codes_files(tmp_path, q, q[:, :32], np.zeros(3, int), np.zeros(3, int))
    out = run_module(
        "eval.py",
        "--query_codes",
        p["q"],
        "--db_codes",
        p["d"],
        "--query_labels",
        p["ql"],
        "--db_labels",
        p["dl"],
    )
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"error: {p['q']} holds 64-bit codes but {p['d']} 32-bit codes"
    ]


def test_a_search_index_works_from_any_folder_and_refuses_tampering(finished_run, tmp_path):
    from csce_jax import search

    folder = tmp_path / "photos"
    folder.mkdir()
    for i, shade in enumerate((0, 90, 180, 255)):
        Image.new("RGB", (40, 40), (shade, 255 - shade, 20 * i)).save(folder / f"p{i}.png")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:  # relative paths, as a user types them
        summary = search.build_index(os.path.relpath(finished_run), "idx", images="photos")
    finally:
        os.chdir(cwd)
    assert summary["indexed"] == 4 and os.path.isabs(summary["workdir"])
    index = search.load_index(str(tmp_path / "idx"))
    assert all(os.path.isabs(p) for p in index.paths)
    hits = search.search(str(tmp_path / "idx"), str(folder / "p2.png"), k=2)
    assert hits[0] == (str(folder / "p2.png"), 0)
    with pytest.raises(CodesError, match="number of hits must be at least 1"):
        search.search(str(tmp_path / "idx"), str(folder / "p2.png"), k=-3)
    # A shard or manifest changed by hand is refused too.
    manifest = tmp_path / "idx" / "index.json"
    record = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**record, "count": 5}))
    with pytest.raises(CodesError, match="does not match its own digest"):
        search.load_index(str(tmp_path / "idx"))
    manifest.write_text(json.dumps(record))
    (tmp_path / "idx" / "shards" / "00000.npz").write_bytes(b"junk")
    with pytest.raises(CodesError, match="00000.npz does not match the digest"):
        search.load_index(str(tmp_path / "idx"))


def test_a_thin_strip_that_would_resize_to_gigabytes_is_refused_and_verify_reports_it(tmp_path):
    from csce_jax.data.base import Source
    from csce_jax.data.verify import check_sources

    strip = tmp_path / "strip.png"
    Image.new("L", (1, 20000)).save(strip)  # a few hundred bytes; 256 x 5,120,000 resized
    assert strip.stat().st_size < 2000
    with pytest.raises(DataError, match="would resize to 256 x 5120000"):
        load_rgb(str(strip), 256, "strip.png")
    ok = tmp_path / "ok.png"
    Image.new("RGB", (300, 200)).save(ok)
    src = Source([str(ok), str(strip)], np.zeros(2, np.int32), ["ok.png", "strip.png"], "t")
    report = check_sources({"train": src}, resize=256, threads=1, progress=False)
    assert [b["where"] for b in report["bad"]] == ["strip.png"]


def test_an_image_decoded_whole_is_refused_over_the_pixel_limit_before_decoding(
    tmp_path, monkeypatch
):
    """Without a resize (thumbnails, the page) the header's size is checked first: a strip
    over the limit is refused, never decoded (the real limit is 100 million pixels)."""
    from csce_jax.data import images

    strip = tmp_path / "strip.png"
    Image.new("L", (1, 20000)).save(strip)
    monkeypatch.setattr(images, "MAX_DECODED_PIXELS", 10_000)
    decoded = []
    monkeypatch.setattr(images.ImageFile.ImageFile, "load", lambda self: decoded.append(1))
    with pytest.raises(DataError, match="1 x 20000 pixels, over 10,000 pixels to decode whole"):
        load_rgb(str(strip), None, "strip.png")
    assert decoded == []


@pytest.mark.parametrize("lr", [0.0, -0.01, float("nan")])
def test_a_learning_rate_that_is_not_positive_is_refused(lr):
    c = tiny_config()
    c.optimizer.lr = lr
    with pytest.raises(ConfigError, match="config.optimizer.lr=.*must be a positive"):
        check_config(c, 4, 1)


def test_sixteen_bit_images_are_scaled_not_saturated(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    got = np.asarray(load_rgb(str(tmp_path / "deep.png")))[..., 0].astype(int)
    expect = np.round(ramp / 257.0).astype(int)
    assert np.abs(got - expect).max() <= 1
    assert (got == 255).mean() < 0.01  # PIL's own conversion turns ~99.6 % of it white


def test_image_folders_skip_hidden_system_and_empty_folders(tmp_path, caplog):
    root = tmp_path / "imgs"
    for cls in ("ant", "bee"):
        (root / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / cls / "a.jpg")
    (root / "bee" / "._a.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (root / "ant" / "._a.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    for junk in (".ipynb_checkpoints", "__MACOSX", "empty"):
        (root / junk).mkdir()
    Image.new("RGB", (8, 8)).save(root / ".ipynb_checkpoints" / "x.jpg")
    Image.new("RGB", (8, 8)).save(root / "__MACOSX" / "y.jpg")
    with caplog.at_level("WARNING"):
        src, classes = folder_source(root)
    assert classes == ["ant", "bee"] and len(src) == 2
    assert src.labels.tolist() == [0, 1]
    log = caplog.text
    assert ".ipynb_checkpoints" in log and "__MACOSX" in log and "empty" in log
    assert log.count("hidden image-named files") == 1 and "ignored 2 hidden" in log


def test_an_empty_validation_split_is_flagged_in_the_log_and_metrics(tmp_path, caplog):
    c = tiny_config(2)
    c.data.val_fraction = 0.0
    with caplog.at_level("WARNING"):
        final = loop.train_and_evaluate(c, tmp_path)
    assert "selected on the QUERY set" in caplog.text
    rows = read_rows(tmp_path)
    assert rows[0]["select_on"] == "query" and "validation split is empty" in rows[0]["warning"]
    assert final["select_on"] == "query"
    assert any("select_map" in r for r in rows) and not any("val_map" in r for r in rows)


def _aircraft(tmp_path, height=60):
    base = tmp_path / "fgvc-aircraft-2013b" / "data"
    (base / "images").mkdir(parents=True)
    (base / "variants.txt").write_text("707-320\n")
    (base / "images_variant_trainval.txt").write_text("0001 707-320\n")
    (base / "images_variant_test.txt").write_text("0002 707-320\n")
    for i in ("0001", "0002"):
        arr = np.full((height, 80, 3), 30, np.uint8)
        arr[-20:] = 250  # the banner
        Image.fromarray(arr).save(base / "images" / f"{i}.jpg", quality=100)
    return tmp_path


def test_the_aircraft_banner_is_cropped_unless_kept(tmp_path):
    manual = _aircraft(tmp_path)
    train, _ = aircraft_sources(manual)
    rec = train[0]
    img = np.asarray(load_rgb(rec["image"], trim_bottom=train.trim_bottom))
    assert img.shape[:2] == (40, 80) and img.max() < 60  # no banner row left (250)
    kept, _ = aircraft_sources(manual, keep_banner=True)
    assert np.asarray(load_rgb(kept[0]["image"], trim_bottom=kept.trim_bottom)).shape[0] == 60


def _folder_with_corrupt(tmp_path, corrupt=2):
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(6):
            arr = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / f"c{c}" / f"{i}.jpg")
    for i in range(corrupt):
        (root / f"c{i}" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return root


def _folder_config(root, steps=2):
    c = tiny_config(steps)
    c.data.name = "folder"
    c.data.image_root = str(root)
    c.data.resize, c.data.crop = 112, 112
    c.data.query_fraction = 0.2
    c.data.val_fraction = 0.2
    return c


def test_skipped_images_are_counted_once_per_run(tmp_path, caplog):
    root = _folder_with_corrupt(tmp_path)
    c = _folder_config(root)
    c.data.skip_corrupt = True
    c.total_steps = 6  # enough batches to meet every training image
    c.eval_every_steps = c.checkpoint_every_steps = 6
    with caplog.at_level("WARNING"):
        final = loop.train_and_evaluate(c, tmp_path / "run")
    assert final["skipped_images"] == 2
    # Each image is logged once, though the training loader and every split's encoding meet it.
    warned = [r for r in caplog.records if "skipped unreadable image" in r.getMessage()]
    assert len([r for r in warned if str(root) in r.getMessage()]) == 2, [
        r.getMessage() for r in warned
    ]
    logged = [r["skipped_images"] for r in read_rows(tmp_path / "run") if "loss" in r]
    assert logged == sorted(logged) and max(logged) <= 2


def test_verify_finds_corrupt_images_up_front(tmp_path):
    root = _folder_with_corrupt(tmp_path, corrupt=1)
    out = run_module(
        "-m",
        "csce_jax.commands.verify",
        "--config",
        "configs/default.py",
        "--config.data.name=folder",
        f"--config.data.image_root={root}",
        f"--out={tmp_path / 'report.json'}",
    )
    assert out.returncode == 1, out.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["checked"] == 19 and [b["where"] for b in report["bad"]] == [
        str(root / "c0" / "broken.jpg")
    ]
    assert "verify: 19/19 images (100%), 1 unreadable" in out.stderr
    c = _folder_config(root)
    c.data.verify = True
    with pytest.raises(DataError, match=r"1 unreadable image\(s\).*broken.jpg.*data_report.json"):
        loop.train_and_evaluate(c, tmp_path / "run")
    assert saved_steps(tmp_path / "run") == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--config", "configs/default.py:foo=1"], "unknown config argument 'foo'"),
        (["--config", "configs/default.py:bits=abc"], "bits='abc': expected int"),
        (["--config", "{bad}"], "line 1: syntax error"),
        (["--config", "{empty}"], "has no get_config() function"),
        (["--config", "configs/default.py", "--workdir", "{file}"], "is not a folder"),
    ],
)
def test_entry_point_errors_are_one_line(tmp_path, args, message):
    (tmp_path / "bad.py").write_text("def get_config(:\n")
    (tmp_path / "empty.py").write_text("X = 1\n")
    (tmp_path / "file").write_text("")
    args = [
        a.format(bad=tmp_path / "bad.py", empty=tmp_path / "empty.py", file=tmp_path / "file")
        for a in args
    ]
    if "--workdir" not in args:
        args += ["--workdir", str(tmp_path / "w")]
    out = run_module("train.py", *args)
    assert out.returncode in (1, 2)
    lines = out.stderr.strip().splitlines()
    assert "Traceback" not in out.stderr and lines[-1].startswith("error: ")
    assert message in lines[-1], out.stderr[-2000:]


def test_split_list_size_mismatch_is_one_line(tmp_path):
    base = _aircraft(tmp_path)
    out = run_module(
        "-m",
        "csce_jax.commands.splits",
        "--dataset=aircraft",
        f"--manual_dir={base}",
        f"--out={tmp_path / 'x'}",
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "documented 6667" in out.stderr.strip().splitlines()[-1]


def test_tfds_never_downloads_unless_asked(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    calls = []

    def fake(name, **kwargs):
        calls.append(kwargs.get("download"))
        raise FileNotFoundError("not prepared")

    monkeypatch.setattr(tfds, "data_source", fake)
    with pytest.raises(DataError, match="`tfds build caltech_birds2011 --data_dir=...`"):
        tfds_source("caltech_birds2011", "train", data_dir=str(tmp_path))
    assert calls == [False]
    c = tiny_config()
    c.data.name, c.data.data_dir, c.data.download = "cub200", str(tmp_path), True
    with pytest.raises(DataError):
        load_data(c.data)
    assert calls[-1] is True


def test_checkpoint_folder_opened_read_only_needs_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoints in"):
        Checkpoints(tmp_path, read_only=True)
    assert list(tmp_path.iterdir()) == []


def test_only_the_closed_event_loop_tracebacks_are_dropped(capsys, monkeypatch):
    import sys

    from csce_jax.commands import cli

    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
    cli._drop_closed_loop_tracebacks()
    for exc in (RuntimeError("Event loop is closed"), ValueError("a real failure")):
        try:
            raise exc
        except Exception as e:
            sys.excepthook(type(e), e, e.__traceback__)
    err = capsys.readouterr().err
    assert "a real failure" in err and "Event loop is closed" not in err


def test_precision_at_k_keys_are_written_in_numeric_order(tmp_path):
    from csce_jax.utils.atomic import write_json_atomically

    rng = np.random.default_rng(0)
    codes = np.where(rng.random((600, 16)) > 0.5, 1, -1).astype(np.int8)
    labels = rng.integers(0, 3, 600)
    result = evaluator.score(
        {"codes": codes[:10], "labels": labels[:10]},
        {"codes": codes, "labels": labels},
        None,
        curves=True,
    )
    write_json_atomically(tmp_path / "metrics.json", result)
    text = (tmp_path / "metrics.json").read_text()
    written = json.loads(text)["precision_at_k"]
    assert list(written) == ["1", "10", "50", "100", "500"]  # not "1", "10", "100", "50"
    assert list(json.loads(text)) == sorted(json.loads(text))  # other keys alphabetical


def test_a_launch_refused_for_missing_data_leaves_no_run_folder(tmp_path):
    """The data are checked inside the locked run folder; a refused launch removes the
    folder it made (its lock and an empty checkpoint folder), never one that was there."""
    from csce_jax.data import DataError

    c = tiny_config(1)
    c.data.name, c.data.list_dir = "lists", str(tmp_path / "no_lists")
    with pytest.raises(DataError):
        loop.train_and_evaluate(c, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    (tmp_path / "mine").mkdir()
    with pytest.raises(DataError):
        loop.train_and_evaluate(c, tmp_path / "mine")
    assert (tmp_path / "mine").is_dir()  # not made by the launch: kept


def test_the_leftover_check_names_an_orphan_of_the_suite_and_no_other_process():
    """The end-of-suite check: an orphan started from the suite is named; an orphan of
    another shell (no session mark) is not."""
    unmarked_env = {k: v for k, v in os.environ.items() if k != SESSION_MARK}
    start = ["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"]
    ours = int(subprocess.run(start, capture_output=True, text=True, check=True).stdout)
    other = int(
        subprocess.run(start, capture_output=True, text=True, check=True, env=unmarked_env).stdout
    )
    try:
        named = {int(line.split(":")[0]) for line in leftover_processes()}
        assert ours in named
        assert other not in named
    finally:
        for pid in (ours, other):
            os.kill(pid, signal.SIGKILL)
