"""What every image reader returns and shares: the :class:`Source` of one split, the numbered
lines of a text file (UTF-8, named on failure), and the records whose files exist.

The readers (:mod:`csce_jax.data.sources` for arrays, list files, folders and tfds;
:mod:`csce_jax.data.official` for the data sets' own files) both build on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from csce_jax.data.images import DataError


class Source:
    """A split held as parallel sequences of images, labels and names."""

    def __init__(
        self,
        images: Sequence[Any],
        labels: np.ndarray,
        where: Sequence[str],
        name: str,
        *,
        trim_bottom: int = 0,
        prepared: bool = False,
    ):
        if not (len(images) == len(labels) == len(where)):
            raise ValueError(
                f"{name}: {len(images)} images, {len(labels)} labels, {len(where)} names"
            )
        self.images, self.labels, self.where, self.name = images, np.asarray(labels), where, name
        self.trim_bottom = trim_bottom
        self.prepared = prepared  # images are decoded, resized uint8 arrays (a record set)
        self.parent: tuple[Source, np.ndarray] | None = None  # (source, indices) of a subset

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        return {"image": self.images[i], "label": self.labels[i], "where": self.where[i]}

    def subset(self, indices: np.ndarray, name: str) -> Source:
        """The records at ``indices`` (an index array), as a new source."""
        indices = np.asarray(indices, np.int64)
        out = Source(
            _Take(self.images, indices),
            self.labels[indices],
            _Take(self.where, indices),
            name,
            trim_bottom=self.trim_bottom,
            prepared=self.prepared,
        )
        out.parent = (self, indices)
        return out


class _Take(Sequence):
    """A lazy view ``seq[indices]`` (so subsets of tfds sources stay random access)."""

    def __init__(self, seq: Sequence, indices: np.ndarray):
        self.seq, self.indices = seq, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        return self.seq[int(self.indices[i])]


def text_lines(path: Path) -> list[tuple[int, str]]:
    """The numbered non-blank lines of a text file, read as UTF-8 (a byte order mark at its
    start dropped); a line that is not UTF-8 is refused naming the file, line and byte."""
    out = []
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for n, raw in enumerate(data.splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"{path}:{n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                f"{e.start + 1}); save the file as UTF-8"
            ) from None
        if line.strip():
            out.append((n, line))
    return out


def existing_records(
    paths: list[Path], labels: np.ndarray, where: list[str], skip_missing: bool, name: str
) -> Source:
    """The records whose file exists, as a Source; a missing one is an error naming it, or
    (``skip_missing``) skipped and counted in the log."""
    keep = np.array([p.is_file() for p in paths], bool)
    if not keep.all():
        missing = [where[i] for i in np.flatnonzero(~keep)]
        if not skip_missing:
            raise DataError(
                f"{name}: {len(missing)} listed image(s) do not exist, first: "
                f"{missing[0]} (set data.skip_corrupt=True to skip them)"
            )
        logging.warning(
            "%s: skipped %d missing image(s), first: %s", name, len(missing), missing[0]
        )
    kept = np.flatnonzero(keep)
    return Source(
        [str(paths[i]) for i in kept], np.asarray(labels)[kept], [where[i] for i in kept], name
    )
