"""Orbax's log, kept to what a user needs: its notices about what a run does on purpose, and
the tracebacks of a failed save (the trainer reports it once, in one line), are dropped."""

from __future__ import annotations

import errno
import logging as pylogging
import os
import warnings


class _IntendedNotices(pylogging.Filter):
    """Drops Orbax's warnings about what we do on purpose: opening a run read-only, and saving
    a periodic checkpoint without a validation score."""

    NOTICES = ("read_only=True", "directory is read only", "did not provide metrics")

    def filter(self, record: pylogging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(n in message for n in self.NOTICES)


class _OneLineErrors(pylogging.Filter):
    """A failed save is raised to the trainer, which prints one ``error:`` line naming the
    step and the cause; Orbax's background threads and asyncio under them also log it, each
    with its traceback, often several times. Those records are dropped (any other Orbax or
    asyncio error keeps its line, without the traceback)."""

    MARKERS = (
        ".orbax-checkpoint-tmp",
        "RESOURCE_EXHAUSTED",
        "Handler Commit operations",
        "(save_finalize) failed",
        "cannot schedule new futures after",
        "os_error_code",
        *(os.strerror(code) for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)),
    )

    def filter(self, record: pylogging.LogRecord) -> bool:
        if record.levelno < pylogging.ERROR or not any(
            n in record.pathname for n in ("/orbax/", "/asyncio/", "/etils/")
        ):
            return True
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += f" {record.exc_info[1]}"
        if any(m in text for m in self.MARKERS):
            return False
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


_filters_installed = False


def install_log_filters() -> None:
    """Keep Orbax's notices about what we do on purpose, and its tracebacks of a failed save
    (reported once by the trainer), out of the log. Installed when the first checkpoint folder
    is opened, not at import, so that importing this module changes no one's logging."""
    global _filters_installed
    if _filters_installed:
        return
    _filters_installed = True
    pylogging.getLogger("absl").addFilter(_IntendedNotices())
    for name in ("absl", "asyncio"):
        pylogging.getLogger(name).addFilter(_OneLineErrors())
    # An interrupted asynchronous save can leave a serialisation coroutine never awaited.
    warnings.filterwarnings(
        "ignore", message="coroutine 'async_serialize_from_host", category=RuntimeWarning
    )
