"""Write and check split lists: ``csce-splits --dataset NAME --out DIR``.

Writes ``train.txt``, ``database.txt``, ``test.txt`` (DeepHash format: ``name v1 v2 ...`` with a
one-/multi-hot label vector) and ``val.txt`` (the validation hold-out) for a data set, built
reproducibly from its source, and prints each file's count and SHA-256. Sizes are checked against
the documented ones (CUB 5,994 / 5,794, Aircraft 6,667 / 3,333, ...) before anything is written;
``--allow_size_mismatch`` overrides.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from csce_jax.data.base import Source
from csce_jax.data.datasets import load_data
from csce_jax.utils.atomic import write_text_atomically


def list_lines(source: Source, num_classes: int, root: str | None = None) -> list[str]:
    """DeepHash lines for a source; names relative to ``root`` when they lie under it."""
    lines = []
    for i in range(len(source)):
        image = source.images[i]
        name = image if isinstance(image, str) else source.where[i]
        if root and isinstance(image, str):
            name = os.path.relpath(image, root)
        label = np.asarray(source.labels[i])
        vec = label if label.ndim else np.eye(num_classes, dtype=np.int8)[int(label)]
        lines.append(name + " " + " ".join(str(int(v)) for v in vec))
    return lines


def write_lists(cfg, out_dir: str | os.PathLike) -> dict[str, tuple[int, str]]:
    """Write the list files; returns {file: (count, sha256)}."""
    data = load_data(cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    root = cfg.image_root or cfg.manual_dir or None
    result = {}
    parts = {
        "train.txt": data.train,
        "database.txt": data.database,
        "test.txt": data.query,
    }
    if data.val is not None:
        parts["val.txt"] = data.val
    for fname, src in parts.items():
        text = "\n".join(list_lines(src, data.num_classes, root)) + "\n"
        write_text_atomically(out_dir / fname, text)
        result[fname] = (len(src), hashlib.sha256(text.encode()).hexdigest())
    return result
