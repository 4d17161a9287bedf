"""What an index holds: a folder of images, DeepHash list files, or a prepared record set, as
one ordered source with a path and a label text per image."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import ml_collections
import numpy as np

from csce_jax.data import load_data
from csce_jax.data.sources import IMAGE_SUFFIXES, ListFile, Source
from csce_jax.errors import CodesError

SPLITS = ("train", "val", "database", "query")


@dataclasses.dataclass
class Collection:
    """The images of an index in index order: ``source`` to encode, ``paths`` (absolute, or a
    record set's source names) and ``labels`` (text: a folder's sub-folder, a list's classes)."""

    source: Source
    paths: list[str]
    labels: list[str]
    described: str

    def fingerprint(self) -> str:
        """A digest of the paths in order: which images an index (or a partial one) holds."""
        digest = hashlib.sha256()
        for p in self.paths:
            digest.update(p.encode() + b"\0")
        return digest.hexdigest()[:16]


def full_path(path: str | os.PathLike) -> Path:
    """``path`` absolute and normalised (``./``, ``..`` and a trailing slash spelled away, links
    kept): one spelling per file, so that an interrupted index resumes however it is named."""
    return Path(os.path.normpath(Path(path).absolute()))


def image_files(folder: Path) -> list[Path]:
    """The images under ``folder`` (recursively, hidden files left out), in sorted order."""
    if not folder.is_dir():
        raise CodesError(f"image folder not found: {folder}")
    files = sorted(
        full_path(p)
        for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise CodesError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def from_paths(paths: list[str], labels: list[str] | None = None, name: str = "images"):
    """A collection of image files (or encoded image bytes named by ``paths``)."""
    src = Source(paths, np.zeros(len(paths), np.int32), paths, name)
    return Collection(src, list(paths), labels or [""] * len(paths), name)


def from_folder(folder: str) -> Collection:
    """Every image under ``folder``; its label is the sub-folder it lies in ('' at the top)."""
    root = full_path(folder)
    files = image_files(root)
    labels = [str(p.parent.relative_to(root)) for p in files]
    labels = ["" if label == "." else label for label in labels]
    return dataclasses.replace(
        from_paths([str(p) for p in files], labels), described=f"folder {root}"
    )


def _class_text(labels: np.ndarray) -> list[str]:
    if labels.ndim == 1:
        return [str(int(x)) for x in labels]
    return [",".join(str(int(c)) for c in np.flatnonzero(row)) for row in labels]


def from_list(list_file: str, image_root: str | None = None) -> Collection:
    """A DeepHash list file (``path 0 1 0 ...`` per line), paths under ``image_root`` (default:
    the list's folder); the label is the list of classes set on the line."""
    root = full_path(image_root or Path(list_file).parent)
    listed = ListFile(list_file, root)
    src = listed.source(multilabel=True, name=str(list_file))
    paths = [str(full_path(p)) for p in src.images]
    return Collection(src, paths, _class_text(src.labels), f"list {full_path(list_file)}")


def from_prepared(config: ml_collections.ConfigDict, prepared: str, split: str) -> Collection:
    """One split of a record set (``csce-prepare``), named by source paths."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.data.prepared = prepared
    data = load_data(config.data)
    if split not in SPLITS or getattr(data, split) is None:
        raise CodesError(f"--split={split!r}: not a split of the record set {prepared}")
    src = getattr(data, split)
    return Collection(
        src,
        [str(w) for w in src.where],
        _class_text(np.asarray(src.labels)),
        f"records {full_path(prepared)} split {split}",
    )


def query_paths(images: list[str], folder: str | None, list_file: str | None) -> list[str]:
    """Query image paths from arguments, a folder, or a file with one path first on each line
    (relative paths from the list's folder; a DeepHash list will do)."""
    paths = [str(full_path(p)) for p in images]
    if folder:
        paths += [str(p) for p in image_files(Path(folder))]
    if list_file:
        lf = Path(list_file)
        if not lf.is_file():
            raise CodesError(f"query list not found: {lf}")
        for line in lf.read_text().splitlines():
            if line.strip():
                p = Path(line.split()[0])
                paths.append(str(p if p.is_absolute() else (lf.parent / p).absolute()))
    if not paths:
        raise CodesError("no query image: give image paths, --images DIR or --list FILE")
    return paths
