"""Hash-centre construction time, and the achieved distances, for common (classes, bits).

Compared with the release's method where it runs at all (K a power of two; its random fallback
is an unseeded O(C^2) Python loop redrawn up to 20 times), reimplemented here from its description in docs/model.md.

  python benchmarks/bench_centers.py

Last line: JSON with seconds per case and ``ratio_vs_release_200x64`` (our speed over the
release's method for 200 classes at 64 bits).
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median_time, report

from csce_jax.hashing import center_stats, hash_centers, sylvester_hadamard


def release_method(num_classes: int, bits: int) -> np.ndarray:
    """The release's algorithm: Hadamard rows, then random balanced rows redrawn (all of them)
    up to 20 times until min distance > K/4 and mean >= K/2, pairwise checked in Python."""
    h = sylvester_hadamard(bits)
    targets = np.concatenate([h, -h])[:num_classes].astype(np.float32)
    if len(targets) < num_classes:
        targets = np.resize(targets, (num_classes, bits))
        for _ in range(20):
            for i in range(2 * bits, num_classes):
                row = np.ones(bits, np.float32)
                row[random.sample(range(bits), bits // 2)] = -1
                targets[i] = row
            dists = [
                int((targets[i] != targets[j]).sum())
                for i in range(num_classes)
                for j in range(i + 1, num_classes)
            ]
            if min(dists) > bits / 4 and np.mean(dists) >= bits / 2:
                break
    return targets


def main() -> None:
    import argparse

    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()
    fig: dict[str, object] = {}
    for classes, bits in [(200, 12), (200, 24), (200, 48), (555, 48), (200, 64), (1000, 64)]:
        t = median_time(lambda c=classes, b=bits: hash_centers(c, b), repeats=3)
        lo, mean = center_stats(hash_centers(classes, bits))
        fig[f"seconds_{classes}x{bits}"] = round(t, 4)
        fig[f"min_mean_{classes}x{bits}"] = [lo, round(mean, 3)]
    start = time.perf_counter()
    release_method(200, 64)
    t_release = time.perf_counter() - start
    fig["release_seconds_200x64"] = round(t_release, 3)
    fig["ratio_vs_release_200x64"] = round(t_release / fig["seconds_200x64"], 1)
    report(fig)


if __name__ == "__main__":
    main()
