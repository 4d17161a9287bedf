"""The data sets by name, each with its retrieval protocol and documented split sizes.

Protocols (``docs/data.md``): the fine-grained one (database = training set, query = test set, mAP
over the whole database) and the release's DeepHash one (list files train/database/test, mAP@k,
multi-label relevance for NUS-WIDE and MS-COCO). A validation split, seeded and stratified, is
carved from the training set for model selection; the database keeps every training image.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

import csce_jax.data.sources as S
from csce_jax.config.schema import choices
from csce_jax.data import official
from csce_jax.data.digits import digits_sources
from csce_jax.data.records import load_prepared
from csce_jax.errors import DataError


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What a data set is: classes, label kind, mAP cut-off, split sizes, how to load it.

    ``num_classes`` 0 and ``multilabel`` None mean "from the data" (list files, folders).
    ``load(cfg)`` returns the splits {"train", "query"[, "database"][, "val"]} and, where the
    data decide them, "num_classes" and "multilabel".
    """

    num_classes: int
    multilabel: bool | None
    topk: int | None  # mAP cut-off of the protocol; None = the whole database
    sizes: dict[str, int] | None  # documented sizes of train / query (/ val), if fixed
    load: Callable[[Any], dict[str, Any]]
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


def _tfds(name: str, train: str, query: str, val: str | None = None):
    def load(cfg):
        d, download = cfg.data_dir or None, bool(cfg.download)
        out = {
            "train": S.tfds_source(name, train, data_dir=d, download=download),
            "query": S.tfds_source(name, query, data_dir=d, download=download),
        }
        if val:
            out["val"] = S.tfds_source(name, val, data_dir=d, download=download)
        return out

    return load


def _manual(fn, url: str):
    def load(cfg):
        if not cfg.manual_dir:
            raise DataError(
                f"{cfg.name} is read from files you download yourself: download them from "
                f"{url}, then pass --config.data.manual_dir=<the folder holding them> "
                "(docs/data.md)"
            )
        extra = {"keep_banner": cfg.keep_banner} if fn is official.aircraft_sources else {}
        train, query = fn(cfg.manual_dir, skip_missing=cfg.skip_corrupt, **extra)
        return {"train": train, "query": query}

    return load


def _flowers(cfg):
    """Flowers-102: the official files in ``data.manual_dir`` when set, else tfds."""
    if not cfg.manual_dir:
        try:
            return _tfds("oxford_flowers102", "train", "test", "validation")(cfg)
        except DataError as e:
            raise DataError(
                f"{e}; or download 102flowers.tgz, imagelabels.mat and setid.mat from "
                f"{official.FLOWERS_URL} and pass --config.data.manual_dir=<their folder>"
            ) from e
    return official.flowers102_sources(
        cfg.manual_dir, skip_missing=cfg.skip_corrupt, check_sizes=not cfg.allow_size_mismatch
    )


LIST_FILES = {"train": "train.txt", "database": "database.txt", "query": "test.txt"}
MULTILABEL_CHOICES = choices("data.multilabel")


def _lists(num_classes: int | None = None, multilabel: bool | None = None):
    """DeepHash list files in ``data.list_dir``: train.txt, database.txt, test.txt and, when
    present, val.txt (the validation queries). A preset fixes the class count and label kind;
    otherwise the vectors' length is the class count, and ``data.multilabel`` (auto: any line
    with several 1s) the label kind."""

    def load(cfg):
        if not cfg.list_dir:
            raise DataError(
                f"data.list_dir is not set: {cfg.name} reads train.txt, database.txt and "
                "test.txt (DeepHash format `path/to/image.jpg 0 1 0 ...`, docs/data.md) from "
                "--config.data.list_dir=<folder>"
            )
        root = cfg.image_root or cfg.list_dir
        files = dict(LIST_FILES)
        if (Path(cfg.list_dir) / "val.txt").is_file():
            files["val"] = "val.txt"
        width, parsed = num_classes, {}
        for split, fname in files.items():
            parsed[split] = S.ListFile(
                Path(cfg.list_dir) / fname, root, width=width, skip_bad=cfg.skip_corrupt
            )
            width = parsed[split].width
        multi = multilabel
        if multi is None:
            choice = str(cfg.multilabel).lower()
            if choice not in MULTILABEL_CHOICES:
                raise DataError(f"data.multilabel={cfg.multilabel!r}: one of {MULTILABEL_CHOICES}")
            auto = not all(f.is_single_label for f in parsed.values())
            multi = auto if choice == "auto" else choice == "true"
        out: dict[str, Any] = {
            split: f.source(
                multilabel=multi, skip_missing=cfg.skip_corrupt, name=f"{cfg.name}/{split}"
            )
            for split, f in parsed.items()
        }
        out["num_classes"], out["multilabel"] = width, multi
        return out

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


_DOCUMENTED = dict(multilabel=False, topk=None)  # fine-grained: one label, mAP over all
_LISTED = dict(sizes=None, database_is_train=False)  # DeepHash list files: sizes not enforced

DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec(
        num_classes=10, **_DOCUMENTED, sizes={"train": 1497, "query": 300}, load=_digits
    ),
    "cub200": DatasetSpec(
        num_classes=200,
        **_DOCUMENTED,
        sizes={"train": 5994, "query": 5794},
        load=_tfds("caltech_birds2011", "train", "test"),
    ),
    "stanford_dogs": DatasetSpec(
        num_classes=120,
        **_DOCUMENTED,
        sizes={"train": 12000, "query": 8580},
        load=_tfds("stanford_dogs", "train", "test"),
    ),
    "cars196": DatasetSpec(
        num_classes=196,
        **_DOCUMENTED,
        sizes={"train": 8144, "query": 8041},
        load=_tfds("cars196", "train", "test"),
    ),
    "food101": DatasetSpec(
        num_classes=101,
        **_DOCUMENTED,
        sizes={"train": 75750, "query": 25250},
        load=_tfds("food101", "train", "validation"),
    ),
    "oxford_flowers102": DatasetSpec(
        num_classes=102,
        **_DOCUMENTED,
        sizes={"train": 1020, "val": 1020, "query": 6149},
        load=_flowers,
    ),
    "aircraft": DatasetSpec(
        num_classes=100,
        **_DOCUMENTED,
        sizes={"train": 6667, "query": 3333},
        load=_manual(official.aircraft_sources, official.AIRCRAFT_URL),
    ),
    "nabirds": DatasetSpec(
        num_classes=555,
        **_DOCUMENTED,
        sizes={"train": 23929, "query": 24633},
        load=_manual(official.nabirds_sources, official.NABIRDS_URL),
    ),
    "vegfru": DatasetSpec(
        num_classes=292,
        **_DOCUMENTED,
        sizes={"train": 29200, "query": 116931},
        load=_manual(official.vegfru_sources, official.VEGFRU_URL),
    ),
    # The release's protocol: any DeepHash list files, and its three data sets as presets (class
    # count and cut-off fixed). Published list files differ in counts between releases, so no
    # size is enforced; `csce-splits` prints counts and checksums.
    "lists": DatasetSpec(num_classes=0, multilabel=None, topk=None, **_LISTED, load=_lists()),
    "imagenet100": DatasetSpec(
        num_classes=100, multilabel=False, topk=1000, **_LISTED, load=_lists(100, False)
    ),
    "nuswide21": DatasetSpec(
        num_classes=21, multilabel=True, topk=5000, **_LISTED, load=_lists(21, True)
    ),
    "coco": DatasetSpec(
        num_classes=80, multilabel=True, topk=5000, **_LISTED, load=_lists(80, True)
    ),
    "folder": DatasetSpec(num_classes=0, **_DOCUMENTED, sizes=None, load=_folder),
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


def _check_labels(name: str, src: S.Source, num_classes: int, multilabel: bool) -> None:
    """Every label fits the class count (a label -1 or C would wrap or break the loss)."""
    labels = np.asarray(src.labels)
    if multilabel:
        if labels.ndim != 2 or labels.shape[1] != num_classes:
            raise DataError(
                f"{name}: {src.name} has label vectors of shape {labels.shape[1:]}, "
                f"expected ({num_classes},)"
            )
        return
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise DataError(
            f"{name}: label {int(labels[bad[0]])} of {src.where[int(bad[0])]} is outside "
            f"0..{num_classes - 1} ({bad.size} such label(s) in {src.name})"
        )


def _without(train: S.Source, held: S.Source) -> np.ndarray:
    """Indices of ``train``'s records that are not among ``held``'s images (by path)."""
    if not all(isinstance(x, str) for x in held.images):
        return np.arange(len(train))
    held_paths = set(held.images)
    return np.asarray([i for i in range(len(train)) if train.images[i] not in held_paths], np.int64)


def _shared_images(query: S.Source, database: S.Source) -> int:
    """How many query images are also database images (by path; 0 where images are arrays)."""

    def paths(src: S.Source) -> set[str]:
        if not all(isinstance(x, str | os.PathLike) for x in src.images):
            return set()
        return {os.path.normpath(os.fspath(x)) for x in src.images}

    return len(paths(query) & paths(database))


def load_data(cfg: Any) -> RetrievalData:
    """Build the sources of ``cfg.name`` (an ml_collections ``data`` block)."""
    if cfg.get("prepared"):
        return RetrievalData(**load_prepared(cfg))
    if cfg.name not in DATASETS:
        raise DataError(f"unknown data.name {cfg.name!r}; known: {', '.join(sorted(DATASETS))}")
    spec = DATASETS[cfg.name]
    splits = spec.load(cfg)
    train, query = splits["train"], splits["query"]
    database = train if spec.database_is_train else splits["database"]
    _check_sizes(cfg, spec, splits, database)
    num_classes = splits.get("num_classes") or spec.num_classes or int(train.labels.max()) + 1
    multilabel = splits.get("multilabel", spec.multilabel)
    for src in {id(s): s for s in (train, query, database, splits.get("val"))}.values():
        if src is not None:
            _check_labels(cfg.name, src, num_classes, multilabel)
    fit, val = _fit_and_validation(cfg, train, splits.get("val"))
    _warn_shared(cfg.name, query, database)
    logging.info(
        "data %s: train %d (fit %d, val %d), database %d, query %d",
        cfg.name,
        len(train),
        len(fit),
        0 if val is None else len(val),
        len(database),
        len(query),
    )
    return RetrievalData(
        name=cfg.name,
        num_classes=num_classes,
        multilabel=multilabel,
        topk=spec.topk if cfg.topk == 0 else (None if cfg.topk < 0 else cfg.topk),
        train=train,
        fit=fit,
        val=val,
        database=database,
        query=query,
    )


def _check_sizes(cfg: Any, spec: DatasetSpec, splits: dict[str, Any], database: S.Source) -> None:
    """The splits must have the data set's documented sizes (unless allowed to differ)."""
    counts = {k: len(splits[k]) for k in ("train", "query", "val") if k in splits}
    counts["database"] = len(database)
    if not spec.sizes or cfg.allow_size_mismatch:
        return
    wrong = {k: (counts[k], v) for k, v in spec.sizes.items() if counts.get(k, v) != v}
    if wrong:
        detail = ", ".join(f"{k}: found {a}, documented {b}" for k, (a, b) in wrong.items())
        raise DataError(
            f"{cfg.name}: split sizes do not match the documented ones ({detail}); "
            "set data.allow_size_mismatch=True if that is intended"
        )


def _fit_and_validation(
    cfg: Any, train: S.Source, val: S.Source | None
) -> tuple[S.Source, S.Source | None]:
    """(the training images of the gradient steps, the validation queries): the data set's
    own validation split taken out of ``train``, else a seeded stratified one carved from it."""
    if val is not None:
        keep = _without(train, val)
        return (train if len(keep) == len(train) else train.subset(keep, f"{train.name}:fit")), val
    keep, held = stratified_split(train.labels, cfg.val_fraction, cfg.split_seed)
    if not len(held):
        return train, None
    return train.subset(keep, f"{train.name}:fit"), train.subset(held, f"{train.name}:val")


def _warn_shared(name: str, query: S.Source, database: S.Source) -> None:
    """Say when query images are also database images (not the published protocol)."""
    shared = _shared_images(query, database)
    if shared:
        logging.warning(
            "data %s: %d of the %d query images are also in the database: each finds itself at "
            "distance 0, so the mAP is not the published protocol's (queries apart from the "
            "database)",
            name,
            shared,
            len(query),
        )
