"""The profile window: a ``jax.profiler`` trace of the steps ``config.profile_steps``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
from absl import logging


class ProfileWindow:
    """A ``jax.profiler`` trace of the steps ``window`` = (first, stop) into ``folder``
    (``<workdir>/profile/``; TensorBoard's profile plugin or XProf reads it); a resumed run
    traces what is left of the window. Every step is annotated, so a trace taken from
    outside (``jax.profiler.start_server``) shows the steps too."""

    def __init__(self, window: tuple[int, int], folder: Path):
        self.first, self.stop = (int(x) for x in window)
        self.folder = folder
        self.tracing = False

    def before(self, step: int) -> None:
        if not self.tracing and self.first <= step < self.stop:
            self.folder.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.folder))
            self.tracing = True

    def after(self, step: int, outputs: Any) -> None:
        if self.tracing and step >= self.stop - 1:
            jax.block_until_ready(outputs)
            self.close()
            logging.info("profile of steps %d..%d written to %s", self.first, step, self.folder)

    def close(self) -> None:
        if self.tracing:
            self.tracing = False
            jax.profiler.stop_trace()
