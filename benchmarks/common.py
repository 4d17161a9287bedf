"""Shared helpers for the benchmarks: timing with warm-up, medians, the closing JSON line."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable


def median_time(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def report(figures: dict[str, object]) -> None:
    """Print the figures, then (last line) one JSON object of them."""
    for key, value in figures.items():
        print(f"{key:40s} {value}")
    print(json.dumps(figures, sort_keys=True))
