"""The training step's first compilation, in a helper thread that a stop signal need not wait for."""

from __future__ import annotations

import threading
from typing import Any

import jax

_compiling = threading.Event()


def compile_in_flight() -> bool:
    """Whether :func:`compile_first` left a compilation running (it was interrupted): the
    process must then end with ``os._exit``, as XLA aborts when the interpreter finalises
    under a running compilation."""
    return _compiling.is_set()


def compile_first(train_step: Any, state: Any, batch: dict[str, jax.Array]) -> None:
    """Compile the training step for ``(state, batch)`` in a helper thread while the main
    thread waits in short, interruptible sleeps: a compile can take minutes, and a stop signal
    must not wait for it. The jitted call reuses the executable (no second compilation).
    A step that cannot be lowered ahead of time (a wrapper around the jitted step) is left to
    compile at its first call."""
    if not hasattr(train_step, "lower"):
        return
    failure: list[BaseException] = []
    done = threading.Event()

    def build() -> None:
        try:
            train_step.lower(state, batch).compile()
        except BaseException as e:  # handed to the main thread
            failure.append(e)
        finally:
            _compiling.clear()
            done.set()

    _compiling.set()
    threading.Thread(target=build, name="compile-train-step", daemon=True).start()
    # Short waits, not Thread.join: a signal handler raising inside join can leave the
    # thread marked as finished while it still runs.
    while not done.wait(0.1):
        pass
    if failure:
        raise failure[0]
