"""Prepared record sets: each split's decoded, resized images stored once, read at memory speed.

The deterministic part of every view (decode, banner trim, RGB, shorter side to ``data.resize``:
:func:`csce_jax.data.images.resized_rgb`) is computed once per image by
``csce-prepare`` and stored in ArrayRecord shards (grain's random-access
format, one record per image, no grouping, uncompressed). Training then only crops and flips,
and evaluation only centre-crops: the same pixels as from the image files.

A record set is a folder:

- ``<split>-00000-of-00008.array_record``: the records of one base split (``train``, ``query``,
  and ``database`` / ``val`` where they are not part of the training split). A record is
  ``MAGIC``, fixed fields (height, width, channels, kind: raw, jpeg or unreadable), a JSON
  header (``label``, ``path`` and, for an image that could not be read at preparation time,
  ``error``), then the pixels (raw uint8, or a JPEG with ``--format jpeg``). Each shard has a ``.json`` sidecar with its
  record count, byte size and SHA-256, written after the shard itself is complete.
- ``<split>.npz``: every record's label and name (read without touching the shards).
- ``views.npz``: the index arrays of subsets (the fit and validation parts of ``train``).
- ``manifest.json``, written last: the settings it was made with (compared with the config
  that reads it), the data set's class count, label kind and cut-off, and each split's shards.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from csce_jax.errors import DataError

MAGIC = b"CSR1"
MANIFEST = "manifest.json"
VIEWS_FILE = "views.npz"
FORMAT_VERSION = 1
WRITER_OPTIONS = "group_size:1,uncompressed"
READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"
# Data settings that change the stored pixels or the splits: a record set is read only by a
# config that agrees on each of them.
SETTINGS = (
    "name",
    "resize",
    "keep_banner",
    "jpeg_draft",
    "split_seed",
    "val_fraction",
    "query_fraction",
    "multilabel",
)


def settings_of(data_cfg: Any) -> dict[str, Any]:
    """The settings a record set records from (and checks against) a ``data`` block."""
    return {k: data_cfg.get(k) for k in SETTINGS}


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.array_record"


_FIXED = struct.Struct("<IIIBI")  # height, width, channels, kind, header length
_KINDS = {"raw": 0, "jpeg": 1, "error": 2}


def encode_record(
    image: np.ndarray | None,
    label: Any,
    path: str,
    *,
    image_format: str = "raw",
    jpeg_quality: int = 95,
    error: str | None = None,
) -> bytes:
    """One record: ``MAGIC``, the fixed fields (shape and kind, read without parsing JSON), a
    JSON header (label, path[, error]) and the image's bytes."""
    header: dict[str, Any] = {"path": path, "label": np.asarray(label).tolist()}
    payload, shape, kind = b"", (0, 0, 0), _KINDS["error"]
    if error is not None:
        header["error"] = error
    else:
        shape, kind = image.shape, _KINDS[image_format]
        if image_format == "jpeg":
            import io

            from PIL import Image

            buf = io.BytesIO()
            Image.fromarray(image).save(buf, "JPEG", quality=jpeg_quality, subsampling=0)
            payload = buf.getvalue()
        else:
            payload = np.ascontiguousarray(image, np.uint8).tobytes()
    head = json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + _FIXED.pack(*shape, kind, len(head)) + head + payload


def record_header(record: bytes) -> dict[str, Any]:
    """The JSON header of a record: path, label and, for an unreadable image, error."""
    n = _FIXED.unpack_from(record, 4)[4]
    start = 4 + _FIXED.size
    return json.loads(record[start : start + n])


def decode_record(record: bytes, owner: Any = "", index: int = -1) -> np.ndarray:
    """The record's uint8 image: a read-only view of ``record`` (raw) or decoded (JPEG). A
    malformed record is a DataError naming ``owner`` (a :class:`RecordImages`: its shard) and
    ``index``; an image that was unreadable when the set was prepared one naming that image."""
    try:
        if record[:4] != MAGIC:
            raise ValueError("not a csce_jax record")
        h, w, c, kind, n = _FIXED.unpack_from(record, 4)
        start = 4 + _FIXED.size + n
        if kind == _KINDS["error"]:
            error = record_header(record)["error"]
        elif kind == _KINDS["jpeg"]:
            import io

            from PIL import Image

            image = np.asarray(Image.open(io.BytesIO(memoryview(record)[start:])).convert("RGB"))
            error = None
        else:
            image = np.frombuffer(record, np.uint8, count=h * w * c, offset=start)
            image, error = image.reshape(h, w, c), None
    except Exception as e:
        raise DataError(f"{_where(owner, index)}: corrupt record ({type(e).__name__}: {e})") from e
    if error is not None:
        raise DataError(f"unreadable when the record set was prepared: {error}")
    if image.shape != (h, w, c):
        raise DataError(
            f"{_where(owner, index)}: corrupt record (image {image.shape}, header {(h, w, c)})"
        )
    return image


def _where(owner: Any, index: int) -> str:
    if isinstance(owner, RecordImages):
        return owner.name_of(index)
    return str(owner)


class RecordImages(Sequence):
    """The images of one prepared split, by index: decoded, resized uint8 arrays (H, W, 3).

    Readers open lazily in each process (the object pickles as its shard list, so decoding
    worker processes open their own). An image that could not be read when the set was
    prepared raises a DataError naming it (skipped with ``data.skip_corrupt``).
    """

    def __init__(self, shards: list[Path], counts: list[int]):
        self.shards, self.counts = [Path(s) for s in shards], list(counts)
        self._starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self._readers: dict[int, Any] = {}

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _reader(self, s: int):
        reader = self._readers.get(s)
        if reader is None:
            from array_record.python.array_record_module import ArrayRecordReader

            try:
                reader = ArrayRecordReader(str(self.shards[s]), READER_OPTIONS)
            except Exception as e:
                raise DataError(f"{self.shards[s]}: cannot open the shard ({e})") from e
            self._readers[s] = reader
        return reader

    def name_of(self, i: int) -> str:
        """ "<shard> record <k>" for record ``i`` (for error messages)."""
        s = int(np.searchsorted(self._starts, int(i), side="right")) - 1
        return f"{self.shards[s]} record {int(i) - int(self._starts[s])}"

    def record(self, i: int) -> bytes:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(i)
        s = int(np.searchsorted(self._starts, i, side="right")) - 1
        try:
            return self._reader(s).read([i - int(self._starts[s])])[0]
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"{self.shards[s]}: cannot read record {i} ({e})") from e

    def __getitem__(self, i):
        return decode_record(self.record(i), self, i)

    def __getstate__(self) -> dict[str, Any]:
        return {"shards": self.shards, "counts": self.counts}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["shards"], state["counts"])


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a finished record set, or an error saying what is missing."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise DataError(
            f"data.prepared={folder}: no {MANIFEST} (not a record set, or its preparation did "
            "not finish: rerun `csce-prepare` with the same --out)"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    if manifest.get("version") != FORMAT_VERSION:
        raise DataError(f"{path}: record set format {manifest.get('version')!r}, expected 1")
    return manifest


def check_settings(manifest: dict[str, Any], data_cfg: Any, folder: str) -> None:
    """Refuse a record set whose settings differ from the config's, naming the first."""
    made, want = manifest["settings"], settings_of(data_cfg)
    for key in SETTINGS:
        if made.get(key) != want.get(key):
            raise DataError(
                f"data.prepared={folder} was prepared with data.{key}={made.get(key)!r}, but "
                f"the config has data.{key}={want.get(key)!r}: prepare it again with this "
                "config, or set the same value"
            )


def _shards(folder: Path, split: str, entry: dict[str, Any]) -> RecordImages:
    paths, counts = [], []
    for shard in entry["shards"]:
        path = folder / shard["file"]
        if not path.is_file():
            raise DataError(f"{path}: shard missing from the record set")
        size = path.stat().st_size
        if size != shard["bytes"]:
            raise DataError(
                f"{path}: {size} bytes, the manifest records {shard['bytes']} (truncated or "
                "corrupt: prepare the record set again)"
            )
        paths.append(path)
        counts.append(shard["count"])
    return RecordImages(paths, counts)


def load_prepared(data_cfg: Any) -> dict[str, Any]:
    """The fields of a record set's ``RetrievalData`` (``data.prepared``: name, class count,
    label kind, cut-off and the five views as sources), checked against the config's data
    settings; no image file is read."""
    from csce_jax.data.base import Source

    folder = Path(data_cfg.prepared)
    manifest = read_manifest(folder)
    check_settings(manifest, data_cfg, str(folder))
    base: dict[str, Source] = {}
    for split, entry in manifest["splits"].items():
        meta = np.load(folder / entry["labels"], allow_pickle=False)
        images = _shards(folder, split, entry)
        if len(images) != len(meta["labels"]):
            raise DataError(
                f"{folder}: {split} has {len(images)} records but {len(meta['labels'])} labels"
            )
        base[split] = Source(
            images,
            meta["labels"],
            [str(w) for w in meta["where"]],
            f"prepared:{split}",
            prepared=True,
        )
    index = np.load(folder / VIEWS_FILE, allow_pickle=False)

    def view(name: str) -> Source | None:
        spec = manifest["views"][name]
        if spec is None:
            return None
        src = base[spec["source"]]
        return src.subset(index[name], f"{src.name}:{name}") if spec["subset"] else src

    topk = (
        manifest["topk"] if data_cfg.topk == 0 else (None if data_cfg.topk < 0 else data_cfg.topk)
    )
    return {
        "name": manifest["settings"]["name"],
        "num_classes": manifest["num_classes"],
        "multilabel": manifest["multilabel"],
        "topk": topk,
        **{v: view(v) for v in ("train", "fit", "val", "database", "query")},
    }
