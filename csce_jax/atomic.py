"""Atomic file writes: a temporary file beside the target, renamed over it when complete, so a
reader (or a crash, or a full disk) never sees half a file and the old one stays whole."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


def write_file_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """``write(f)`` into a temporary file beside ``path``, then rename it to ``path``: the old
    file stays whole if writing fails (a full disk), and no temporary file is left behind."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as e:
        if e.filename:
            raise
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e  # name the file
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """``text`` (UTF-8) written to ``path`` atomically (see :func:`write_file_atomically`)."""
    write_file_atomically(path, lambda f: f.write(text.encode()))


def write_json_atomically(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as indented, key-sorted JSON, written atomically."""
    write_text_atomically(path, json.dumps(obj, indent=2, sort_keys=True))
