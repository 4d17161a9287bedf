"""Decoded + augmented training images per second: our grain pipeline vs a plain PIL loop.

Both do the same work on the same JPEGs (shorter side 256-400 px, as fine-grained data sets
are): decode, RGB, resize the shorter side to 256, random 224 crop, random flip, uint8 array.
The pipeline runs it in ``--threads`` threads (PIL releases the GIL), the loop in one.

  python benchmarks/bench_input.py [--images 300] [--threads 4]

Last line: JSON with ``pipeline_images_per_sec``, ``pil_loop_images_per_sec``, ``ratio_vs_pil``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median_time, report

from csce_jax.data import TrainLoader, ViewConfig, Workers
from csce_jax.data.images import resize_shorter
from csce_jax.data.sources import Source


def make_jpegs(folder: Path, n: int) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        short = int(rng.integers(256, 401))
        w, h = (int(short * rng.uniform(1.0, 1.5)), short)
        # Smooth content compresses like a photo (noise would be unrealistically expensive).
        base = rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.BICUBIC)
        path = folder / f"img{i:04d}.jpg"
        img.save(path, quality=90)
        paths.append(str(path))
    return paths


def pil_loop(paths: list[str], seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    for p in paths:
        img = Image.open(p).convert("RGB")
        arr = np.asarray(resize_shorter(img, 256))
        top = rng.integers(0, arr.shape[0] - 224 + 1)
        left = rng.integers(0, arr.shape[1] - 224 + 1)
        out = arr[top : top + 224, left : left + 224]
        if rng.random() < 0.5:
            out = out[:, ::-1]
        np.ascontiguousarray(out)
    return len(paths)


def pipeline(paths: list[str], threads: int, batch: int = 20) -> int:
    src = Source(paths, np.zeros(len(paths), np.int32), paths, "bench")
    steps = len(paths) // batch
    loader = TrainLoader(
        src,
        global_batch=batch,
        num_steps=steps,
        seed=0,
        view=ViewConfig(256, 224, True),
        workers=Workers(threads),
    )
    n = 0
    for b in loader.batches():
        n += len(b["image"])
    return n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp), args.images)
        t_loop = median_time(lambda: pil_loop(paths), repeats=args.repeats)
        t_pipe = median_time(lambda: pipeline(paths, args.threads), repeats=args.repeats)
    ours, loop = args.images / t_pipe, args.images / t_loop
    report(
        {
            "images": args.images,
            "threads": args.threads,
            "cpu_count": os.cpu_count(),
            "pipeline_images_per_sec": round(ours, 1),
            "pil_loop_images_per_sec": round(loop, 1),
            "ratio_vs_pil": round(ours / loop, 3),
        }
    )


if __name__ == "__main__":
    main()
