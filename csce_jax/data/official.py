"""The data sets tfds does not have, read from their official files in a manual directory:
FGVC-Aircraft, NABirds, VegFru and Oxford Flowers-102 (extracting an archive once, atomically).
Each reader returns the data set's splits as :class:`csce_jax.data.sources.Source`.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np
from absl import logging

from csce_jax.data.base import Source, existing_records, text_lines
from csce_jax.data.images import DataError

AIRCRAFT_URL = (
    "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz"
)
NABIRDS_URL = "https://dl.allaboutbirds.org/nabirds"
VEGFRU_URL = "https://github.com/ustc-vim/vegfru"


def _extracted(manual_dir: Path, folder: str, archive: str, url: str, needed: str) -> Path:
    """``manual_dir/folder``, extracting ``manual_dir/archive`` first if only that is there."""
    if not manual_dir.is_dir():
        raise DataError(
            f"manual directory {manual_dir} does not exist: download {url} and put "
            f"{archive} (or its extracted folder {folder}/) there"
        )
    base = manual_dir / folder
    if not (base / needed).exists() and (manual_dir / archive).is_file():
        _extract(manual_dir / archive, folder)
    if not (base / needed).exists():
        raise DataError(
            f"{base / needed} not found: download {url} and put {archive} or its "
            f"extracted folder {folder}/ in {manual_dir}"
        )
    return base


def _extract(archive: Path, folder: str) -> None:
    """Extract ``archive``'s ``folder/`` beside it, atomically: into a temporary folder first,
    then renamed, so an interrupted extraction leaves no half folder behind."""
    import tempfile

    logging.info("extracting %s", archive)
    try:
        with tempfile.TemporaryDirectory(prefix=f".{folder}-", dir=archive.parent) as tmp:
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
            if not (Path(tmp) / folder).is_dir():
                raise DataError(f"{archive}: holds no {folder}/ folder")
            if (archive.parent / folder).exists():
                raise DataError(
                    f"{archive.parent / folder} exists but is incomplete; remove it to extract "
                    f"{archive.name} again"
                )
            os.replace(Path(tmp) / folder, archive.parent / folder)
    except (OSError, tarfile.TarError) as e:
        raise DataError(
            f"cannot extract {archive} into {archive.parent} ({e}); extract it there yourself"
        ) from e


AIRCRAFT_BANNER_ROWS = 20


def aircraft_sources(
    manual_dir: str | os.PathLike, *, skip_missing: bool = False, keep_banner: bool = False
) -> tuple[Source, Source]:
    """FGVC-Aircraft 2013b, variant level (100 classes): (trainval 6,667, test 3,333).

    Every image carries a 20-pixel copyright banner along its bottom edge, which the data
    set's documentation says to remove; it is cropped off unless ``keep_banner``.
    """
    base = (
        _extracted(
            Path(manual_dir),
            "fgvc-aircraft-2013b",
            "fgvc-aircraft-2013b.tar.gz",
            AIRCRAFT_URL,
            "data/variants.txt",
        )
        / "data"
    )
    classes = [c.strip() for c in (base / "variants.txt").read_text().splitlines() if c.strip()]
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for split in ("trainval", "test"):
        f = base / f"images_variant_{split}.txt"
        paths, labels, where = [], [], []
        for n, line in text_lines(f):
            image_id, _, variant = line.partition(" ")
            if variant not in index:
                raise DataError(f"{f}:{n}: unknown variant {variant!r}")
            paths.append(base / "images" / f"{image_id}.jpg")
            labels.append(index[variant])
            where.append(f"{paths[-1]} ({f}:{n})")
        src = existing_records(
            paths, np.asarray(labels, np.int32), where, skip_missing, f"aircraft/{split}"
        )
        src.trim_bottom = 0 if keep_banner else AIRCRAFT_BANNER_ROWS
        out.append(src)
    return out[0], out[1]


def nabirds_sources(
    manual_dir: str | os.PathLike, *, skip_missing: bool = False
) -> tuple[Source, Source]:
    """NABirds (555 visual categories): (train 23,929, test 24,633)."""
    base = _extracted(
        Path(manual_dir), "nabirds", "nabirds.tar.gz", NABIRDS_URL, "train_test_split.txt"
    )

    def table(name):
        rows = {}
        for line in (base / name).read_text().splitlines():
            if line.strip():
                k, v = line.split(maxsplit=1)
                rows[k] = v.strip()
        return rows

    images, classes, is_train = (
        table("images.txt"),
        table("image_class_labels.txt"),
        table("train_test_split.txt"),
    )
    used = sorted({int(c) for c in classes.values()})
    index = {c: i for i, c in enumerate(used)}
    out = []
    for flag, split in (("1", "train"), ("0", "test")):
        ids = [i for i in images if is_train.get(i) == flag]
        paths = [base / "images" / images[i] for i in ids]
        where = [f"{p} (images.txt id {i})" for p, i in zip(paths, ids, strict=True)]
        labels = np.asarray([index[int(classes[i])] for i in ids], np.int32)
        out.append(existing_records(paths, labels, where, skip_missing, f"nabirds/{split}"))
    return out[0], out[1]


def vegfru_sources(
    manual_dir: str | os.PathLike, *, skip_missing: bool = False
) -> tuple[Source, Source]:
    """VegFru (292 classes) with its official lists: (train 29,200, test 116,931)."""
    base = _extracted(
        Path(manual_dir), "vegfru", "vegfru.tar.gz", VEGFRU_URL, "vegfru_list/vegfru_train.txt"
    )
    out = []
    for split in ("train", "test"):
        f = base / "vegfru_list" / f"vegfru_{split}.txt"
        paths, labels, where = [], [], []
        for n, line in text_lines(f):
            rel, _, label = line.strip().rpartition(" ")
            if not rel or not label.isascii() or not label.isdigit():
                raise DataError(
                    f"{f}:{n}: expected `<image path> <class number>`, found {line.strip()!r}"
                )
            paths.append(base / rel.strip())
            labels.append(int(label))
            where.append(f"{paths[-1]} ({f}:{n})")
        out.append(
            existing_records(
                paths, np.asarray(labels, np.int32), where, skip_missing, f"vegfru/{split}"
            )
        )
    return out[0], out[1]


FLOWERS_URL = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"
FLOWERS_SPLITS = {"train": "trnid", "val": "valid", "query": "tstid"}
FLOWERS_SIZES = {"trnid": 1020, "valid": 1020, "tstid": 6149}
FLOWERS_IMAGES = 8189
FLOWERS_CLASSES = 102


def _mat_vector(path: Path, key: str) -> np.ndarray:
    """The 1-D integer array ``key`` of a MATLAB file, or an error naming the file and key."""
    from scipy import io as sio

    try:
        mat = sio.loadmat(path)
    except Exception as e:
        raise DataError(f"{path}: not a readable MATLAB .mat file ({e})") from e
    if key not in mat:
        keys = sorted(k for k in mat if not k.startswith("__"))
        raise DataError(f"{path}: no variable {key!r} (found: {', '.join(keys) or 'none'})")
    arr = np.asarray(mat[key]).ravel()
    if arr.size and not np.issubdtype(arr.dtype, np.number):
        raise DataError(f"{path}: {key} is not numeric")
    return arr.astype(np.int64)


def flowers102_sources(
    manual_dir: str | os.PathLike, *, skip_missing: bool = False, check_sizes: bool = True
) -> dict[str, Source]:
    """Oxford Flowers-102 from its official files: {"train", "val", "query"}.

    ``manual_dir`` holds ``imagelabels.mat``, ``setid.mat`` and ``jpg/image_00001.jpg`` ...
    (or ``102flowers.tgz``, extracted there on first use). train = ``trnid`` (1,020; also the
    database), val = ``valid`` (1,020; the validation queries), query = ``tstid`` (6,149);
    labels 1..102 become 0..101. Each split keeps ``setid.mat``'s order.
    """
    base = Path(manual_dir)
    names = "102flowers.tgz (or its jpg/ folder), imagelabels.mat and setid.mat"
    if not base.is_dir():
        raise DataError(
            f"data.manual_dir={base} does not exist: download {names} from {FLOWERS_URL} "
            "into that folder"
        )
    base = _extracted(base, "jpg", "102flowers.tgz", FLOWERS_URL, "image_00001.jpg")
    base = base.parent
    for f in ("imagelabels.mat", "setid.mat"):
        if not (base / f).is_file():
            raise DataError(f"{base / f} not found: download {f} from {FLOWERS_URL} into {base}")
    labels = _mat_vector(base / "imagelabels.mat", "labels")
    if check_sizes and len(labels) != FLOWERS_IMAGES:
        raise DataError(
            f"{base / 'imagelabels.mat'}: {len(labels)} labels, the data set has "
            f"{FLOWERS_IMAGES} images (set data.allow_size_mismatch=True if intended)"
        )
    if len(labels) and (labels.min() < 1 or labels.max() > FLOWERS_CLASSES):
        raise DataError(
            f"{base / 'imagelabels.mat'}: labels must be 1..{FLOWERS_CLASSES}, found "
            f"{labels.min()}..{labels.max()}"
        )
    out, seen = {}, {}
    for split, key in FLOWERS_SPLITS.items():
        ids = _mat_vector(base / "setid.mat", key)
        if check_sizes and len(ids) != FLOWERS_SIZES[key]:
            raise DataError(
                f"{base / 'setid.mat'}: {key} holds {len(ids)} image ids, documented "
                f"{FLOWERS_SIZES[key]} (set data.allow_size_mismatch=True if intended)"
            )
        bad = ids[(ids < 1) | (ids > len(labels))]
        if bad.size:
            raise DataError(
                f"{base / 'setid.mat'}: {key} has image id {bad[0]} outside 1..{len(labels)}"
            )
        for i in ids:
            if int(i) in seen:
                raise DataError(
                    f"{base / 'setid.mat'}: image id {i} is in both {seen[int(i)]} and {key}"
                )
            seen[int(i)] = key
        paths = [base / "jpg" / f"image_{i:05d}.jpg" for i in ids]
        where = [f"{p} (setid.mat {key})" for p in paths]
        split_labels = (labels[ids - 1] - 1).astype(np.int32)
        out[split] = existing_records(
            paths, split_labels, where, skip_missing, f"flowers102/{split}"
        )
    return out
