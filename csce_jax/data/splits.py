"""Write and check split lists: ``python -m csce_jax.data.splits --dataset NAME --out DIR``.

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
from absl import app, flags

from csce_jax import cli
from csce_jax.atomic import write_text_atomically
from csce_jax.config import data_config
from csce_jax.data.datasets import DATASETS, load_data
from csce_jax.data.sources import Source


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


def main(argv):
    del argv
    cfg = data_config(FLAGS.dataset)
    for key in ("data_dir", "manual_dir", "list_dir", "image_root"):
        if getattr(FLAGS, key):
            setattr(cfg, key, getattr(FLAGS, key))
    cfg.allow_size_mismatch = FLAGS.allow_size_mismatch
    for fname, (count, digest) in cli.error_boundary(write_lists, cfg, FLAGS.out).items():
        print(f"{fname:14s} {count:8d}  sha256 {digest}")


FLAGS = flags.FLAGS


def run() -> None:
    """The command line (console script and ``python -m``)."""
    flags.DEFINE_enum("dataset", "digits", sorted(DATASETS), "data set name")
    flags.DEFINE_string("out", None, "output folder", required=True)
    flags.DEFINE_string("data_dir", "", "tfds data_dir")
    flags.DEFINE_string("manual_dir", "", "manual directory (aircraft, nabirds, vegfru)")
    flags.DEFINE_string("list_dir", "", "folder with the DeepHash list files")
    flags.DEFINE_string("image_root", "", "image root for list files or an image folder")
    flags.DEFINE_bool("allow_size_mismatch", False, "accept split sizes that differ")
    app.run(main)


if __name__ == "__main__":
    run()
