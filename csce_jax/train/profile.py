"""The profile window: a ``jax.profiler`` trace of the steps ``config.profile_steps``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
from absl import logging


class ProfileWindow:
    """A ``jax.profiler`` trace of the steps ``window`` = (first, stop) into ``folder``
    (``<workdir>/profile/``; TensorBoard's profile plugin or XProf reads it), cut at the
    run's ``last_step``; a resumed run traces what is left of the window. Every step is
    annotated, so a trace taken from outside (``jax.profiler.start_server``) shows the steps
    too. Each trace written is logged with the steps it holds."""

    def __init__(self, window: tuple[int, int], folder: Path, last_step: int):
        self.first, stop = (int(x) for x in window)
        self.stop = min(stop, last_step + 1)
        if self.first and self.stop < stop:
            logging.warning(
                "profile_steps=(%d, %d) ends after the run's last step %d: steps %d..%d traced",
                self.first, stop, last_step, self.first, last_step,
            )  # fmt: skip
        self.folder = folder
        self.tracing = False
        self.traced: int | None = None  # the last step traced so far

    def before(self, step: int) -> None:
        if not self.tracing and self.first <= step < self.stop:
            self.folder.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.folder))
            self.tracing = True
            self.began = step

    def after(self, step: int, outputs: Any) -> None:
        if self.tracing:
            self.traced = step
            if step >= self.stop - 1:
                jax.block_until_ready(outputs)
                self.close()

    def close(self) -> None:
        """Stop a trace in progress (the window's end, or a run stopped inside it)."""
        if self.tracing:
            self.tracing = False
            jax.profiler.stop_trace()
            if self.traced is None:
                logging.info("profile trace stopped before a step finished: %s", self.folder)
            else:
                logging.info(
                    "profile of steps %d..%d written to %s", self.began, self.traced, self.folder
                )
