"""Stopping cleanly and soon: SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C).

- **Start-up** (imports, data, restore, compilation) and **the final evaluation**: a signal
  stops the run at once (:class:`Preempted`); nothing is lost, since every checkpoint is already
  whole on disk (the trainer waits for a pending save before it exits). The rerun redoes only
  what was interrupted: the start-up, or the final evaluation.
- **Training**: a signal asks the loop to save the current step and exit. The host keeps at
  most ``MAX_IN_FLIGHT`` steps queued ahead of the devices, so the step it saves is at most a
  few step-times away, never dozens.
- A second SIGINT while the first is being acted on aborts at once (``KeyboardInterrupt``,
  exit 130), even when both arrived while Python was busy in compiled code (they are counted
  on a wakeup pipe, which receives one byte per signal).

:func:`install_early` (``train.py``, before the heavy imports) records a signal that arrives
while the modules load, which a library's catch-all ``except`` could otherwise swallow.

In a multi-host job the decision is collective: every process learns at the same step that
some process was signalled, so all save the same step. The flags are gathered every
``sync_every`` steps (at most ``MAX_SYNC_EVERY``).
"""

from __future__ import annotations

import os
import signal
import sys

import numpy as np
from absl import logging

SIGNALS = (signal.SIGTERM, signal.SIGINT)
MAX_IN_FLIGHT = 2  # training steps the host may queue ahead of the devices
MAX_SYNC_EVERY = 8  # steps between the processes' collective stop decisions

_early: list[str] = []  # signals received before StopSignals took over
_pipe: tuple[int, int] | None = None


class Preempted(BaseException):
    """A stop signal during start-up or the final evaluation (a BaseException, so that no
    library's ``except Exception`` swallows it)."""

    def __init__(self, name: str, phase: str):
        super().__init__(f"{name} during {phase}")
        self.signal_name, self.phase = name, phase


def _count_pending() -> int:
    """SIGINTs counted on the wakeup pipe since it was last read (one byte each)."""
    if _pipe is None:
        return 0
    try:
        data = os.read(_pipe[0], 4096)
    except BlockingIOError:
        return 0
    return data.count(bytes([signal.SIGINT]))


def _record_early(signum, frame) -> None:
    del frame
    _early.append(signal.Signals(signum).name)


def install_early() -> None:
    """Record SIGTERM/SIGINT from now on (before JAX and the data libraries are imported)."""
    global _pipe
    if _pipe is None:
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        try:
            signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except ValueError:  # not the main thread
            os.close(r)
            os.close(w)
            return
        _pipe = (r, w)
    for sig in SIGNALS:
        signal.signal(sig, _record_early)


class StopSignals:
    """Context manager: installs the handlers; ``phase`` is "start-up", "first compile",
    "training" or "final"; ``should_stop(step)`` gives the decision during training (in the
    other phases a signal stops at once)."""

    def __init__(self, sync_every: int):
        self.sync_every = max(1, min(sync_every, MAX_SYNC_EVERY))
        self.received: str | None = None
        self.phase = "start-up"
        self._previous: dict[int, object] = {}
        self._previous_unraisable = sys.unraisablehook

    def __enter__(self) -> StopSignals:
        _count_pending()  # bytes of signals already recorded
        self._previous_unraisable = sys.unraisablehook
        sys.unraisablehook = self._unraisable
        for sig in SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave the defaults alone
                pass
        self.reinstall()
        if _early:  # acted on by the first enter()
            if _early.count("SIGINT") > 1:
                self.__exit__()
                raise KeyboardInterrupt
            logging.warning("%s while starting: stopping now", _early[0])
            self.received = _early[0]
        return self

    def _unraisable(self, info) -> None:
        """A :class:`Preempted` raised where Python cannot propagate it (the signal arrived
        inside a garbage-collector callback or a finaliser) is already recorded in
        ``received`` and acted on at the next phase change: no traceback for it."""
        if isinstance(info.exc_value, Preempted):
            logging.warning("%s: stopping at the end of this start-up step", info.exc_value)
            return
        self._previous_unraisable(info)

    def _handle(self, signum, frame) -> None:
        del frame
        name = signal.Signals(signum).name
        # This call is one SIGINT; more bytes on the pipe are SIGINTs merged into it.
        repeated = name == "SIGINT" and (self.received == "SIGINT" or _count_pending() > 1)
        self._act(name, repeated=repeated)

    def _act(self, name: str, *, repeated: bool) -> None:
        if repeated:
            logging.warning("second SIGINT: aborting without saving")
            raise KeyboardInterrupt
        if self.phase != "training":
            logging.warning(
                "%s during %s: stopping now (every checkpoint is whole)", name, self.phase
            )
            self.received = name
            raise Preempted(name, self.phase)
        if self.received is None:
            logging.warning("%s: saving a checkpoint at the next step, then exiting", name)
        self.received = name

    def reinstall(self) -> None:
        """Take the handlers back: ``jax.distributed.initialize`` installs a SIGTERM handler of
        its own (its preemption notifier), which would leave our stop unheard."""
        for sig in self._previous:
            signal.signal(sig, self._handle)

    def enter(self, phase: str) -> None:
        """Move to ``phase``; a signal already received acts at once if the phase stops at once
        (the last training step was saved, the final evaluation not started)."""
        # A signal of a stop-at-once phase whose Preempted was swallowed on its way (raised
        # inside a finaliser, say) still stops the run here, before any step.
        if self.received is not None and (phase != "training" or self.phase != "training"):
            raise Preempted(self.received, self.phase if phase == "training" else phase)
        self.phase = phase

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        if sys.unraisablehook == self._unraisable:
            sys.unraisablehook = self._previous_unraisable
        _early.clear()

    def should_stop(self, step: int, last: bool = False) -> bool:
        """Whether to save and stop after ``step``; the same answer on every process."""
        import jax

        local = self.received is not None
        if jax.process_count() == 1:
            return local
        if step % self.sync_every and not last:
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray([local], np.int32))
        return bool(np.any(flags))
