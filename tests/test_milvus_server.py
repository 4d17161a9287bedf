"""The milvus engine against a real Milvus server (2.3.5 standalone, authentication on): flat
and IVF indexes and label filters against the scan, an insert killed and run again, two
processes of one job filling one collection, another index's collection refused, tokens, and
a server that stops between two queries and comes back."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import MILVUS_SERVER_TOKEN, ROOT, milvus_items, run_job
from test_search import _photos

from csce_jax.errors import CodesError
from csce_jax.retrieval import metrics
from csce_jax.search import build_index, load_index, milvus, queries

pytest.importorskip("pymilvus")

PHOTOS = 24


@pytest.fixture(autouse=True)
def _token(monkeypatch):
    monkeypatch.setenv(milvus.TOKEN_ENV, MILVUS_SERVER_TOKEN)


def _list_file(photos, path):
    """A DeepHash list of the photos with 1-3 of 4 classes each: labels such as "0,2"."""
    rng = np.random.default_rng(0)
    lines = []
    for p in sorted(photos.rglob("*.png")):
        hot = (rng.random(4) < 0.4).astype(int)
        hot[rng.integers(4)] = 1
        lines.append(f"{p} " + " ".join(map(str, hot)))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def server_indexes(milvus_server, trained_run, tmp_path_factory):
    """The photos (folder labels) and a multi-label list of them, each indexed with the scan,
    into the server with BIN_FLAT, and with BIN_IVF_FLAT."""
    root = tmp_path_factory.mktemp("server_indexes")
    photos = _photos(root / "photos", n=PHOTOS)
    listed = _list_file(photos, root / "multi.txt")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(milvus.TOKEN_ENV, MILVUS_SERVER_TOKEN)
        for source, given in (
            ("folder", {"images": str(photos)}),
            ("list", {"list_file": str(listed)}),
        ):
            build_index(str(trained_run), str(root / f"{source}_scan"), shard_size=8, **given)
            for kind, params in (("bin_flat", {}), ("bin_ivf_flat", {"nlist": 4, "nprobe": 4})):
                summary = build_index(
                    str(trained_run),
                    str(root / f"{source}_{kind}"),
                    shard_size=8,
                    engine="milvus",
                    engine_params=params,
                    milvus_settings={
                        "uri": milvus_server.uri,
                        "collection": f"csce_{source}_{kind}",
                        "index": kind,
                    },
                    **given,
                )
                assert summary["indexed"] == PHOTOS
    return root, photos


def server_indexes_answer_and_filter_labels_as_the_scan_does(server_indexes):
    """Flat and IVF, over folder labels and multi-label list labels."""
    root, photos = server_indexes
    files = sorted(str(p) for p in photos.rglob("*.png"))[:6]
    for source in ("folder", "list"):
        for kind in ("bin_flat", "bin_ivf_flat"):
            _same_as_the_scan(root / f"{source}_scan", root / f"{source}_{kind}", files)


def _same_as_the_scan(scan_index, server_index, files):
    with queries.Searcher(scan_index) as scan, queries.Searcher(server_index) as srv:
        assert srv.engine.name == "milvus"
        want, got = scan.query_files(files, PHOTOS), srv.query_files(files, PHOTOS)
        for w, g in zip(want["queries"], got["queries"], strict=True):
            assert [h["distance"] for h in g["hits"]] == [h["distance"] for h in w["hits"]]
            assert {h["path"] for h in g["hits"]} == {h["path"] for h in w["hits"]}
        labels = {c for text in scan.index.labels for c in text.split(",")}
        labels.add(scan.index.labels[0])
        for label in sorted(labels):
            w = scan.query_files(files[:2], PHOTOS, label=label)["queries"]
            g = srv.query_files(files[:2], PHOTOS, label=label)["queries"]
            for wq, gq in zip(w, g, strict=True):
                where = (server_index.name, label)
                assert gq["hits"], where
                assert {h["path"] for h in gq["hits"]} == {h["path"] for h in wq["hits"]}, where
                assert [h["distance"] for h in gq["hits"]] == [h["distance"] for h in wq["hits"]]


def _index_command(trained_run, images, out, uri, collection) -> list[str]:
    return [
        *(sys.executable, "-m", "csce_jax.commands.search", "index", "--workdir", str(trained_run)),
        *("--images", str(images), "--out", str(out), "--engine", "milvus", "--shard_size", "2"),
        *("--milvus_uri", uri, "--milvus_collection", collection),
    ]


def an_insert_killed_and_run_again_has_every_row_once(
    milvus_server, trained_run, server_indexes, tmp_path
):
    _, photos = server_indexes
    out = tmp_path / "idx"
    cmd = _index_command(trained_run, photos, out, milvus_server.uri, "csce_killed")
    env = {**os.environ, milvus.TOKEN_ENV: MILVUS_SERVER_TOKEN}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 240
    while len(list(out.glob("shards/*.milvus.json"))) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, "the index ended early"
        time.sleep(0.02)
    proc.kill()  # SIGKILL, between or inside a shard's delete, insert and marker
    proc.wait()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "inserted earlier" in done.stderr
    assert milvus_items(out) == list(range(PHOTOS))


def two_processes_insert_their_shards_into_one_server_collection(
    milvus_server, trained_run, server_indexes, tmp_path
):
    """A job of two processes (jax.distributed on 127.0.0.1): each inserts its own shards into
    the server's collection, and a query sees every image."""
    root, photos = server_indexes
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = _index_command(trained_run, photos, tmp_path / "two", milvus_server.uri, "csce_two")
    cmd += [f"--config.coordinator_address=127.0.0.1:{port}", "--config.num_processes=2"]
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        milvus.TOKEN_ENV: MILVUS_SERVER_TOKEN,
    }
    outs = run_job([[*cmd, f"--config.process_id={i}"] for i in range(2)], env=env)
    for out, code in outs:
        assert code == 0, out[-3000:]
    for i, (out, _) in enumerate(outs):  # each process inserted its half of the 12 shards
        assert f"[process {i}] milvus: {PHOTOS // 2}/{PHOTOS // 2} images" in out, out[-3000:]
    assert milvus_items(tmp_path / "two") == list(range(PHOTOS))
    index = load_index(tmp_path / "two")
    with queries.Searcher(tmp_path / "two") as two, queries.Searcher(root / "folder_scan") as scan:
        code = metrics.unpack_codes(index.codes[:3], index.meta["bits"])
        got, want = two.hits(code, PHOTOS), scan.hits(code, PHOTOS)
        for g, w in zip(got, want, strict=True):
            assert [h["distance"] for h in g] == [h["distance"] for h in w]


def a_collection_of_another_index_is_refused_in_one_line(
    milvus_server, trained_run, server_indexes, tmp_path
):
    del server_indexes  # the collection it made is the one reused
    other = _photos(tmp_path / "other", n=5)
    with pytest.raises(CodesError) as refused:
        build_index(
            str(trained_run),
            str(tmp_path / "idx"),
            images=str(other),
            engine="milvus",
            milvus_settings={"uri": milvus_server.uri, "collection": "csce_folder_bin_flat"},
        )
    message = str(refused.value)
    assert "collection csce_folder_bin_flat holds another index" in message and "\n" not in message
    assert not (tmp_path / "idx" / "index.json").exists()


def a_missing_or_wrong_token_is_one_line_naming_the_variable(
    milvus_server, server_indexes, monkeypatch, tmp_path
):
    root, _ = server_indexes
    monkeypatch.setenv(milvus.TOKEN_ENV, "root:not-the-password")
    with pytest.raises(CodesError) as wrong:
        queries.Searcher(root / "folder_bin_flat")
    assert "its token was refused" in str(wrong.value) and "$MILVUS_TOKEN" in str(wrong.value)
    assert "\n" not in str(wrong.value)
    monkeypatch.delenv(milvus.TOKEN_ENV)
    with pytest.raises(CodesError, match="needs authentication and no token was given"):
        queries.Searcher(root / "folder_bin_flat")
    env = {k: v for k, v in os.environ.items() if k != milvus.TOKEN_ENV}
    env[milvus.TOKEN_ENV] = "root:nope"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "csce_jax.commands.search", "query"),
            *("--index", str(root / "folder_bin_flat"), str(next(root.rglob("*.png")))),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1 and "its token was refused" in errors[0], errors
    assert "root:nope" not in done.stderr


def a_server_that_stops_between_two_queries_is_one_line_then_answers_again(
    milvus_server, server_indexes
):
    """Stopped: the next query fails within the call limit with one line; started again on
    its data: queries answer as before (no flush needed), a new searcher opens too."""
    root, photos = server_indexes
    query = [str(sorted(photos.rglob("*.png"))[0])]
    with queries.Searcher(root / "folder_bin_flat") as srv:
        before = srv.query_files(query, 10)["queries"][0]["hits"]
        milvus_server.stop()
        began = time.monotonic()
        with pytest.raises(CodesError) as gone:
            srv.query_files(query, 10)
        assert time.monotonic() - began < milvus.CALL_TIMEOUT_S + 15
        message = str(gone.value)
        assert message.startswith(f"Milvus at {milvus_server.uri}") and "\n" not in message
        milvus_server.start()
        deadline, after = time.monotonic() + 180, None
        while after is None:
            try:
                after = srv.query_files(query, 10)["queries"][0]["hits"]
            except CodesError:
                assert time.monotonic() < deadline, "the server did not answer again"
                time.sleep(2)
    assert [h["distance"] for h in after] == [h["distance"] for h in before]
    with queries.Searcher(root / "folder_bin_flat") as again:
        assert again.query_files(query, 10)["queries"][0]["hits"] == after


def test_against_a_real_milvus_server(
    milvus_server, trained_run, server_indexes, tmp_path, monkeypatch
):
    """One test, so that one worker runs every step on the one server, in this order (the
    last stops and restarts it)."""
    server_indexes_answer_and_filter_labels_as_the_scan_does(server_indexes)
    an_insert_killed_and_run_again_has_every_row_once(
        milvus_server, trained_run, server_indexes, tmp_path / "killed"
    )
    two_processes_insert_their_shards_into_one_server_collection(
        milvus_server, trained_run, server_indexes, tmp_path / "two"
    )
    a_collection_of_another_index_is_refused_in_one_line(
        milvus_server, trained_run, server_indexes, tmp_path / "other"
    )
    with monkeypatch.context() as mp:
        a_missing_or_wrong_token_is_one_line_naming_the_variable(
            milvus_server, server_indexes, mp, tmp_path / "token"
        )
    a_server_that_stops_between_two_queries_is_one_line_then_answers_again(
        milvus_server, server_indexes
    )
