"""Retrieval speed on the same 64-bit codes: ours, the release's numpy loop, and faiss.

- mAP@all over the whole database: ours (XOR + popcount, counting-sort ranking) vs the release's
  per-query numpy loop (float Hamming distance + argsort), both on the same query subset, and
  ours alone on the full sizes;
- top-k search: ours vs ``faiss.IndexBinaryFlat`` (if faiss-cpu is installed);
- a 1M-item database (``--million``): mAP@1000 for 1,000 queries, streamed in bounded memory.

  python benchmarks/bench_retrieval.py [--db 50000 --queries 50000 --loop_queries 200] [--million]

Last line: JSON with the timings and ``map_ratio_vs_numpy_loop`` / ``topk_ratio_vs_faiss`` (our
speed over theirs).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median_time, report

from csce_jax import metrics


def make_codes(rng, centers, n, flip=0.25):
    """Codes scattered around class centres: realistic ties and a non-trivial mAP."""
    classes, bits = centers.shape
    labels = rng.integers(0, classes, n)
    noise = np.where(rng.random((n, bits)) < flip, -1, 1).astype(np.int8)
    return centers[labels] * noise, labels


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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--db", type=int, default=50_000)
    p.add_argument("--queries", type=int, default=50_000)
    p.add_argument("--loop_queries", type=int, default=500)
    p.add_argument("--topk", type=int, default=1000)
    p.add_argument("--million", action="store_true", help="also a 1M-item database")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    centers = np.where(rng.random((100, 64)) < 0.5, -1, 1).astype(np.int8)
    db, dl = make_codes(rng, centers, args.db)
    q, ql = make_codes(rng, centers, args.queries)
    fig: dict[str, object] = {"bits": 64, "database": args.db, "queries": args.queries}

    sub, subl = q[: args.loop_queries], ql[: args.loop_queries]
    t_ours_sub = median_time(lambda: metrics.mean_average_precision(sub, db, subl, dl), repeats=3)
    t_loop = median_time(lambda: release_loop_map(sub, db, subl, dl, len(db)), repeats=1, warmup=0)
    m_ours = metrics.mean_average_precision(sub, db, subl, dl)
    m_loop = release_loop_map(sub, db, subl, dl, len(db))
    fig.update(
        {
            "subset_queries": args.loop_queries,
            "subset_map_ours": round(m_ours, 6),
            "subset_map_numpy_loop": round(m_loop, 6),  # differs only by the loop's tie order
            "subset_seconds_ours": round(t_ours_sub, 4),
            "subset_seconds_numpy_loop": round(t_loop, 3),
            "map_ratio_vs_numpy_loop": round(t_loop / t_ours_sub, 1),
        }
    )
    start = time.perf_counter()
    full = metrics.mean_average_precision(q, db, ql, dl)
    fig["full_map_all_seconds"] = round(time.perf_counter() - start, 2)
    fig["full_map_all"] = round(full, 6)

    k = args.topk
    t_topk = median_time(lambda: metrics.search_topk(q[:10_000], db, k), repeats=3)
    fig[f"top{k}_seconds_ours_10k_queries"] = round(t_topk, 3)
    try:
        import faiss

        index = faiss.IndexBinaryFlat(64)
        index.add(metrics.pack_codes(db))
        packed_q = metrics.pack_codes(q[:10_000])
        t_faiss = median_time(lambda: index.search(packed_q, k), repeats=3)
        fig[f"top{k}_seconds_faiss_10k_queries"] = round(t_faiss, 3)
        fig["topk_ratio_vs_faiss"] = round(t_faiss / t_topk, 3)
    except ImportError:
        fig["faiss"] = "not installed (pip install faiss-cpu)"

    if args.million:
        big, bl = make_codes(rng, centers, 1_000_000)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        m = metrics.mean_average_precision(q[:1000], big, ql[:1000], bl, 1000)
        fig["million_db_map_at_1000_1k_queries_seconds"] = round(time.perf_counter() - start, 2)
        fig["million_db_map_at_1000"] = round(m, 6)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fig["million_db_peak_rss_gib"] = round(max(peak, before) / 2**20, 2)
    report(fig)


if __name__ == "__main__":
    main()
