"""The milvus engine over Milvus Lite: BIN_FLAT against our exact scan, an index built, resumed
and filtered by label, and the bad states each refused in one line."""

import json
import os
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import milvus_items, run_job
from test_search import _clustered_codes, _photos

from csce_jax.errors import CodesError
from csce_jax.retrieval import metrics
from csce_jax.search import build_index, engines, load_index, milvus, queries

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")


def _milvus_engine(folder, packed, bits, labels=None):
    """Packed codes in a Milvus Lite collection (one shard, items 0..N-1), as an engine."""
    record = milvus.settings(folder)
    store = milvus.Store(record, folder)
    n = len(packed)
    shard = {
        "rows": np.arange(n, dtype=np.int64),
        "codes": packed,
        "labels": np.asarray(labels or [""] * n, dtype=str),
        "paths": np.asarray([f"/img/{i}.jpg" for i in range(n)], dtype=str),
    }
    store.ensure({"bits": bits}, "plan-a", bits)
    store.insert_shard(shard, folder / "00000.milvus.json", "plan-a")
    store.check_index("plan-a", n)
    return engines.MilvusEngine(packed, bits, record, store, shard["rows"])


@pytest.mark.parametrize("bits", [12, 32, 48, 64])
def test_bin_flat_returns_the_exact_scan_hits_and_distances(bits, tmp_path):
    """Same distances; the same hits in the same order wherever the distance is below the
    k-th (ties sorted by index as ours are); at the k-th distance Milvus may pick other items
    of that distance than the lowest-numbered ones, so there only the count is equal."""
    rng = np.random.default_rng(bits)
    db = metrics.pack_codes(_clustered_codes(rng, 3000, bits))
    q = metrics.pack_codes(_clustered_codes(rng, 40, bits))
    scan = engines.load({"name": "scan"}, db, bits, tmp_path)
    mil = _milvus_engine(tmp_path, db, bits)
    try:
        i_scan, d_scan = scan.search(q, 50)
        i_mil, d_mil = mil.search(q, 50)
    finally:
        mil.close()
    assert (d_scan[:, :-1] == d_scan[:, 1:]).any()  # ties are there
    np.testing.assert_array_equal(d_mil, d_scan)
    real = metrics.hamming_distances(q, db, bits=bits)
    np.testing.assert_array_equal(np.take_along_axis(real, i_mil, axis=1), d_mil)  # true
    for row in range(len(q)):
        inside = d_scan[row] < d_scan[row, -1]
        np.testing.assert_array_equal(i_mil[row][inside], i_scan[row][inside])
        assert len(set(i_mil[row])) == 50  # no item twice


def test_a_milvus_lite_server_slow_to_start_is_waited_for(tmp_path, monkeypatch):
    """Milvus Lite's server process made to take 12 s before it starts (as on a busy disk):
    the store waits for it instead of calling it not started after a remote server's 10 s."""
    import time

    from milvus_lite import server as lite_server

    slow = tmp_path / "slow_bin"
    slow.mkdir()
    real = Path(lite_server.BIN_PATH)
    (slow / "milvus").write_text(
        f'#!/bin/sh\nsleep 12\nLD_LIBRARY_PATH="{real}" exec "{real / "milvus"}" "$@"\n'
    )
    (slow / "milvus").chmod(0o755)
    monkeypatch.setenv("BIN_PATH", str(slow))  # where milvus-lite 2.5.1 finds its server
    folder = tmp_path / "idx"
    folder.mkdir()
    began = time.monotonic()
    store = milvus.Store(milvus.settings(folder), folder)
    try:
        waited = time.monotonic() - began
        assert store.client.list_collections() == []
    finally:
        store.close()
    assert waited >= 12


@pytest.fixture(scope="module")
def milvus_index(trained_run, tmp_path_factory):
    """14 digit photographs indexed twice, with the scan and with Milvus Lite (4 shards)."""
    root = tmp_path_factory.mktemp("milvus_index")
    photos = _photos(root / "photos")
    build_index(str(trained_run), str(root / "scan"), images=str(photos), shard_size=4)
    summary = build_index(
        str(trained_run), str(root / "mil"), images=str(photos), shard_size=4, engine="milvus"
    )
    assert summary["indexed"] == 14 and summary["engine"]["name"] == "milvus"
    return root, photos


def test_a_milvus_index_answers_as_the_scan_does_and_filters_labels(milvus_index):
    root, photos = milvus_index
    manifest = json.loads((root / "mil" / "index.json").read_text())
    assert manifest["engine"]["uri"] == milvus.LITE_FILE  # relative: the folder can move
    assert manifest["engine"]["shards_in_collection"] == [f"0000{j}.milvus.json" for j in range(4)]
    assert "token" not in manifest["engine"]  # only the variable's name, never a token
    files = sorted(str(p) for p in photos.rglob("*.png"))[:4]
    with queries.Searcher(root / "scan") as scan, queries.Searcher(root / "mil") as mil:
        want = scan.query_files(files, 14)
        got = mil.query_files(files, 14)
        for w, g in zip(want["queries"], got["queries"], strict=True):
            assert [h["distance"] for h in g["hits"]] == [h["distance"] for h in w["hits"]]
            assert {h["path"] for h in g["hits"]} == {h["path"] for h in w["hits"]}
            assert g["hits"][0]["path"] == g["query"]  # itself first
        label = mil.index.labels[0]
        filtered = mil.query_files(files[:1], 10, label=label)["queries"][0]["hits"]
        expected = scan.query_files(files[:1], 10, label=label)["queries"][0]["hits"]
        assert filtered and {h["label"] for h in filtered} == {label}
        assert [h["path"] for h in filtered] == [h["path"] for h in expected]


def test_an_interrupted_insert_resumes_without_duplicates(milvus_index, trained_run, tmp_path):
    root, photos = milvus_index
    partial = tmp_path / "mil"
    shutil.copytree(root / "mil", partial)
    (partial / "index.json").unlink()  # stopped after shard 1 went in, before its marker
    for j in (1, 2, 3):
        (partial / "shards" / f"0000{j}.milvus.json").unlink()
    build_index(str(trained_run), str(partial), images=str(photos), shard_size=4, engine="milvus")
    index = load_index(partial)
    store = milvus.Store(index.meta["engine"], partial)
    try:
        assert store.count() == 14  # shard 1 again, not twice
    finally:
        store.close()
    with queries.Searcher(partial) as mil:
        assert len(mil.hits(metrics.unpack_codes(index.codes[:1], index.meta["bits"]), 14)[0]) == 14


def test_a_collection_of_another_plan_is_refused_naming_what_differs(
    milvus_index, trained_run, tmp_path
):
    root, _ = milvus_index
    shared = {"uri": str(root / "mil" / milvus.LITE_FILE), "collection": "csce_mil"}
    other = _photos(tmp_path / "other", n=5)
    with pytest.raises(CodesError, match=r"holds another index \(.*collection.*differ"):
        build_index(
            str(trained_run),
            str(tmp_path / "idx"),
            images=str(other),
            engine="milvus",
            milvus_settings=shared,
        )


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_states_are_one_line_each(milvus_index, trained_run, tmp_path, monkeypatch):
    root, photos = milvus_index
    # A server that is not there: named, and nothing written.
    uri = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(CodesError, match=f"cannot reach Milvus at {uri}") as unreachable:
        build_index(
            str(trained_run),
            str(tmp_path / "srv"),
            images=str(photos),
            engine="milvus",
            milvus_settings={"uri": uri},
        )
    assert "\n" not in str(unreachable.value) and not (tmp_path / "srv").exists()
    # Milvus Lite has no BIN_IVF_FLAT: refused before any work.
    with pytest.raises(CodesError, match="Milvus Lite .* searches BIN_FLAT only"):
        milvus.settings(tmp_path, index="bin_ivf_flat")
    # The collection dropped (or changed) outside us.
    copy = tmp_path / "dropped"
    shutil.copytree(root / "mil", copy)
    store = milvus.Store(load_index(copy).meta["engine"], copy)
    store.client.drop_collection(store.collection)
    store.close()
    with pytest.raises(CodesError, match="is gone .dropped outside csce_jax."):
        queries.Searcher(copy)
    # A damaged Milvus Lite file.
    damaged = tmp_path / "damaged"
    shutil.copytree(root / "mil", damaged)
    with open(damaged / milvus.LITE_FILE, "r+b") as f:
        f.write(b"\0" * 64)
    with pytest.raises(CodesError, match="is not a Milvus Lite file"):
        queries.Searcher(damaged)
    # pymilvus not installed: the pip command.
    monkeypatch.setitem(sys.modules, "pymilvus", None)
    with pytest.raises(CodesError, match=r"pip install pymilvus==2\.6\.17 milvus-lite==2\.5\.1"):
        engines.check_engine("milvus", {})


def test_label_filters_are_exact_matches_of_a_label_or_one_of_its_classes():
    assert queries.label_matches("3,17", "17") and queries.label_matches("class3", "class3")
    assert not queries.label_matches("3,17", "1") and not queries.label_matches("13", "3")
    text = milvus.label_filter('a"b')
    assert text == 'label == "a\\"b" or array_contains(classes, "a\\"b")'
    old = milvus.label_filter('a"b', classes=False)  # a collection made without the field
    assert old.startswith('label == "a\\"b"') and 'like "%,a\\"b,%"' in old
    assert milvus.class_list("3,17") == ["3", "17"] and milvus.class_list("") == []


@pytest.mark.slow
def test_two_processes_fill_one_milvus_lite_collection(milvus_index, trained_run, tmp_path):
    """Two processes encode their shards; process 0, the one that may open a Milvus Lite
    file, inserts them all: the same codes and hits as one process."""
    root, photos = milvus_index
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    cmd = [sys.executable, "-m", "csce_jax.commands.search", "index", "--workdir", str(trained_run)]
    cmd += ["--images", str(photos), "--out", str(tmp_path / "two"), "--shard_size", "4"]
    cmd += ["--engine", "milvus", f"--config.coordinator_address=127.0.0.1:{_free_port()}"]
    cmd += ["--config.num_processes=2"]
    outs = run_job([[*cmd, f"--config.process_id={i}"] for i in range(2)], env=env)
    for out, code in outs:
        assert code == 0, out[-3000:]
    assert "milvus: 14/14 images" in outs[0][0]  # process 0 inserted all four shards
    one, two = load_index(root / "mil"), load_index(tmp_path / "two")
    np.testing.assert_array_equal(one.codes, two.codes)
    with queries.Searcher(tmp_path / "two") as searcher:
        assert searcher.engine.name == "milvus"
        hits = searcher.hits(metrics.unpack_codes(two.codes[:1], two.meta["bits"]), 14)[0]
        assert len(hits) == 14 and hits[0]["distance"] == 0


def test_the_page_api_passes_its_label_filter_to_milvus(milvus_index):
    import threading
    import urllib.request

    from csce_jax.search import server

    root, _ = milvus_index
    with queries.Searcher(root / "mil") as searcher:
        page = server.SearchServer(searcher, "127.0.0.1", 0)
        thread = threading.Thread(target=page.serve_forever, daemon=True)
        thread.start()
        try:
            label = searcher.index.labels[5]
            url = f"{page.url}api/search?item=0&k=5&label={label}"
            with urllib.request.urlopen(url, timeout=60) as answer:
                hits = json.loads(answer.read())["hits"]
        finally:
            page.shutdown()
            page.server_close()
    assert hits and {h["label"] for h in hits} == {label}
    assert [h["rank"] for h in hits] == list(range(1, len(hits) + 1))


def _index_command(trained_run, photos, out) -> list[str]:
    return [
        *(sys.executable, "-m", "csce_jax.commands.search", "index", "--workdir", str(trained_run)),
        *("--images", str(photos), "--out", str(out), "--engine", "milvus", "--shard_size", "2"),
    ]


def test_an_index_killed_during_its_milvus_insert_ends_with_every_row_once(trained_run, tmp_path):
    """SIGKILL once the first shards are in the Milvus Lite collection (no cleanup at all),
    then the same command again: every image's row is there exactly once."""
    import subprocess
    import time

    from conftest import ROOT

    photos = _photos(tmp_path / "photos", n=24)
    out = tmp_path / "idx"
    cmd = _index_command(trained_run, photos, out)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while len(list(out.glob("shards/*.milvus.json"))) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "the index ended early"
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert not (out / "index.json").exists()  # it was stopped before the end
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "inserted earlier" in done.stderr
    assert milvus_items(out) == list(range(24))


def test_an_index_on_a_full_disk_is_one_line_and_the_rerun_has_every_row_once(
    trained_run, tmp_path
):
    """Writes past 36 KiB refused (as a full disk refuses them) while Milvus Lite stores the
    codes: one line naming the collection, no traceback; run again with room: every row
    once."""
    import subprocess

    from conftest import ROOT, with_file_size_limit

    photos = _photos(tmp_path / "photos", n=40)
    out = tmp_path / "idx"
    cmd = _index_command(trained_run, photos, out)
    full = subprocess.run(
        with_file_size_limit(cmd, 36_000), cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert full.returncode == 1, full.stderr[-2000:]
    assert "Traceback" not in full.stderr, full.stderr[-3000:]
    lines = [ln for ln in full.stderr.splitlines() if ln.strip() and "images/s" not in ln]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and "a full disk" in errors[0], full.stderr[-3000:]
    assert not [ln for ln in lines if "ERROR" in ln], lines
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert milvus_items(out) == list(range(40))
