"""The data sets by name, each with its retrieval protocol and documented split sizes.

Protocols (``docs/data.md``): the fine-grained one (database = training set, query = test set, mAP
over the whole database) and the release's DeepHash one (list files train/database/test, mAP@k,
multi-label relevance for NUS-WIDE and MS-COCO). A validation split, seeded and stratified, is
carved from the training set for model selection; the database keeps every training image.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from csce_jax.data import sources as S
from csce_jax.data.digits import digits_sources
from csce_jax.errors import DataError


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What a data set is: classes, label kind, mAP cut-off, split sizes, how to load it."""

    num_classes: int
    multilabel: bool
    topk: int | None  # mAP cut-off of the protocol; None = the whole database
    sizes: dict[str, int] | None  # documented sizes of train / query (/ database), if fixed
    load: Callable[[Any], dict[str, S.Source]]
    database_is_train: bool = True


@dataclasses.dataclass
class RetrievalData:
    """Sources of one data set under its protocol."""

    name: str
    num_classes: int
    multilabel: bool
    topk: int | None
    train: S.Source  # the whole training split
    fit: S.Source  # the training images used for gradient steps (train minus validation)
    val: S.Source | None  # validation queries (searched against ``fit``)
    database: S.Source
    query: S.Source


def _tfds(name: str, train: str, query: str):
    def load(cfg):
        d, download = cfg.data_dir or None, bool(cfg.download)
        return {
            "train": S.tfds_source(name, train, data_dir=d, download=download),
            "query": S.tfds_source(name, query, data_dir=d, download=download),
        }

    return load


def _manual(fn):
    def load(cfg):
        if not cfg.manual_dir:
            raise DataError(
                f"data.manual_dir is not set: {fn.__doc__.splitlines()[0]} is read "
                "from a manual directory (see the README)"
            )
        extra = {"keep_banner": cfg.keep_banner} if fn is S.aircraft_sources else {}
        train, query = fn(cfg.manual_dir, skip_missing=cfg.skip_corrupt, **extra)
        return {"train": train, "query": query}

    return load


def _lists(multilabel: bool):
    def load(cfg):
        if not cfg.list_dir:
            raise DataError(
                "data.list_dir is not set: it must hold train.txt, database.txt and "
                "test.txt (DeepHash format, see the README)"
            )
        root = cfg.image_root or cfg.list_dir
        return {
            split: S.list_file_source(
                Path(cfg.list_dir) / f"{f}.txt",
                root,
                multilabel=multilabel,
                skip_missing=cfg.skip_corrupt,
            )
            for split, f in (("train", "train"), ("database", "database"), ("query", "test"))
        }

    return load


def _folder(cfg):
    if not cfg.image_root:
        raise DataError("data.image_root is not set: point it at root/<class>/<image> folders")
    src, _ = S.folder_source(cfg.image_root, skip_missing=cfg.skip_corrupt)
    train_idx, query_idx = stratified_split(src.labels, cfg.query_fraction, cfg.split_seed)
    return {
        "train": src.subset(train_idx, f"{src.name}:train"),
        "query": src.subset(query_idx, f"{src.name}:query"),
    }


def _digits(cfg):
    train, query = digits_sources()
    return {"train": train, "query": query}


DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec(10, False, None, {"train": 1497, "query": 300}, _digits),
    "cub200": DatasetSpec(
        200,
        False,
        None,
        {"train": 5994, "query": 5794},
        _tfds("caltech_birds2011", "train", "test"),
    ),
    "stanford_dogs": DatasetSpec(
        120, False, None, {"train": 12000, "query": 8580}, _tfds("stanford_dogs", "train", "test")
    ),
    "cars196": DatasetSpec(
        196, False, None, {"train": 8144, "query": 8041}, _tfds("cars196", "train", "test")
    ),
    "food101": DatasetSpec(
        101, False, None, {"train": 75750, "query": 25250}, _tfds("food101", "train", "validation")
    ),
    "oxford_flowers102": DatasetSpec(
        102,
        False,
        None,
        {"train": 1020, "query": 6149},
        _tfds("oxford_flowers102", "train", "test"),
    ),
    "aircraft": DatasetSpec(
        100, False, None, {"train": 6667, "query": 3333}, _manual(S.aircraft_sources)
    ),
    "nabirds": DatasetSpec(
        555, False, None, {"train": 23929, "query": 24633}, _manual(S.nabirds_sources)
    ),
    "vegfru": DatasetSpec(
        292, False, None, {"train": 29200, "query": 116931}, _manual(S.vegfru_sources)
    ),
    # The release's protocol. Published list files differ in counts between releases, so no
    # size is enforced; `python -m csce_jax.data.splits` prints counts and checksums.
    "imagenet100": DatasetSpec(100, False, 1000, None, _lists(False), database_is_train=False),
    "nuswide21": DatasetSpec(21, True, 5000, None, _lists(True), database_is_train=False),
    "coco": DatasetSpec(80, True, 5000, None, _lists(True), database_is_train=False),
    "folder": DatasetSpec(0, False, None, None, _folder),
}


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) sorted indices; per class (single-label) or overall (multi-label)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    if fraction <= 0:
        return np.arange(len(labels)), np.zeros(0, np.int64)
    groups = (
        [np.arange(len(labels))]
        if labels.ndim > 1
        else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    )
    held = []
    for g in groups:
        k = round(len(g) * fraction)
        if len(g) > 1:
            held.append(rng.choice(g, min(max(k, 1), len(g) - 1), replace=False))
    out = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    return np.setdiff1d(np.arange(len(labels)), out), out


def load_data(cfg: Any) -> RetrievalData:
    """Build the sources of ``cfg.name`` (an ml_collections ``data`` block)."""
    if cfg.name not in DATASETS:
        raise DataError(f"unknown data.name {cfg.name!r}; known: {', '.join(sorted(DATASETS))}")
    spec = DATASETS[cfg.name]
    splits = spec.load(cfg)
    train, query = splits["train"], splits["query"]
    database = train if spec.database_is_train else splits["database"]
    counts = {"train": len(train), "query": len(query), "database": len(database)}
    if spec.sizes and not cfg.allow_size_mismatch:
        wrong = {k: (counts[k], v) for k, v in spec.sizes.items() if counts[k] != v}
        if wrong:
            detail = ", ".join(f"{k}: found {a}, documented {b}" for k, (a, b) in wrong.items())
            raise DataError(
                f"{cfg.name}: split sizes do not match the documented ones ({detail}); "
                "set data.allow_size_mismatch=True if that is intended"
            )
    num_classes = spec.num_classes or int(train.labels.max()) + 1
    keep, held = stratified_split(train.labels, cfg.val_fraction, cfg.split_seed)
    fit = train.subset(keep, f"{train.name}:fit") if len(held) else train
    val = train.subset(held, f"{train.name}:val") if len(held) else None
    logging.info(
        "data %s: train %d (fit %d, val %d), database %d, query %d",
        cfg.name,
        len(train),
        len(fit),
        len(held),
        len(database),
        len(query),
    )
    return RetrievalData(
        cfg.name,
        num_classes,
        spec.multilabel,
        spec.topk if cfg.topk == 0 else (None if cfg.topk < 0 else cfg.topk),
        train,
        fit,
        val,
        database,
        query,
    )
