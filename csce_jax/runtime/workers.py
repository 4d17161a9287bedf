"""Worker processes that end with the process that started them.

A decoding worker (the training loader's, ``prepare``'s) whose parent is killed with SIGKILL
would otherwise live on, blocked on a pipe, and keep multiprocessing's resource tracker alive
with it. Each worker calls :func:`exit_with_parent` when it starts.
"""

from __future__ import annotations

import os
import threading
import time

POLL_SECONDS = 0.5


def exit_with_parent() -> None:
    """Exit this process (at once, without cleanup) once its parent is gone."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(POLL_SECONDS)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def start_niced_worker(niceness: int) -> None:
    """A pool worker's initializer: lower its priority, and end it with its parent."""
    os.nice(niceness)
    exit_with_parent()
