"""Stopping cleanly: SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C) ask the training
loop to save a checkpoint and exit; a second SIGINT aborts at once.

In a multi-host job the decision is collective: every process learns at the same step that
some process was signalled, so all save the same step. The flags are gathered only at logging
steps (where the host synchronises anyway), so dispatch stays asynchronous in between; one
process saves at the very next step.
"""

from __future__ import annotations

import signal

import jax
import numpy as np
from absl import logging

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Context manager: installs the handlers, ``should_stop(step)`` gives the decision."""

    def __init__(self, sync_every: int):
        self.sync_every = max(1, sync_every)
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        for sig in SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave the defaults alone
                pass
        return self

    def _handle(self, signum, frame) -> None:
        del frame
        name = signal.Signals(signum).name
        if self.received == "SIGINT" and name == "SIGINT":
            raise KeyboardInterrupt
        logging.warning("%s: saving a checkpoint at the next step, then exiting", name)
        self.received = name

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def should_stop(self, step: int, last: bool = False) -> bool:
        """Whether to save and stop after ``step``; the same answer on every process."""
        local = self.received is not None
        if jax.process_count() == 1:
            return local
        if step % self.sync_every and not last:
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray([local], np.int32))
        return bool(np.any(flags))
