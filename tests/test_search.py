"""csce_jax.search: engines against the exact scan, the index folder (shards, resume, two
processes), batch queries, and the search page (HTTP, then a real headless browser)."""

import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import run_job
from PIL import Image

from csce_jax.data.digits import digits_images
from csce_jax.errors import CodesError
from csce_jax.retrieval import metrics
from csce_jax.search import build_index, engines, load_index, queries, server


def _clustered_codes(rng, n, bits, classes=20, flip=0.1):
    """Codes around a few centres: many exact ties, as trained codes have."""
    centres = rng.integers(0, 2, (classes, bits)) * 2 - 1
    noise = np.where(rng.random((n, bits)) < flip, -1, 1)
    return (centres[rng.integers(0, classes, n)] * noise).astype(np.int8)


@pytest.mark.parametrize("bits", [12, 32, 48, 64])
def test_faiss_flat_returns_the_exact_scan_hits_ties_in_index_order(bits, tmp_path):
    pytest.importorskip("faiss")
    rng = np.random.default_rng(bits)
    db = metrics.pack_codes(_clustered_codes(rng, 3000, bits))
    q = metrics.pack_codes(_clustered_codes(rng, 70, bits))
    scan = engines.load(engines.build("scan", db, bits, {}, tmp_path), db, bits, tmp_path)
    flat = engines.load(engines.build("faiss-flat", db, bits, {}, tmp_path), db, bits, tmp_path)
    i_scan, d_scan = scan.search(q, 50)
    i_flat, d_flat = flat.search(q, 50)
    assert (d_scan[:, :-1] == d_scan[:, 1:]).any()  # ties are there to be ordered
    np.testing.assert_array_equal(d_flat, d_scan)
    np.testing.assert_array_equal(i_flat, i_scan)
    # Against plain numpy: distances over the unpacked {-1,+1} codes, a stable sort.
    full = (
        bits - metrics.unpack_codes(q, bits).astype(int) @ metrics.unpack_codes(db, bits).T
    ) // 2
    np.testing.assert_array_equal(i_scan, np.argsort(full, axis=1, kind="stable")[:, :50])


@pytest.mark.parametrize("engine", ["faiss-ivf", "faiss-hnsw"])
def test_approximate_engines_are_saved_and_find_the_near_codes(engine, tmp_path):
    pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    db = metrics.pack_codes(_clustered_codes(rng, 4000, 32))
    q = metrics.pack_codes(_clustered_codes(rng, 50, 32))
    record = engines.build(engine, db, 32, {}, tmp_path)
    assert (tmp_path / record["file"]).is_file() and record["params"]
    idx, dist = engines.load(record, db, 32, tmp_path).search(q, 10)
    _, exact_dist = engines.load({"name": "scan"}, db, 32, tmp_path).search(q, 10)
    assert (np.diff(dist, axis=1) >= 0).all()
    # What it returns is true: each distance is the real one of that code.
    real = metrics.hamming_distances(q, db, bits=32)
    np.testing.assert_array_equal(np.take_along_axis(real, idx, axis=1), dist)
    # Within its k-th distance, the approximate engine misses little (clustered codes).
    assert (dist[:, -1] <= exact_dist[:, -1] + 2).mean() > 0.9
    with pytest.raises(CodesError, match="rebuild the index"):
        engines.load(record, db[:-1], 32, tmp_path)


def test_a_changed_or_missing_faiss_file_is_refused_by_its_digest(tmp_path):
    """8 bytes changed inside an IVF file still read as a faiss index (other hits, no word)
    unless its digest, recorded when it was written, is checked."""
    pytest.importorskip("faiss")
    rng = np.random.default_rng(1)
    db = metrics.pack_codes(_clustered_codes(rng, 3000, 64))
    record = engines.build("faiss-ivf", db, 64, {}, tmp_path)
    path = tmp_path / record["file"]
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(255 - b for b in data[middle : middle + 8])
    path.write_bytes(bytes(data))
    with pytest.raises(CodesError, match="does not match the digest recorded in index.json"):
        engines.load(record, db, 64, tmp_path)
    path.unlink()
    with pytest.raises(CodesError, match="is missing, but the manifest names the faiss-ivf"):
        engines.load(record, db, 64, tmp_path)


def test_without_faiss_the_engine_is_refused_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(CodesError, match=r"pip install faiss-cpu"):
        engines.check_engine("faiss-ivf", {})
    with pytest.raises(CodesError, match="expected one of scan"):
        engines.check_engine("annoy", {})


def _photos(folder, n=14):
    images, labels = digits_images()
    for i in range(n):
        sub = folder / f"class{labels[i]}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).convert("RGB").save(sub / f"d{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def photo_index(trained_run, tmp_path_factory):
    """An index of 14 digit photographs in sub-folders named by class, in 4 shards."""
    root = tmp_path_factory.mktemp("photo_index")
    photos = _photos(root / "photos")
    summary = build_index(str(trained_run), str(root / "idx"), images=str(photos), shard_size=4)
    assert summary["indexed"] == 14 and summary["shards"] == 4
    return root / "idx", photos


def test_a_shard_replaced_by_another_or_an_edited_manifest_is_refused(photo_index, tmp_path):
    index, _ = photo_index
    copy = tmp_path / "idx"
    shutil.copytree(index, copy)
    assert len(load_index(copy).paths) == 14
    shutil.copy(copy / "shards" / "00000.npz", copy / "shards" / "00001.npz")  # same plan, count
    with pytest.raises(CodesError, match=r"00001.npz does not match the digest"):
        load_index(copy)
    shutil.copy(index / "shards" / "00001.npz", copy / "shards" / "00001.npz")
    manifest = json.loads((copy / "index.json").read_text())
    manifest["skipped"] = ["an edit"]
    (copy / "index.json").write_text(json.dumps(manifest))
    with pytest.raises(CodesError, match="index.json does not match its own digest"):
        load_index(copy)


def test_an_interrupted_index_resumes_without_redoing_finished_shards(
    photo_index, trained_run, tmp_path, monkeypatch
):
    index, photos = photo_index
    whole = load_index(index)
    assert whole.labels[0].startswith("class") and len(set(whole.paths)) == 14
    partial = tmp_path / "idx"
    shutil.copytree(index, partial)
    (partial / "index.json").unlink()  # as if stopped before shard 2 and the manifest
    (partial / "shards" / "00002.npz").unlink()
    with pytest.raises(CodesError, match="unfinished index"):
        load_index(partial)
    from csce_jax.search.encoder import RunEncoder

    encoded = []
    real = RunEncoder.encode
    monkeypatch.setattr(
        RunEncoder, "encode", lambda s, src, **kw: encoded.append(len(src)) or real(s, src, **kw)
    )
    build_index(str(trained_run), str(partial), images=str(photos), shard_size=4)
    assert encoded == [4]  # only the missing shard
    again = load_index(partial)
    np.testing.assert_array_equal(again.codes, whole.codes)
    assert again.paths == whole.paths and again.labels == whole.labels
    # Another collection into the same folder is refused, naming what differs.
    (photos / "class0" / "d00.png").rename(photos / "extra.png")
    try:
        with pytest.raises(CodesError, match="holds .part of. another index .collection"):
            build_index(str(trained_run), str(partial), images=str(photos), shard_size=4)
    finally:
        (photos / "extra.png").rename(photos / "class0" / "d00.png")


def test_a_list_file_is_indexed_with_its_classes_as_labels(photo_index, trained_run, tmp_path):
    index, photos = photo_index
    files = sorted(photos.rglob("*.png"))[:5]
    lines = []
    for i, f in enumerate(files):
        vec = ["0"] * 10
        vec[i % 10] = vec[(i + 3) % 10] = "1"  # two classes each (multi-label)
        lines.append(f"{f.relative_to(photos)} {' '.join(vec)}")
    (tmp_path / "db.txt").write_text("\n".join(lines) + "\n")
    summary = build_index(
        str(trained_run),
        str(tmp_path / "idx"),
        list_file=str(tmp_path / "db.txt"),
        image_root=str(photos),
    )
    got = load_index(tmp_path / "idx")
    assert summary["indexed"] == 5 and got.paths == [str(f) for f in files]
    assert got.labels == ["0,3", "1,4", "2,5", "3,6", "4,7"]
    whole = load_index(index)
    for path, code in zip(got.paths, got.codes, strict=True):  # the same codes as the folder's
        np.testing.assert_array_equal(code, whole.codes[whole.paths.index(path)])
    with pytest.raises(CodesError, match="give one of --images DIR, --list FILE"):
        build_index(
            str(trained_run),
            str(tmp_path / "x"),
            images=str(photos),
            list_file=str(tmp_path / "db.txt"),
        )


def test_batch_queries_write_json_and_csv_with_labels(photo_index, tmp_path):
    index, photos = photo_index
    searcher = queries.Searcher(index)
    files = sorted(str(p) for p in photos.rglob("*.png"))[:3]
    result = searcher.query_files([*files, str(tmp_path / "missing.png")], 5)
    assert [q["query"] for q in result["queries"]] == files
    assert len(result["skipped"]) == 1 and "missing.png" in result["skipped"][0]
    for q in result["queries"]:
        (own,) = [h for h in q["hits"] if h["path"] == q["query"]]
        assert own["distance"] == 0 and q["hits"][0]["distance"] == 0  # it finds itself
        assert own["label"] == Path(q["query"]).parent.name
        assert [h["rank"] for h in q["hits"]] == [1, 2, 3, 4, 5]
    queries.write_hits(result, str(tmp_path / "hits.json"))
    queries.write_hits(result, str(tmp_path / "hits.csv"))
    assert json.loads((tmp_path / "hits.json").read_text()) == result
    rows = (tmp_path / "hits.csv").read_text().splitlines()
    assert rows[0] == "query,rank,distance,index,label,path" and len(rows) == 1 + 15
    with pytest.raises(CodesError, match="expected a .json or .csv"):
        queries.write_hits(result, str(tmp_path / "hits.txt"))


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_encode_the_same_codes_as_one(trained_run, tmp_path):
    photos = _photos(tmp_path / "photos", n=10)
    one = tmp_path / "one"
    build_index(str(trained_run), str(one), images=str(photos), shard_size=3)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "csce_jax.commands.search",
        "index",
        "--workdir",
        str(trained_run),
        "--images",
        str(photos),
        "--out",
        str(tmp_path / "two"),
        "--shard_size",
        "3",
        f"--config.coordinator_address=127.0.0.1:{port}",
        "--config.num_processes=2",
    ]
    outs = run_job([[*cmd, f"--config.process_id={i}"] for i in range(2)], env=env)
    for out, code in outs:
        assert code == 0, out[-3000:]
    assert "[process 1] index: 4/4 images" in outs[1][0]  # shards 1 and 3 (3 + 1 images)
    summary = [line for line in outs[0][0].splitlines() if line.startswith('{"')]
    assert json.loads(summary[-1])["indexed"] == 10
    a, b = load_index(one), load_index(tmp_path / "two")
    np.testing.assert_array_equal(a.codes, b.codes)
    assert a.paths == b.paths


@pytest.fixture(scope="module")
def page(photo_index):
    """The search page over the photo index, served on 127.0.0.1 from this process."""
    index, photos = photo_index
    srv = server.SearchServer(queries.Searcher(index), "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv, photos
    srv.shutdown()
    srv.server_close()


def _ask(url, data=None, headers=None):
    req = urllib.request.Request(
        url, data=data, method="POST" if data is not None else "GET", headers=headers or {}
    )
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _tree(folder):
    return sorted((str(p), p.stat().st_mtime_ns) for p in Path(folder).rglob("*"))


def test_the_page_answers_queries_and_refuses_bad_uploads(page, photo_index, tmp_path):
    srv, photos = page
    index, _ = photo_index
    before, cwd_before = _tree(index.parent), _tree(Path.cwd())
    status, body = _ask(srv.url + "api/info")
    assert status == 200 and json.loads(body)["count"] == 14 and json.loads(body)["bits"] == 64
    query = sorted(photos.rglob("*.png"))[5]
    status, body = _ask(srv.url + "api/search?k=3", query.read_bytes())
    hits = json.loads(body)["hits"]
    assert (
        status == 200
        and {"path": str(query), "distance": 0}.items()
        <= next(h for h in hits if h["path"] == str(query)).items()
    )
    status, body = _ask(srv.url + "api/search?item=2&k=4")
    assert status == 200 and 2 in [
        h["index"] for h in json.loads(body)["hits"] if not h["distance"]
    ]
    assert _ask(srv.url + "thumb/2")[1][:2] == b"\xff\xd8"  # a JPEG thumbnail
    huge = Image.new("L", (1, 20000))
    buf = tmp_path / "strip.png"
    huge.save(buf)
    for data, status_wanted, message in (
        (b"", 400, "empty upload"),
        (b"%PDF-1.4 not a picture", 400, "not an image"),
        (buf.read_bytes(), 400, "1 x 20000 pixels refused"),
    ):
        status, body = _ask(srv.url + "api/search?k=3", data)
        assert status == status_wanted and message in json.loads(body)["error"], body
    status, body = _ask(srv.url + "api/search?k=3", b"x", {"Content-Length": str(300 * 2**20)})
    assert status == 413 and "at most 20 MiB" in json.loads(body)["error"]
    for path in (
        "thumb/../../../etc/passwd",
        "thumb/14",
        "thumb/-1",
        "etc/passwd",
        "api/search?item=%2Fetc%2Fpasswd",
    ):
        status, body = _ask(srv.url + path)
        assert status == 404 and b"root:" not in body, path
    assert _ask(srv.url + "api/search?item=1&k=1000")[0] == 400
    for query in ("item=1&k=%C2%B2", "item=%D9%A3&k=3", "item=1&k=%D9%A3"):  # ², Arabic 3
        status, body = _ask(srv.url + "api/search?" + query)
        assert status == 400 and "expected a whole number" in json.loads(body)["error"], query
    assert _tree(index.parent) == before and _tree(Path.cwd()) == cwd_before  # nothing written


def _raw_post(srv, length: int, body: bytes) -> bytes:
    """A POST that announces ``length`` bytes and sends ``body``; what the server answers
    before it closes the connection."""
    host, port = srv.server_address[:2]
    with socket.create_connection((host, port), timeout=20) as conn:
        head = f"POST /api/search?k=3 HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n"
        conn.sendall(head.encode() + body)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


def test_the_page_cuts_off_a_stalled_upload_and_answers_an_oversized_one(page):
    """A client that announces more bytes than it sends is answered 408 and closed after the
    request timeout, while others are served; an over-limit body gets its 413 message before
    the connection closes, even while the client is still sending."""
    srv, _ = page
    srv.request_timeout = 1.0
    try:
        stalled = {}
        thread = threading.Thread(
            target=lambda: stalled.update(answer=_raw_post(srv, 1000, b"x" * 10))
        )
        thread.start()
        assert _ask(srv.url + "api/info")[0] == 200  # served meanwhile
        thread.join(timeout=15)
        assert not thread.is_alive() and stalled["answer"].startswith(b"HTTP/1.0 408")
        assert b"after 10 of 1000 bytes" in stalled["answer"]
        big = _raw_post(srv, 21 * 2**20, b"y" * (2 * 2**20))  # 2 MiB of 21 announced
        assert big.startswith(b"HTTP/1.0 413") and b"at most 20 MiB" in big
    finally:
        srv.request_timeout = server.REQUEST_TIMEOUT


def _raw(srv, head: str, body: bytes = b"", linger_reset: bool = False) -> bytes:
    """Send ``head`` (request line and headers) and ``body`` as they are; the answer read until
    the server closes. ``linger_reset``: leave at once with a reset, reading nothing."""
    host, port = srv.server_address[:2]
    with socket.create_connection((host, port), timeout=20) as conn:
        conn.sendall(head.encode() + b"\r\n" + body)
        if linger_reset:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return b""
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


def test_an_upload_of_ambiguous_length_is_refused(page):
    """Two different Content-Length headers, or one beside Transfer-Encoding, are answered
    400 (RFC 9112: the body's end is ambiguous); the same length twice is one length."""
    srv, photos = page
    image = sorted(photos.rglob("*.png"))[0].read_bytes()
    n = len(image)
    post = "POST /api/search?k=3 HTTP/1.1\r\nHost: x\r\n"
    two = _raw(srv, post + f"Content-Length: {n}\r\nContent-Length: 5\r\n", image)
    assert two.startswith(b"HTTP/1.0 400") and b"ambiguous length" in two, two[:300]
    listed = _raw(srv, post + f"Content-Length: {n}, 5\r\n", image)
    assert listed.startswith(b"HTTP/1.0 400") and b"ambiguous length" in listed
    chunked = _raw(srv, post + f"Content-Length: {n}\r\nTransfer-Encoding: chunked\r\n", image)
    assert chunked.startswith(b"HTTP/1.0 400") and b"ambiguous length" in chunked
    same = _raw(srv, post + f"Content-Length: {n}\r\nContent-Length: {n}\r\n", image)
    assert same.startswith(b"HTTP/1.0 200") and b'"hits"' in same


def test_clients_that_leave_early_are_one_line_each_in_the_log(page, capfd):
    """Half-sent and length-less uploads whose clients reset the connection before reading
    the answer: the server says so in one line each, with no traceback, and serves on."""
    srv, _ = page
    srv.request_timeout = 1.0
    post = "POST /api/search?k=3 HTTP/1.1\r\nHost: x\r\n"
    try:
        capfd.readouterr()
        for _ in range(6):
            _raw(srv, post + "Content-Length: 1000\r\n", b"x" * 10, linger_reset=True)
            _raw(srv, post, b"no length", linger_reset=True)
            _raw(srv, post + f"Content-Length: {30 * 2**20}\r\n", b"y" * 4096, linger_reset=True)
        time.sleep(2.5)  # the half-sent ones time out, then answer a client that is gone
        assert _ask(srv.url + "api/info")[0] == 200
        log = capfd.readouterr().err
    finally:
        srv.request_timeout = server.REQUEST_TIMEOUT
    assert "Traceback" not in log and "Error" not in log, log[:3000]
    lines = [line for line in log.splitlines() if line.strip()]
    assert all(
        re.fullmatch(r"client 127\.0\.0\.1:\d+ left before its answer was sent", x) for x in lines
    ), lines


def test_lines_from_handler_threads_are_never_interleaved(monkeypatch):
    """Handler threads that log at once write whole lines: each line is one write, under
    the server's log lock (``print`` writes the text and its newline apart)."""
    writes: list[str] = []

    class SlowStderr:
        def write(self, text: str) -> int:
            time.sleep(0.0005)  # widen the window in which another thread could cut in
            writes.append(text)
            return len(text)

        def flush(self) -> None:
            pass

    monkeypatch.setattr(sys, "stderr", SlowStderr())
    fake = type("Fake", (), {"log_lock": threading.Lock()})()

    def leave(port: int) -> None:
        for _ in range(20):
            try:
                raise BrokenPipeError
            except BrokenPipeError:
                server.SearchServer.handle_error(fake, None, ("127.0.0.1", port))

    threads = [threading.Thread(target=leave, args=(40000 + i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(writes) == 120
    assert all(
        re.fullmatch(r"client 127\.0\.0\.1:400\d\d left before its answer was sent\n", w)
        for w in writes
    ), writes[:6]


@pytest.fixture(scope="module")
def guarded_page(photo_index):
    """The page with a token, on 127.0.0.1."""
    index, _ = photo_index
    srv = server.SearchServer(queries.Searcher(index), "127.0.0.1", 0, token="s3cret-token")
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_a_page_with_a_token_answers_401_without_it_and_200_with_it(guarded_page, photo_index):
    srv = guarded_page
    photo = sorted(photo_index[1].rglob("*.png"))[0].read_bytes()
    good = {"Authorization": "Bearer s3cret-token"}
    for path in ("", "api/info", "api/search?item=1&k=3", "thumb/1"):
        status, body = _ask(srv.url + path)
        assert status == 401, path
        for wrong in ("Bearer s3cret-toke", "Bearer s3cret-token2", "Basic s3cret-token", ""):
            assert _ask(srv.url + path, headers={"Authorization": wrong})[0] == 401, (path, wrong)
        assert _ask(srv.url + path, headers=good)[0] == 200, path
    assert b"csce_jax search" in _ask(srv.url)[1]  # the 401 page asks for the token
    assert _ask(srv.url + "api/search?k=3", photo)[0] == 401
    status, body = _ask(srv.url + "api/search?k=3", photo, good)
    assert status == 200 and json.loads(body)["hits"]


def test_the_page_off_loopback_needs_a_token_and_never_logs_it(photo_index, tmp_path):
    """``serve --host 0.0.0.0`` without a token is one line and serves nothing; with
    ``$CSCE_SEARCH_TOKEN`` it serves, asks every request for it, and its output holds no
    token."""
    index, _ = photo_index
    with pytest.raises(server.ServeError, match="--host 0.0.0.0 is reachable from other"):
        server.SearchServer(queries.Searcher(index), "0.0.0.0", 0)
    with pytest.raises(server.ServeError, match="the token is empty"):
        server.check_token("127.0.0.1", " ")
    assert server.is_loopback("localhost") and server.is_loopback("127.0.0.2")
    assert not server.is_loopback("0.0.0.0")
    command = [sys.executable, "-m", "csce_jax.commands.search", "serve", "--index", str(index)]
    env = {k: v for k, v in os.environ.items() if k != server.TOKEN_ENV}
    refused = subprocess.run(
        [*command, "--host", "0.0.0.0", "--port", "0"], env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1].startswith("error: --host 0.0.0.0 is reachable")
    port = _free_port()
    env[server.TOKEN_ENV] = token = "a-token-of-our-own-8af3"
    proc = subprocess.Popen(
        [*command, "--host", "0.0.0.0", "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        first = proc.stdout.readline()
        assert first.startswith(f"serving http://0.0.0.0:{port}/") and "token required" in first
        url = f"http://127.0.0.1:{port}/api/info"
        assert _ask(url)[0] == 401
        assert _ask(url, headers={"Authorization": f"Bearer {token}"})[0] == 200
        assert _ask(url, headers={"Authorization": "Bearer nope"})[0] == 401
    finally:
        proc.terminate()
        out = first + proc.communicate(timeout=60)[0]
    assert token not in out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def test_a_person_uploads_an_image_in_a_real_browser_and_sees_its_hits(page, tmp_path):
    srv, photos = page
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _browser()
    try:
        driver.get(srv.url)
        from selenium.common.exceptions import StaleElementReferenceException

        # A re-render replaces the tiles under a lookup in progress: look again.
        wait = WebDriverWait(driver, 60, ignored_exceptions=(StaleElementReferenceException,))
        wait.until(lambda d: "14 images" in d.find_element(By.ID, "info").text)
        assert "64-bit codes" in driver.find_element(By.ID, "info").text
        query = sorted(photos.rglob("*.png"))[3]
        driver.find_element(By.ID, "k").clear()
        driver.find_element(By.ID, "k").send_keys("5")
        driver.find_element(By.ID, "file").send_keys(str(query))
        driver.find_element(By.ID, "go").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".tile.hit")) == 5)
        tiles = driver.find_elements(By.CSS_SELECTOR, ".tile.hit")
        (own,) = [t for t in tiles if t.get_attribute("data-path") == str(query)]
        assert own.get_attribute("data-distance") == "0" and "distance 0" in own.text
        assert "label: " + query.parent.name in own.text
        # The thumbnails really loaded (an <img> that failed has no natural width).
        wait.until(
            lambda d: all(
                d.execute_script(
                    "return arguments[0].naturalWidth", t.find_element(By.TAG_NAME, "img")
                )
                > 0
                for t in d.find_elements(By.CSS_SELECTOR, ".tile")
            )
        )
        # A click on a hit searches with it; a bad upload says why in the page.
        want = tiles[1].get_attribute("data-path")
        tiles[1].find_element(By.TAG_NAME, "img").click()
        wait.until(
            lambda d: (
                d.find_element(By.CSS_SELECTOR, ".tile.query").get_attribute("data-path") == want
            )
        )
        bad = tmp_path / "notes.txt"
        bad.write_text("not an image")
        driver.find_element(By.ID, "file").send_keys(str(bad))
        driver.find_element(By.ID, "go").click()
        wait.until(lambda d: "not an image" in d.find_element(By.ID, "error").text)
        assert not driver.find_elements(By.CSS_SELECTOR, ".tile.hit")
    finally:
        driver.quit()


def test_a_person_gives_the_page_its_token_once_and_searches(guarded_page):
    """The page behind a token: the browser gets the page with its 401, the person types the
    token once, then the index's figures, hits and thumbnails all load."""
    srv = guarded_page
    driver = _browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        driver.get(srv.url)
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.ID, "login").is_displayed())
        assert "14 images" not in driver.find_element(By.ID, "info").text
        driver.find_element(By.ID, "token").send_keys("s3cret-token")
        driver.find_element(By.ID, "enter").click()
        wait.until(lambda d: "14 images" in d.find_element(By.ID, "info").text)
        assert not driver.find_element(By.ID, "login").is_displayed()
        driver.find_element(By.ID, "random").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".tile.hit")) == 10)
        wait.until(
            lambda d: all(
                d.execute_script("return arguments[0].naturalWidth", img) > 0
                for img in d.find_elements(By.CSS_SELECTOR, ".tile img")
            )
        )
        assert not driver.find_element(By.ID, "login").is_displayed()  # asked once
    finally:
        driver.quit()


def test_a_collection_has_one_fingerprint_however_its_folder_is_spelled(tmp_path, monkeypatch):
    """An interrupted index resumes whatever spelling of the same folder is given again."""
    from csce_jax.search.collection import from_folder, full_path

    photos = _photos(tmp_path / "photos", n=4)
    monkeypatch.chdir(tmp_path)
    spellings = ("photos", "./photos/", str(photos), "photos/../photos", f"{tmp_path}//photos/.")
    prints = {from_folder(s).fingerprint() for s in spellings}
    assert len(prints) == 1
    assert from_folder("photos/../photos").paths[0].startswith(str(photos) + "/")
    assert full_path("runs/x/../x/") == tmp_path / "runs" / "x"
