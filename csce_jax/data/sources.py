"""Random-access image sources: arrays, DeepHash list files, image folders, tfds, manual layouts.

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
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from csce_jax.data.images import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


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


def _existing(
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
        return _existing(paths, labels, where, skip_missing, name or str(self.path))


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
    return _existing(paths, np.asarray(labels, np.int32), where, skip_missing, str(root)), classes


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


# --- Data sets that tfds does not have: read from a manual directory -------------------------

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
        src = _existing(
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
        out.append(_existing(paths, labels, where, skip_missing, f"nabirds/{split}"))
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
            _existing(paths, np.asarray(labels, np.int32), where, skip_missing, f"vegfru/{split}")
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
        out[split] = _existing(paths, split_labels, where, skip_missing, f"flowers102/{split}")
    return out
