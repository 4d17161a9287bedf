"""The training loop's clock: images/s over the steps since the last log, and the ETA."""

from __future__ import annotations

import time

import ml_collections


class Clock:
    """Images/s over the steps since the last log, and the ETA: the remaining steps at the
    recent step time (the first step, which compiles, left out) plus the evaluations still due
    at the last evaluation's duration."""

    def __init__(self, start: int):
        self.t0, self.start = time.time(), start
        self.first_step_seconds = 0.0  # set once the first step is done
        self.step_seconds: float | None = None  # recent seconds per step (smoothed)
        self.eval_seconds: float | None = None  # the last evaluation's duration
        self.restart(start)

    def restart(self, step: int) -> None:
        self.tick, self.tick_step = time.time(), step

    def rate(self, step: int, batch: int) -> float:
        return (step - self.tick_step) * batch / max(time.time() - self.tick, 1e-9)

    def lap(self, step: int) -> None:
        """Fold the steps since the last restart into the recent step time."""
        seconds, steps = time.time() - self.tick, step - self.tick_step
        if self.tick_step == self.start and steps > 1:  # the compiling first step: left out
            seconds, steps = seconds - self.first_step_seconds, steps - 1
        if steps <= 0 or seconds <= 0:
            return
        now = seconds / steps
        self.step_seconds = now if self.step_seconds is None else 0.5 * (self.step_seconds + now)

    def evaluated(self, seconds: float) -> None:
        self.eval_seconds = seconds

    def eta(self, step: int, total: int, evals_left: int = 0) -> str:
        if self.step_seconds is None:
            return "unknown"
        left = (total - step) * self.step_seconds + evals_left * (self.eval_seconds or 0.0)
        text = time.strftime("%H:%M:%S", time.gmtime(left))
        return text if self.eval_seconds is not None or not evals_left else text + " + evaluations"


def evaluations_left(config: ml_collections.ConfigDict, step: int) -> int:
    """Validation passes still due after ``step``, and the final query evaluation."""
    every, total = config.eval_every_steps, config.total_steps
    due = total // every - step // every + (1 if total % every and step < total else 0)
    return due + 1
