"""Hash a collection and search it by image: from a folder of photographs to millions of codes.

  csce-search index --workdir runs/x --images photos/ --out photos.idx
  csce-search index --workdir runs/x --list db.txt --image_root images/ --out db.idx
  csce-search index --workdir runs/x --prepared records/ --split database --out db.idx
  csce-search index ... --engine faiss-ivf        (or faiss-flat, faiss-hnsw)
  csce-search index ... --config.distributed=True (every host encodes its shards)
  csce-search query --index photos.idx query.jpg [-k 10] [--picture hits.png]
  csce-search query --index photos.idx --images queries/ --out hits.json
  csce-search serve --index photos.idx [--port 8000]
  csce-search index --encoder model.onnx --images photos/ --out photos.idx  (no run needed)

An index is a folder: shards of packed codes with the images' absolute paths and labels, the
checkpoint that made them (run folder, step, bits, the hash centres' fingerprint), and the
search engine built over them (our exact scan by default; faiss's flat, IVF or HNSW binary
indexes with faiss-cpu installed). An interrupted ``index`` resumes; queries are encoded with
the same checkpoint (``--workdir`` if the run moved; ``--config`` to use another config file
than the run's ``config.json``), and an index whose bits or centres no longer match it is
refused. ``--encoder`` takes an exported ONNX encoder (csce-convert export --format onnx) in
place of the run: same codes, no checkpoint and no model code. Unreadable images are reported
by name and left out. The run is only read.
"""

from __future__ import annotations

from typing import Any

__all__ = ["INDEX_VERSION", "Index", "Searcher", "build_index", "load_index", "search"]

_WHERE = {
    "INDEX_VERSION": "index",
    "Index": "index",
    "load_index": "index",
    "build_index": "build",
    "Searcher": "queries",
    "search": "queries",
}


def __getattr__(name: str) -> Any:
    """The public names, imported on first use (``--help`` does not start JAX)."""
    if name not in _WHERE:
        raise AttributeError(f"module 'csce_jax.search' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"csce_jax.search.{_WHERE[name]}"), name)
