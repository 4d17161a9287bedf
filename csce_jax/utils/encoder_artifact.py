"""The exported encoder's metadata: the format both sides agree on, without JAX or a model.

``csce_jax.convert.artifact`` writes it (into an ONNX file's metadata property
``METADATA_KEY``, or beside a StableHLO file as ``<file>.json``); the search's ONNX encoder
reads it back and checks it here before it trusts the file.
"""

from __future__ import annotations

import json
from typing import Any

from csce_jax.errors import ConversionError

FORMAT = "csce_jax.encoder"
FORMAT_VERSION = 1
METADATA_KEY = "csce_jax"
REQUIRED = ("bits", "centers", "crop", "resize", "outputs", "source", "step")


def parse_metadata(text: str | None, where: str) -> dict[str, Any]:
    """The metadata JSON of the artifact ``where``, checked: ours, this version, whole."""
    if text is None:
        raise ConversionError(f"{where} is not a csce_jax encoder (no '{METADATA_KEY}' metadata)")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError:
        raise ConversionError(f"{where}: its '{METADATA_KEY}' metadata is not JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ConversionError(
            f"{where} is not a csce_jax encoder (metadata format is not {FORMAT})"
        )
    if meta.get("version") != FORMAT_VERSION:
        raise ConversionError(
            f"{where}: encoder format version {meta.get('version')!r}, this csce_jax reads "
            f"{FORMAT_VERSION}: export it again"
        )
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise ConversionError(f"{where}: its metadata lacks {', '.join(missing)}: export it again")
    return meta
