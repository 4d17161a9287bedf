"""One progress line for the long host-side jobs (writing a record set, checking images,
encoding an index): images done of the total, images/s and the time left, at most every few
seconds, and once more at the end."""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO


class Progress:
    """``what: done/total images[, note], R images/s, ETA S s`` on ``stream`` (stderr), at
    most every ``every`` seconds and whenever ``force`` is given; ``prefix`` leads each line
    (a process's number in a multi-host job)."""

    def __init__(
        self,
        what: str,
        total: int,
        *,
        every: float = 5.0,
        stream: TextIO | None = None,
        prefix: str = "",
    ):
        self.what, self.total, self.every, self.prefix = what, total, every, prefix
        self.stream = stream
        self.done, self.shown = 0, -1
        self.start = self.last = time.perf_counter()

    def update(self, done: int, *, note: str = "", force: bool = False) -> None:
        """``done`` images so far; a line if one is due (or ``force``d) and new."""
        self.done = done
        now = time.perf_counter()
        if done == self.shown or (not force and now - self.last < self.every):
            return
        self.last, self.shown = now, done
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else math.inf
        print(
            f"{self.prefix}{self.what}: {done:,}/{self.total:,} images{note}, "
            f"{rate:.1f} images/s, ETA {eta:.0f} s",
            file=self.stream or sys.stderr,
            flush=True,
        )

    def add(self, n: int, *, note: str = "", force: bool = False) -> None:
        """``n`` more images done."""
        self.update(self.done + n, note=note, force=force)
