"""Retrieval at scale on the same 64-bit codes: the metric, and the search engines.

1. mAP@all: ours (XOR + popcount, counting-sort ranking) against the release's per-query numpy
   loop on the same queries, and ours alone over the full sizes.
2. mAP@1000 over a 1M-code database, 1,000 queries, each in a fresh process (peak RSS is the
   process's own): ours against the full ranking it replaced (a stable argsort of every row, in
   chunks of 2^26 entries).
3. Search over 1M codes: our scan, faiss flat, IVF and HNSW, and Milvus Lite (BIN_FLAT; the
   codes inserted as ``search index`` inserts them): build (insert) seconds, index bytes, query
   milliseconds (a batch of queries, and one query at a time), recall@100 against the exact
   scan (the share of its top 100, ties in index order, that the engine returns) and the share
   of returned hits within the exact 100th distance.

4. A real Milvus server (``milvus==2.3.5`` standalone, from the venv ``--milvus_server``
   names): the same codes inserted as ``search index`` inserts them (insert rate), BIN_FLAT
   and BIN_IVF_FLAT (nlist 1024) timed on one query and on a batch of 1,000, the server's
   resident memory, and IVF's recall@100 for several ``nprobe``, with faiss-ivf's beside it.
   Codes for IVF must be clustered as trained ones are: ``--flip_from RUN`` measures the share
   of bits in which a trained run's database codes differ from their class's hash centre
   (``csce-eval --workdir RUN --export_codes`` writes them), and the 1M codes are drawn around
   100 centres with that flip rate.

  python benchmarks/bench_retrieval.py [--db 50000 --queries 50000 --loop_queries 500]
                                       [--million 1000000] [--skip_engines]
                                       [--engines scan,faiss-flat,milvus]
                                       [--milvus_server .venv-milvus/bin/python]
                                       [--flip_from runs/demo | --flip 0.25]

Last line: JSON of the figures; ``*_ratio_*`` keys are our speed over the other's.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median_time, report

from csce_jax.retrieval import metrics
from csce_jax.search import engines


def make_codes(rng, centers, n, flip=0.25):
    """Codes scattered around class centres (realistic ties, a non-trivial mAP), packed, made
    100,000 at a time so that the benchmark's own arrays stay small."""
    classes, bits = centers.shape
    codes, labels = [], []
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        lab = rng.integers(0, classes, m)
        noise = np.where(rng.random((m, bits), dtype=np.float32) < flip, -1, 1).astype(np.int8)
        codes.append(metrics.pack_codes(centers[lab] * noise))
        labels.append(lab)
    return np.concatenate(codes), np.concatenate(labels)


def release_loop_map(q, db, ql, dl, topk):
    """The release's CalcTopMap (one-hot labels, float distances, argsort per query)."""
    classes = max(ql.max(), dl.max()) + 1
    qh, dh = np.eye(classes, dtype=np.float32)[ql], np.eye(classes, dtype=np.float32)[dl]
    qf, df = q.astype(np.float32), db.astype(np.float32)
    total = 0.0
    for i in range(len(q)):
        gnd = (qh[i] @ dh.T > 0).astype(np.float32)
        ham = 0.5 * (df.shape[1] - qf[i] @ df.T)
        tgnd = gnd[np.argsort(ham)][:topk]
        tsum = int(tgnd.sum())
        if tsum == 0:
            continue
        count = np.linspace(1, tsum, tsum)
        tindex = np.asarray(np.where(tgnd == 1)) + 1.0
        total += np.mean(count / tindex)
    return total / len(q)


def full_ranking_map(q, db, ql, dl, topk, bits):
    """mAP@topk by the full ranking: every row stably argsorted, chunks of 2^26 entries."""
    _, _, db_words, distances = metrics._prepare(q, db, bits)
    rows = max(1, (1 << 26) // len(db_words))
    aps = []
    for s in range(0, len(q), rows):
        sl = slice(s, min(s + rows, len(q)))
        order = np.argsort(distances(sl), axis=1, kind="stable")[:, :topk]
        aps.append(metrics._average_precision(ql[sl, None] == dl[order]))
    return float(np.mean(np.concatenate(aps)))


def map_in_child(path: str, how: str) -> dict[str, float]:
    """mAP@1000 of the codes in ``path`` by ``how`` (ours | full_ranking) in a new process."""
    out = subprocess.run(
        [sys.executable, __file__, "--_child", path, how], capture_output=True, text=True
    )
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _child(path: str, how: str) -> None:
    z = np.load(path)
    q, db, ql, dl = z["q"], z["db"], z["ql"], z["dl"]
    fn = metrics.mean_average_precision if how == "ours" else None

    def run(n):
        if fn is not None:
            return fn(q[:n], db, ql[:n], dl, 1000, bits=64)
        return full_ranking_map(q[:n], db, ql[:n], dl, 1000, 64)

    run(8)  # compile the distance kernel
    start = time.perf_counter()
    value = run(len(q))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"map": value, "seconds": seconds, "peak_rss_gib": peak}))


def metric_at_scale(fig, rng, centers, n):
    db, dl = make_codes(rng, centers, n)
    q, ql = make_codes(rng, centers, 1000)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "codes.npz")
        np.savez(path, q=q, db=db, ql=ql, dl=dl)
        ours, before = map_in_child(path, "ours"), map_in_child(path, "full_ranking")
    assert abs(ours["map"] - before["map"]) < 1e-12, (ours, before)
    fig.update(
        {
            "million_map_at_1000": round(ours["map"], 6),
            "million_map_at_1000_seconds": round(ours["seconds"], 2),
            "million_map_at_1000_peak_rss_gib": round(ours["peak_rss_gib"], 2),
            "million_full_ranking_seconds": round(before["seconds"], 2),
            "million_full_ranking_peak_rss_gib": round(before["peak_rss_gib"], 2),
            "million_map_ratio_vs_full_ranking": round(before["seconds"] / ours["seconds"], 2),
        }
    )
    return db, q


def milvus_lite_engine(db: np.ndarray, folder: Path) -> tuple[engines.Engine, dict]:
    """The codes in a Milvus Lite collection as ``search index`` puts them (item numbers,
    batches of ``milvus.BATCH``, BIN_FLAT), as a searchable engine."""
    from csce_jax.search import milvus

    record = milvus.settings(folder)
    store = milvus.Store(record, folder)
    rows = np.arange(len(db), dtype=np.int64)
    shard = {
        "rows": rows,
        "codes": db,
        "labels": np.full(len(db), "", dtype=str),
        "paths": np.full(len(db), "", dtype=str),
    }
    store.ensure({"bits": 64}, "bench", 64)
    store.insert_shard(shard, folder / "bench.milvus.json", "bench")
    store.check_index("bench", len(db))
    record["file"] = milvus.LITE_FILE
    return engines.MilvusEngine(db, 64, record, store, rows), record


def engines_at_scale(fig, db, q, names, batch=1000, singles=50):
    """Each engine over ``db``: build, size, batch and single-query time, recall@100."""
    if any(n.startswith("faiss") for n in names):
        import faiss  # noqa: F401  (loaded before any build is timed)

    exact = engines.load({"name": "scan"}, db, 64, Path("."))
    exact_idx, exact_dist = exact.search(q[:batch], 100)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            start = time.perf_counter()
            if name == "milvus":
                engine, record = milvus_lite_engine(db, Path(tmp))
            else:
                record = engines.build(name, db, 64, {}, Path(tmp))  # defaults
                engine = engines.load(record, db, 64, Path(tmp))
            built = time.perf_counter() - start
            t_batch = median_time(lambda e=engine: e.search(q[:batch], 100), repeats=3)
            t_one = median_time(
                lambda e=engine: [e.search(q[i : i + 1], 100) for i in range(singles)], repeats=3
            )
            idx, dist = engine.search(q[:batch], 100)
            found = np.mean(
                [len(np.intersect1d(a, b)) / 100 for a, b in zip(idx, exact_idx, strict=True)]
            )
            within = np.mean(dist <= exact_dist[:, -1:])
            size = (Path(tmp) / record["file"]).stat().st_size if "file" in record else db.nbytes
            key = name.replace("-", "_")
            fig.update(
                {
                    f"{key}_params": record["params"],
                    f"{key}_build_seconds": round(built, 2),
                    f"{key}_index_mib": round(size / 2**20, 1),
                    f"{key}_ms_per_query_batch{batch}": round(1000 * t_batch / batch, 4),
                    f"{key}_ms_one_query": round(1000 * t_one / singles, 3),
                    f"{key}_recall_at_100": round(float(found), 4),
                    f"{key}_within_exact_100th_distance": round(float(within), 4),
                }
            )
            engine.close()
            print(f"{name}: built in {built:.1f} s", file=sys.stderr, flush=True)
    for other in ("faiss_flat", "milvus"):
        if f"{other}_ms_one_query" in fig and "scan_ms_one_query" in fig:
            fig[f"scan_batch_ratio_vs_{other}"] = round(
                fig[f"{other}_ms_per_query_batch{batch}"] / fig[f"scan_ms_per_query_batch{batch}"],
                3,
            )
            fig[f"scan_one_query_ratio_vs_{other}"] = round(
                fig[f"{other}_ms_one_query"] / fig["scan_ms_one_query"], 3
            )


def flip_rate_of(run: str) -> float:
    """The share of bits in which a run's exported database codes differ from the hash centre
    of their class (``csce-eval --export_codes`` files; single-label runs)."""
    import csce_jax

    folder = Path(run) / "eval"
    centers = csce_jax.load_model(run).centers
    codes = metrics.unpack_codes(np.load(folder / "database_codes.npy"), centers.shape[1])
    labels = np.load(folder / "database_labels.npy")
    if labels.ndim != 1:
        raise SystemExit(f"--flip_from {run}: multi-label codes have no single centre")
    return float(np.mean(codes != centers[labels]))


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _wait_indexed(store, count: int, timeout: float = 1800.0) -> float:
    """Seconds until the server's index covers every row (it builds on sealed segments)."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        info = store.client.describe_index(store.collection, "code")
        if int(info.get("indexed_rows", 0)) >= count and not int(info.get("pending_index_rows", 0)):
            return time.perf_counter() - start
        time.sleep(1.0)
    raise SystemExit(f"the server's index was not built in {timeout:.0f} s")


def _recall(engine, q, exact_idx, exact_dist, k=100):
    """(recall@k against the exact hits in index order, share of hits within the exact k-th
    distance: the tie-aware recall)."""
    idx, dist = engine.search(q, k)
    found = np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(idx, exact_idx, strict=True)])
    return round(float(found), 4), round(float(np.mean(dist <= exact_dist[:, -1:])), 4)


def server_figures(fig, db, q, python: str, nprobes=(1, 4, 16, 64, 256), batch=1000, singles=50):
    """Milvus server BIN_FLAT and BIN_IVF_FLAT beside faiss-ivf, on ``db`` and ``q``."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import os
    import socket

    from milvus_server import MilvusServer

    from csce_jax.search import milvus

    exact = engines.load({"name": "scan"}, db, 64, Path("."))
    exact_idx, exact_dist = exact.search(q[:batch], 100)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ[milvus.TOKEN_ENV] = "root:Milvus"
    rows = np.arange(len(db), dtype=np.int64)
    shard = {"rows": rows, "codes": db, "labels": np.full(len(db), "", dtype=str)}
    shard["paths"] = shard["labels"]
    with tempfile.TemporaryDirectory() as tmp:
        server = MilvusServer(python, Path(tmp) / "server", port)
        try:
            fig["milvus_server_idle_rss_mib"] = round(_rss_mib(server.pid), 1)
            for kind in ("bin_flat", "bin_ivf_flat"):
                record = milvus.settings(
                    Path(tmp), uri=server.uri, collection=f"bench_{kind}", index=kind, nlist=1024
                )
                store = milvus.Store(record, Path(tmp))
                store.ensure({"bits": 64}, "bench", 64)
                start = time.perf_counter()
                store.insert_shard(shard, Path(tmp) / f"{kind}.milvus.json", "bench")
                store.flush()
                inserted = time.perf_counter() - start
                built = _wait_indexed(store, len(db))
                store.check_index("bench", len(db))
                engine = engines.MilvusEngine(db, 64, record, store, rows)
                key = f"milvus_server_{kind}"
                fig[f"{key}_insert_codes_per_s"] = round(len(db) / inserted)
                fig[f"{key}_index_build_seconds"] = round(built, 1)
                probes = nprobes if kind == "bin_ivf_flat" else (None,)
                for nprobe in probes:
                    tag = key if nprobe is None else f"{key}_nprobe{nprobe}"
                    if nprobe is not None:
                        record["params"]["nprobe"] = nprobe
                    t_batch = median_time(lambda e=engine: e.search(q[:batch], 100), repeats=3)
                    t_one = median_time(
                        lambda e=engine: [e.search(q[i : i + 1], 100) for i in range(singles)],
                        repeats=3,
                    )
                    fig[f"{tag}_ms_per_query_batch{batch}"] = round(1000 * t_batch / batch, 4)
                    fig[f"{tag}_ms_one_query"] = round(1000 * t_one / singles, 3)
                    recall, within = _recall(engine, q[:batch], exact_idx, exact_dist)
                    fig[f"{tag}_recall_at_100"] = recall
                    fig[f"{tag}_within_exact_100th_distance"] = within
                fig[f"{key}_rss_mib"] = round(_rss_mib(server.pid), 1)
                print(f"milvus server {kind}: done", file=sys.stderr, flush=True)
                engine.close()
        finally:
            server.close()
    with tempfile.TemporaryDirectory() as tmp:
        record = engines.build("faiss-ivf", db, 64, {"nlist": 1024}, Path(tmp))
        engine = engines.load(record, db, 64, Path(tmp))
        for nprobe in nprobes:
            engine._index.nprobe = nprobe  # faiss reads it at each search
            recall, within = _recall(engine, q[:batch], exact_idx, exact_dist)
            fig[f"faiss_ivf_nlist1024_nprobe{nprobe}_recall_at_100"] = recall
            fig[f"faiss_ivf_nlist1024_nprobe{nprobe}_within_exact_100th_distance"] = within
            t_batch = median_time(lambda e=engine: e.search(q[:batch], 100), repeats=3)
            fig[f"faiss_ivf_nlist1024_nprobe{nprobe}_ms_per_query_batch{batch}"] = round(
                1000 * t_batch / batch, 4
            )


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--_child":
        return _child(sys.argv[2], sys.argv[3])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--db", type=int, default=50_000)
    p.add_argument("--queries", type=int, default=50_000)
    p.add_argument("--loop_queries", type=int, default=500)
    p.add_argument("--million", type=int, default=1_000_000, help="codes at scale (0: skip)")
    p.add_argument("--skip_engines", action="store_true", help="the metric only")
    p.add_argument("--engines", default=",".join(engines.ENGINES), help="engines to measure")
    p.add_argument("--skip_metric", action="store_true", help="the engines only")
    p.add_argument(
        "--milvus_server", help="the Python of a venv with milvus==2.3.5: server figures"
    )
    p.add_argument("--flip", type=float, default=0.25, help="bit-flip rate of the drawn codes")
    p.add_argument("--flip_from", help="a run folder: its database codes' flip rate (see above)")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    centers = np.where(rng.random((100, 64)) < 0.5, -1, 1).astype(np.int8)
    flip = flip_rate_of(args.flip_from) if args.flip_from else args.flip
    db, dl = make_codes(rng, centers, args.db, flip)
    q, ql = make_codes(rng, centers, args.queries, flip)
    fig: dict[str, object] = {"bits": 64, "database": args.db, "queries": args.queries}
    fig["flip_rate"] = round(flip, 4)
    fig["flip_rate_from"] = args.flip_from or "--flip"

    if args.skip_metric:
        big, _ = make_codes(rng, centers, args.million, flip)
        big_q, _ = make_codes(rng, centers, 1000, flip)
        fig["million_codes"] = args.million
        if not args.skip_engines:
            engines_at_scale(fig, big, big_q, args.engines.split(","))
        if args.milvus_server:
            server_figures(fig, big, big_q, args.milvus_server)
        return report(fig)
    sub, subl = q[: args.loop_queries], ql[: args.loop_queries]
    sub_codes, db_codes = metrics.unpack_codes(sub, 64), metrics.unpack_codes(db, 64)
    t_ours = median_time(lambda: metrics.mean_average_precision(sub, db, subl, dl, bits=64))
    t_loop = median_time(
        lambda: release_loop_map(sub_codes, db_codes, subl, dl, len(db)), repeats=1, warmup=0
    )
    fig["subset_queries"] = args.loop_queries
    fig["subset_map_ours"] = round(metrics.mean_average_precision(sub, db, subl, dl, bits=64), 6)
    # The loop's figure differs from ours only by its unstable order among equal distances.
    fig["subset_map_numpy_loop"] = round(
        release_loop_map(sub_codes, db_codes, subl, dl, len(db)), 6
    )
    fig["subset_seconds_ours"] = round(t_ours, 4)
    fig["subset_seconds_numpy_loop"] = round(t_loop, 3)
    fig["map_ratio_vs_numpy_loop"] = round(t_loop / t_ours, 1)
    start = time.perf_counter()
    fig["full_map_all"] = round(metrics.mean_average_precision(q, db, ql, dl, bits=64), 6)
    fig["full_map_all_seconds"] = round(time.perf_counter() - start, 2)

    if args.million:
        fig["million_codes"] = args.million
        big, big_q = metric_at_scale(fig, rng, centers, args.million)
        if not args.skip_engines:
            engines_at_scale(fig, big, big_q, args.engines.split(","))
        if args.milvus_server:
            server_figures(fig, big, big_q, args.milvus_server)
    report(fig)


if __name__ == "__main__":
    main()
