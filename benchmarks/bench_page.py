"""The search page under load: ``csce-search serve`` (its own process, a token set) against
32 clients on 127.0.0.1 for 20 s, uploads and item searches mixed, while a few clients send
half a request and stall (they must not delay the others).

  python benchmarks/bench_page.py --index db.idx [--clients 32 --seconds 20 --stalled 4]

Reports requests/s, p50/p99/max latency per kind and errors (any answer but 200). Last line:
JSON of the figures.
"""

from __future__ import annotations

import argparse
import http.client
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import report

from csce_jax.search import load_index

TOKEN = "bench-token-of-the-page"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index: str, port: int) -> subprocess.Popen:
    """``csce-search serve`` on 127.0.0.1:port with the token; returns once it answers."""
    env = {**os.environ, "CSCE_SEARCH_TOKEN": TOKEN}
    cmd = [sys.executable, "-m", "csce_jax.commands.search", "serve", "--index", index]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    first = proc.stdout.readline().decode()
    if not first.startswith("serving"):
        proc.kill()
        raise SystemExit(f"the page did not start: {first}{proc.stderr.read().decode()[-2000:]}")
    return proc


def client(port, uploads, count, deadline, out, seed):
    """Requests one after another on one connection until ``deadline``: (kind, seconds, ok)."""
    rng = random.Random(seed)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    while time.monotonic() < deadline:
        upload = rng.random() < 0.5
        began = time.perf_counter()
        try:
            if upload:
                body = rng.choice(uploads)
                conn.request("POST", "/api/search?k=10", body=body, headers=headers)
            else:
                conn.request(
                    "GET", f"/api/search?item={rng.randrange(count)}&k=10", headers=headers
                )
            answer = conn.getresponse()
            answer.read()
            ok = answer.status == 200
            what = str(answer.status)
            if answer.getheader("Connection", "").lower() == "close":
                conn.close()
        except (OSError, http.client.HTTPException) as e:
            ok, what = False, type(e).__name__
            conn.close()
        out.append(("upload" if upload else "item", time.perf_counter() - began, ok, what))


def stalled_client(port, deadline):
    """Half an upload, then silence until the server gives up on it (or the run ends)."""
    while time.monotonic() < deadline:
        with socket.create_connection(("127.0.0.1", port), timeout=120) as conn:
            head = (
                f"POST /api/search?k=3 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                "Content-Length: 100000\r\n\r\n"
            )
            conn.sendall(head.encode() + b"x" * 100)
            try:
                conn.recv(65536)  # the 408, after the server's request timeout
            except OSError:
                pass


def _percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--index", required=True, help="an index folder (csce-search index)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--stalled", type=int, default=4, help="clients that send half a request")
    args = p.parse_args()
    index = load_index(args.index)
    uploads = [Path(x).read_bytes() for x in index.paths[:64]]
    port = _free_port()
    server = start_server(args.index, port)
    try:
        deadline = time.monotonic() + args.seconds
        results: list[tuple[str, float, bool, str]] = []
        threads = [
            threading.Thread(target=stalled_client, args=(port, deadline), daemon=True)
            for _ in range(args.stalled)
        ] + [
            threading.Thread(
                target=client, args=(port, uploads, len(index.paths), deadline, results, i)
            )
            for i in range(args.clients)
        ]
        for t in threads:
            t.start()
        for t in threads[args.stalled :]:
            t.join()
    finally:
        server.terminate()
        log = server.communicate(timeout=60)[1].decode()
    fig: dict[str, object] = {
        "clients": args.clients,
        "stalled_clients": args.stalled,
        "seconds": args.seconds,
        "images_indexed": len(index.paths),
        "requests": len(results),
        "requests_per_s": round(len(results) / args.seconds, 1),
        "errors": sum(not ok for _, _, ok, _ in results),
        "error_kinds": sorted({what for _, _, ok, what in results if not ok}),
        "tracebacks_in_server_log": log.count("Traceback"),
    }
    for kind in ("upload", "item"):
        times = [1000 * s for k, s, ok, _ in results if k == kind and ok]
        if times:
            fig[f"{kind}_requests"] = len(times)
            fig[f"{kind}_p50_ms"] = round(statistics.median(times), 1)
            fig[f"{kind}_p99_ms"] = round(_percentile(times, 0.99), 1)
            fig[f"{kind}_max_ms"] = round(max(times), 1)
    report(fig)


if __name__ == "__main__":
    main()
