"""An exported ONNX encoder (``csce-convert export --format onnx``) in place of a run folder:
images -> {-1,+1} codes through onnxruntime, with no checkpoint and no model code.

The images are prepared as our evaluation loader prepares them (decode, RGB, shorter side
resized, centre crop: ``data.images``), so an index built with the artifact holds the codes
the run gives, bit for bit (the export checked the artifact against the model). onnxruntime
runs on the CPU, where that parity was checked.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from csce_jax.data.base import Source
from csce_jax.data.images import DataError, center_crop
from csce_jax.data.pipeline import CorruptImages, ViewConfig, resized_image
from csce_jax.errors import CodesError, ConversionError
from csce_jax.utils.digest import file_digest
from csce_jax.utils.encoder_artifact import METADATA_KEY, parse_metadata

BATCH = 64
ONNXRUNTIME_INSTALL = "pip install onnxruntime"


def open_session(path: Path) -> tuple[Any, dict[str, Any]]:
    """(onnxruntime session on the CPU, checked metadata) of an exported encoder file."""
    try:
        import onnxruntime
    except ImportError:
        raise ConversionError(
            f"--encoder {path}: running an ONNX encoder needs onnxruntime: {ONNXRUNTIME_INSTALL}"
        ) from None
    if not path.is_file():
        raise ConversionError(f"encoder not found: {path}")
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception:
        raise ConversionError(
            f"cannot load {path}: not a whole ONNX file (truncated or damaged)"
        ) from None
    meta = parse_metadata(session.get_modelmeta().custom_metadata_map.get(METADATA_KEY), str(path))
    _check_graph(session, meta, path)
    return session, meta


def _check_graph(session: Any, meta: dict[str, Any], path: Path) -> None:
    """The graph takes and gives what its metadata says (an edited file is refused)."""
    (given,) = session.get_inputs()
    crop = meta["crop"]
    if given.name != "images" or list(given.shape[1:]) != [crop, crop, 3]:
        raise ConversionError(
            f"{path}: its input is {given.name} {given.shape}, its metadata says images "
            f"(N, {crop}, {crop}, 3)"
        )
    outputs = {o.name: o.shape for o in session.get_outputs()}
    if "codes" not in outputs or outputs["codes"][1:] != [meta["bits"]]:
        raise ConversionError(
            f"{path}: its codes output is {outputs.get('codes')}, its metadata says "
            f"{meta['bits']} bits"
        )


class OnnxEncoder:
    """Images -> {-1,+1} codes with an exported ONNX encoder; the interface of
    :class:`csce_jax.search.encoder.RunEncoder` (``meta``, ``resize``, ``encode``,
    ``encode_one``, ``check_index``)."""

    def __init__(self, path: str | os.PathLike, *, sha256: str | None = None):
        self.path = Path(path).absolute()
        self._session, self.artifact = open_session(self.path)
        digest = file_digest(self.path)
        if sha256 is not None and digest != sha256:
            raise CodesError(
                f"{self.path} changed since the index was built with it (its SHA-256 differs): "
                "give the encoder the index was built with (--encoder), or rebuild the index"
            )
        a = self.artifact
        self.resize, self.crop = int(a["resize"]), int(a["crop"])
        self._view = ViewConfig(self.resize, self.crop, flip=False)
        self.meta: dict[str, Any] = {
            "bits": int(a["bits"]),
            "centers": a["centers"],
            "workdir": a["source"],  # the run (or weights file) it was exported from
            "step": a["step"],
            "encoder": {"file": str(self.path), "sha256": digest},
        }

    def _image(self, source: Source, i: int, corrupt: CorruptImages) -> np.ndarray | None:
        try:
            return np.ascontiguousarray(
                center_crop(resized_image(source, i, self._view), self.crop)
            )
        except DataError as e:
            corrupt.add(str(source.where[i]), str(e))
            return None

    def encode(
        self, source: Source, progress: Callable[[int], None] | None = None
    ) -> dict[str, Any]:
        """{"codes" (int8 {-1,+1}), "index" (records kept, in order)[, "skipped"]}: every
        readable image of ``source``, decoded by a thread each core, BATCH at a time."""
        corrupt = CorruptImages()
        codes, index = [], []
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            for start in range(0, len(source), BATCH):
                rows = range(start, min(start + BATCH, len(source)))
                views = list(pool.map(lambda i: self._image(source, i, corrupt), rows))
                kept = [i for i, v in zip(rows, views, strict=True) if v is not None]
                if kept:
                    batch = np.stack([v for v in views if v is not None])
                    codes.append(self._session.run(["codes"], {"images": batch})[0])
                    index.append(np.asarray(kept, np.int64))
                if progress is not None:
                    progress(rows.stop)
        bits = self.meta["bits"]
        out: dict[str, Any] = {
            "codes": np.concatenate(codes) if codes else np.zeros((0, bits), np.int8),
            "index": np.concatenate(index) if index else np.zeros(0, np.int64),
        }
        if corrupt.count:
            out["skipped"] = corrupt.names
        return out

    def encode_one(self, image: str | bytes, name: str = "query") -> np.ndarray:
        """The code of one image file or encoded image (bytes), as a (1, bits) array."""
        out = self.encode(Source([image], np.zeros(1, np.int32), [name], "query"))
        if out.get("skipped"):
            raise CodesError(f"cannot read the query image {name}")
        return out["codes"]

    def check_index(self, meta: dict[str, Any], where: str) -> None:
        """Refuse an index whose codes this encoder does not give: other bits or centres, or
        another checkpoint of the same run."""
        mine = self.meta
        if mine["bits"] != meta["bits"] or mine["centers"] != meta["centers"]:
            raise CodesError(
                f"{where} holds {meta['bits']}-bit codes under centres {meta['centers']}, but "
                f"the encoder {self.path} gives {mine['bits']}-bit codes under centres "
                f"{mine['centers']}: use the encoder or run the index was built with"
            )
        if None not in (meta["step"], mine["step"]) and meta["step"] != mine["step"]:
            raise CodesError(
                f"{where} was built with step {meta['step']}, but the encoder {self.path} is "
                f"step {mine['step']}: export step {meta['step']} (--step), or rebuild the index"
            )
