"""When a checkpoint does not read: the cause in the system's words, the fall back to the next
older step, and setting unreadable steps aside (``corrupt_checkpoints/``, kept for inspection)
so that they hold no slot of the keep policy. A run never starts again from step 0 by itself.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from absl import logging

from csce_jax.errors import CheckpointError
from csce_jax.runs.writer import layout


def reason(err: BaseException) -> str:
    """The cause of a failed read or write in the system's words where it gave them
    (tensorstore carries the OS error inside its own message)."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = str(err)
    code = re.search(r"os_error_code\W{0,2}(\d+)", text)
    if code:
        return os.strerror(int(code.group(1)))
    for c in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EIO):
        if os.strerror(c) in text:
            return os.strerror(c)
    return f"{type(err).__name__}: {text.splitlines()[0][:300] if text else ''}"


def first_restorable(
    steps: list[int],
    restore: Callable[[int], dict[str, Any]],
    directory: Path,
    set_aside: Callable[[list[int]], None],
) -> tuple[int, dict[str, Any]] | None:
    """(step, what ``restore(step)`` read) of the first of ``steps`` that restores; the ones
    before it are logged and set aside. None when ``steps`` is empty; if none restores,
    :class:`CheckpointError` lists each with its cause."""
    errors = []
    for i, s in enumerate(steps):
        try:
            found = s, restore(s)
        except Exception as e:  # truncated or edited files, wrong shapes, ...
            msg = f"{directory / str(s)}: {reason(e)}"
            then = f"trying step {steps[i + 1]}" if i + 1 < len(steps) else "none left"
            logging.error("cannot restore checkpoint %s; %s", msg, then)
            errors.append((s, msg))
            continue
        set_aside([bad for bad, _ in errors])
        return found
    if errors:
        raise CheckpointError("no checkpoint could be restored: " + "; ".join(m for _, m in errors))
    return None


def move_aside(directory: Path, steps: list[int]) -> None:
    """Move the step folders ``steps`` out of ``directory`` into the run's
    ``corrupt_checkpoints/`` (process 0 moves; every process of a job waits for it)."""
    if jax.process_index() == 0:
        aside = layout(directory.parent).corrupt
        aside.mkdir(exist_ok=True)
        for s in steps:
            dest = aside / f"{s}-{os.getpid()}"
            os.replace(directory / str(s), dest)
            logging.warning("moved the unrestorable checkpoint of step %d to %s", s, dest)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("csce_jax.checkpoints.set_aside")


def unreadable_records(
    steps: list[int], read_meta: Callable[[int], dict[str, Any]], directory: Path
) -> dict[int, str]:
    """{step: why} for the steps whose record does not read. Where no step's record reads,
    the run stops (one line naming each step and why), nothing moved."""
    bad = {}
    for s in steps:
        try:
            meta = read_meta(s)
            if not isinstance(meta.get("step"), int):
                raise CheckpointError("no step in its record")
        except CheckpointError as e:
            bad[s] = reason(e.__cause__) if e.__cause__ else str(e)
    if steps and len(bad) == len(steps):
        listed = "; ".join(f"step {s}: {why}" for s, why in bad.items())
        raise CheckpointError(
            f"{directory} holds no checkpoint whose record reads ({listed}); nothing "
            "was moved. Restore the files, or rerun with --start_over to set them aside "
            "and train from step 0"
        )
    for s, why in bad.items():
        logging.error("checkpoint %s has no readable record: %s", s, why)
    return bad
