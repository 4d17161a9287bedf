"""Search engines over packed binary codes: our exact scan, and faiss's binary indexes.

- ``scan``: XOR + popcount over every code (``csce_jax.metrics.search_topk``); exact, ties in
  index order; no build step. The default, right up to a few million codes.
- ``faiss-flat``: ``faiss.IndexBinaryFlat``, the same exact scan in faiss (same hits, ties in
  index order).
- ``faiss-ivf``: ``faiss.IndexBinaryIVF`` (``nlist`` lists from binary k-means, ``nprobe`` of
  them visited per query): sub-linear, approximate.
- ``faiss-hnsw``: ``faiss.IndexBinaryHNSW`` (a graph of ``M`` links per node, ``ef_search``
  candidates per query): sub-linear, approximate.

faiss takes codes whose length is a multiple of 8 bits: a 12-bit code is stored as 16 bits
whose last 4 are zero in every code, which changes no distance. faiss is optional
(``pip install faiss-cpu``).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from csce_jax.atomic import write_file_atomically
from csce_jax.errors import CodesError

ENGINES = ("scan", "faiss-flat", "faiss-ivf", "faiss-hnsw")
FAISS_INSTALL = "pip install faiss-cpu==1.15.1"


def _faiss():
    try:
        import faiss
    except ImportError:
        raise CodesError(
            f"the faiss engines need faiss, which is not installed: {FAISS_INSTALL}"
        ) from None
    return faiss


def default_params(engine: str, count: int) -> dict[str, int]:
    """Build and search parameters for ``count`` codes (each one can be set by hand)."""
    if engine == "faiss-ivf":
        # About sqrt(N) lists (training stays short), at least 39 training codes per list.
        nlist = max(1, min(int(math.sqrt(count)), count // 39))
        return {"nlist": nlist, "nprobe": min(16, nlist)}
    if engine == "faiss-hnsw":
        return {"M": 16, "ef_construction": 64, "ef_search": 128}
    return {}


def check_engine(engine: str, params: dict[str, int]) -> None:
    if engine not in ENGINES:
        raise CodesError(f"--engine={engine!r}: expected one of {', '.join(ENGINES)}")
    for key, value in params.items():
        if not isinstance(value, int) or value < 1:
            raise CodesError(f"engine parameter {key}={value!r}: expected a positive integer")
    if engine.startswith("faiss"):
        _faiss()


class Engine:
    """Top-k search over one index's packed codes (uint8, (N, ceil(bits / 8)))."""

    def __init__(self, name: str, codes: np.ndarray, bits: int, params: dict[str, int], index):
        self.name, self.codes, self.bits, self.params = name, codes, bits, params
        self._index = index

    def search(self, packed_queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices, distances), each (Q, k'), ordered by (distance, index); k' = min(k, N).
        An approximate engine may find fewer than k' for a query: -1 pads its row."""
        k = min(k, len(self.codes))
        if self.name == "scan":
            return self._index.search(packed_queries, k)
        dist, idx = self._index.search(np.ascontiguousarray(packed_queries, np.uint8), k)
        return idx.astype(np.int64), dist.astype(np.int64)


def _faiss_index(engine: str, codes: np.ndarray, params: dict[str, int]):
    faiss = _faiss()
    dim = 8 * codes.shape[1]  # whole bytes: a 12-bit code is 16 bits, zero-padded
    if engine == "faiss-flat":
        index = faiss.IndexBinaryFlat(dim)
    elif engine == "faiss-ivf":
        # faiss's wrapper keeps the quantizer alive as long as the index (referenced_objects)
        index = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(dim), dim, params["nlist"])
        index.train(codes)
    else:
        index = faiss.IndexBinaryHNSW(dim, params["M"])
        index.hnsw.efConstruction = params["ef_construction"]
    index.add(codes)
    return index


def _set_search_params(engine: str, index, params: dict[str, int]) -> None:
    if engine == "faiss-ivf":
        index.nprobe = params["nprobe"]
    elif engine == "faiss-hnsw":
        index.hnsw.efSearch = params["ef_search"]


def build(
    engine: str, codes: np.ndarray, bits: int, params: dict[str, int], folder: Path
) -> dict[str, Any]:
    """Build ``engine`` over ``codes``; an approximate engine's index is written atomically
    into ``folder``. Returns its record for the index manifest."""
    params = {**default_params(engine, len(codes)), **params}
    check_engine(engine, params)
    record: dict[str, Any] = {"name": engine, "params": params}
    if engine in ("scan", "faiss-flat"):
        return record  # nothing to store: built from the codes when loaded
    start = time.perf_counter()
    index = _faiss_index(engine, codes, params)
    record["build_seconds"] = round(time.perf_counter() - start, 3)
    record["file"] = f"{engine}.faiss"
    data = _faiss().serialize_index_binary(index)
    write_file_atomically(folder / record["file"], lambda f: f.write(data.tobytes()))
    return record


def load(record: dict[str, Any], codes: np.ndarray, bits: int, folder: Path) -> Engine:
    """The engine an index manifest records, over that index's ``codes``."""
    name, params = record["name"], dict(record.get("params", {}))
    check_engine(name, params)
    if name == "scan":
        from csce_jax.metrics import CodeScanner

        return Engine(name, codes, bits, params, CodeScanner(codes, bits))
    if name == "faiss-flat":
        return Engine(name, codes, bits, params, _faiss_index(name, codes, params))
    path = folder / record["file"]
    try:
        index = _faiss().read_index_binary(str(path))
    except RuntimeError as e:
        raise CodesError(f"{path}: not a readable faiss index ({e}); rebuild the index") from None
    if index.ntotal != len(codes) or index.d != 8 * codes.shape[1]:
        raise CodesError(
            f"{path} holds {index.ntotal} codes of {index.d} bits, but the index "
            f"{len(codes)} of {8 * codes.shape[1]}: rebuild the index"
        )
    _set_search_params(name, index, params)
    return Engine(name, codes, bits, params, index)
