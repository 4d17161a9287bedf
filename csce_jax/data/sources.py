"""Random-access image sources: arrays, DeepHash list files, image folders, tfds (the data sets'
official files: :mod:`csce_jax.data.official`; the Source type: :mod:`csce_jax.data.base`).

A source is one split: ``len(src)`` records, ``src[i]`` -> {"image", "label", "where"} where
``image`` is a path, encoded bytes or a uint8 array (decoded later, in the pipeline), ``label`` a
class index (single-label) or a multi-hot vector, and ``where`` names the record in error messages
(file and list line). ``src.labels`` holds every label without touching an image;
``src.trim_bottom`` is a number of rows every image of the source loses at the bottom (a banner);
``src.prepared`` says its images are already decoded and resized (a prepared record set).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from absl import logging

from csce_jax.data.base import Source, existing_records, text_lines
from csce_jax.data.images import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


class ListFile:
    """One DeepHash list file, parsed and checked: image paths, 0/1 label vectors, line names.

    Every line is ``relative/path.jpg v1 v2 ... vC``. A line is refused, naming the file and
    line, when a value is not 0 or 1, its vector's length differs from the file's first line
    (or from ``width``), its vector has no 1, or its path was already listed on an earlier line;
    an empty file is refused too. With ``skip_bad`` (``data.skip_corrupt``) such lines are
    skipped instead and counted in ``skipped`` (file:line and the reason).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        image_root: str | os.PathLike,
        *,
        width: int | None = None,
        skip_bad: bool = False,
    ):
        self.path, self.root = Path(path), Path(image_root)
        if not self.path.is_file():
            raise DataError(f"list file not found: {self.path}")
        self.skipped: list[str] = []
        self.names: list[str] = []
        self.lines: list[int] = []
        vectors: list[np.ndarray] = []
        first_line: dict[str, int] = {}
        for n, line in text_lines(self.path):
            try:
                name, values = self._fields(line, width, n)
                vec = self._vector(values, width, n)
                if name in first_line:
                    raise DataError(
                        f"{self.path}:{n}: {name} is listed twice (first on line "
                        f"{first_line[name]}); remove the duplicate line"
                    )
            except DataError as e:
                if not skip_bad:
                    raise
                self.skipped.append(str(e))
                continue
            width = len(vec) if width is None else width
            first_line[name] = n
            self.names.append(name)
            self.lines.append(n)
            vectors.append(vec)
        if self.skipped:
            logging.warning(
                "%s: skipped %d bad line(s), first: %s",
                self.path,
                len(self.skipped),
                self.skipped[0],
            )
        if not vectors:
            raise DataError(f"{self.path}: no usable line (expected `path/to/image.jpg 0 1 0 ...`)")
        self.vectors = np.stack(vectors)

    def _fields(self, line: str, width: int | None, n: int) -> tuple[str, list[str]]:
        """The image path (spaces in it kept) and the label values: the 0/1 tokens at the
        line's end (``width`` of them where known)."""
        tokens = line.split()
        count = 0
        while count < len(tokens) - 1 and tokens[-1 - count] in ("0", "1"):
            count += 1
        if width is not None:
            count = min(count, width)
        name_tokens = tokens[: len(tokens) - count]
        last = name_tokens[-1]
        if len(name_tokens) > 1 and (count == 0 or re.fullmatch(r"[-+]?\d+(\.\d*)?", last)):
            raise DataError(f"{self.path}:{n}: label values must be 0 or 1, found {last!r}")
        values = tokens[len(tokens) - count :]
        # The path as written: from the first token to the end of the last path token.
        start = line.index(name_tokens[0])
        end = start
        for token in name_tokens:
            end = line.index(token, end) + len(token)
        return line[start:end], values

    def _vector(self, values: list[str], width: int | None, n: int) -> np.ndarray:
        loc = f"{self.path}:{n}"
        if not values:
            raise DataError(f"{loc}: no label vector after the image path")
        if any(v not in ("0", "1") for v in values):
            bad = next(v for v in values if v not in ("0", "1"))
            raise DataError(f"{loc}: label values must be 0 or 1, found {bad!r}")
        if width is not None and len(values) != width:
            raise DataError(
                f"{loc}: a label vector of {len(values)} values, but {width} are expected "
                "(the class count: every line of every list must have the same length)"
            )
        vec = np.array([v == "1" for v in values], np.int8)
        if not vec.any():
            raise DataError(f"{loc}: the label vector has no 1 (an image needs at least one class)")
        return vec

    @property
    def width(self) -> int:
        return self.vectors.shape[1]

    @property
    def is_single_label(self) -> bool:
        return bool((self.vectors.sum(axis=1) == 1).all())

    def source(self, *, multilabel: bool, skip_missing: bool = False, name: str = "") -> Source:
        """The listed images as a Source: labels multi-hot (``multilabel``) or class indices."""
        if not multilabel and not self.is_single_label:
            n = self.lines[int(np.flatnonzero(self.vectors.sum(axis=1) != 1)[0])]
            raise DataError(
                f"{self.path}:{n}: more than one 1 in the label vector of a single-label data "
                "set (set data.multilabel=true for multi-label data)"
            )
        labels = self.vectors if multilabel else self.vectors.argmax(axis=1).astype(np.int32)
        paths = [self.root / name for name in self.names]
        where = [f"{p} ({self.path}:{n})" for p, n in zip(paths, self.lines, strict=True)]
        return existing_records(paths, labels, where, skip_missing, name or str(self.path))


def list_file_source(
    list_file: str | os.PathLike,
    image_root: str | os.PathLike,
    *,
    multilabel: bool,
    skip_missing: bool = False,
) -> Source:
    """A DeepHash-style list: one line ``relative/path.jpg 0 0 1 0 ...`` per image."""
    return ListFile(list_file, image_root, skip_bad=skip_missing).source(
        multilabel=multilabel, skip_missing=skip_missing
    )


SYSTEM_FOLDERS = ("__MACOSX", "@eaDir", "$RECYCLE.BIN", "System Volume Information")


def _is_listed(p: Path) -> bool:
    """False for hidden and system entries (``.ipynb_checkpoints``, ``__MACOSX``, ``._x.jpg``)."""
    return not (p.name.startswith(".") or p.name in SYSTEM_FOLDERS)


def folder_images(folder: Path) -> list[Path]:
    """The image files directly in ``folder`` (sorted), without hidden files and resource forks."""
    return sorted(
        f
        for f in folder.iterdir()
        if f.is_file() and _is_listed(f) and f.suffix.lower() in IMAGE_SUFFIXES
    )


def folder_source(
    root: str | os.PathLike, *, skip_missing: bool = False
) -> tuple[Source, list[str]]:
    """``root/<class>/<image>`` for every class folder (sorted); returns (source, class names).

    Hidden and system folders and files (``.ipynb_checkpoints``, ``__MACOSX``, ``._x.jpg``) are
    not classes or images, and a folder without images is no class; each skip is logged.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    folders = sorted(d for d in root.iterdir() if d.is_dir())
    ignored = [d.name for d in folders if not _is_listed(d)]
    if ignored:
        logging.warning("%s: ignored hidden or system folders: %s", root, ", ".join(ignored))
    per_class = {d.name: folder_images(d) for d in folders if _is_listed(d)}
    empty = [name for name, files in per_class.items() if not files]
    if empty:
        logging.warning("%s: ignored folders without images: %s", root, ", ".join(empty))
    hidden = sum(
        1
        for d in folders
        if _is_listed(d)
        for f in d.iterdir()
        if f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES
    )
    if hidden:  # macOS resource forks (._x.jpg) and the like: one line for all of them
        logging.warning("%s: ignored %d hidden image-named files (such as ._x.jpg)", root, hidden)
    classes = [name for name, files in per_class.items() if files]
    if not classes:
        raise DataError(
            f"{root}: no class sub-folder holds images with suffix {IMAGE_SUFFIXES} "
            "(expected root/<class>/<image>)"
        )
    paths, labels = [], []
    for c, name in enumerate(classes):
        paths.extend(per_class[name])
        labels.extend([c] * len(per_class[name]))
    where = [str(p) for p in paths]
    return existing_records(
        paths, np.asarray(labels, np.int32), where, skip_missing, str(root)
    ), classes


class _TfdsImages(Sequence):
    def __init__(self, ds, key: str):
        self.ds, self.key = ds, key

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[int(i)][self.key]


def tfds_source(
    name: str, split: str, *, data_dir: str | None = None, download: bool = False
) -> Source:
    """A tfds split read by random access (ArrayRecord), without TensorFlow.

    tfds decodes the images (to uint8 arrays); the label scan at start-up first tries to leave
    images encoded, which is much faster where tfds can do it without TensorFlow. The builder must
    be prepared (``tfds build NAME``); only with ``download=True`` (``data.download``) may a
    missing data set be downloaded and prepared here, never by surprise during a launch.
    """
    import tensorflow_datasets as tfds

    try:
        ds = tfds.data_source(name, split=split, data_dir=data_dir, download=download)
    except Exception as e:
        raise DataError(
            f"tfds data set {name!r} split {split!r} is not available under data_dir="
            f"{data_dir or '~/tensorflow_datasets'} ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else ''}). Prepare it once with network "
            f"access: `tfds build {name} --data_dir=...`, or set data.download=True"
        ) from e
    try:
        raw = tfds.data_source(
            name,
            split=split,
            data_dir=data_dir,
            download=False,
            decoders={"image": tfds.decode.SkipDecoding()},
        )
        if len(raw):
            _ = raw[0]  # probe: raises where this needs TensorFlow
    except Exception:  # needs TensorFlow here: decode images too, slower but correct
        raw = ds
    labels = np.fromiter((int(raw[i]["label"]) for i in range(len(raw))), np.int32, len(raw))
    where = [f"tfds:{name}/{split}[{i}]" for i in range(len(ds))]
    return Source(_TfdsImages(ds, "image"), labels, where, f"tfds:{name}/{split}")
