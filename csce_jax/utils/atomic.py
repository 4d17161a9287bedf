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


def _key_order(key: Any) -> tuple[int, Any]:
    text = str(key)
    return (0, int(text), "") if text.isascii() and text.isdigit() else (1, 0, text)


def natural_order(obj: Any) -> Any:
    """``obj`` with every mapping's keys sorted, numbers by value ("5" before "10", as in
    ``precision_at_k``), then the others alphabetically."""
    if isinstance(obj, dict):
        return {k: natural_order(obj[k]) for k in sorted(obj, key=_key_order)}
    if isinstance(obj, list | tuple):
        return [natural_order(v) for v in obj]
    return obj


def json_text(obj: Any) -> str:
    """``obj`` as indented JSON, keys in :func:`natural_order`."""
    return json.dumps(natural_order(obj), indent=2)


def write_json_atomically(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as indented, key-sorted JSON (:func:`json_text`), written atomically."""
    write_text_atomically(path, json_text(obj))
