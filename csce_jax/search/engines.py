"""Search engines over packed binary codes: our exact scan, and faiss's binary indexes.

- ``scan``: XOR + popcount over every code (``csce_jax.retrieval.metrics.search_topk``); exact, ties in
  index order; no build step. The default, right up to a few million codes.
- ``faiss-flat``: ``faiss.IndexBinaryFlat``, the same exact scan in faiss (same hits, ties in
  index order).
- ``faiss-ivf``: ``faiss.IndexBinaryIVF`` (``nlist`` lists from binary k-means, ``nprobe`` of
  them visited per query): sub-linear, approximate.
- ``faiss-hnsw``: ``faiss.IndexBinaryHNSW`` (a graph of ``M`` links per node, ``ef_search``
  candidates per query): sub-linear, approximate.
- ``milvus``: a Milvus collection (Milvus Lite in the index folder, or a server):
  ``BIN_FLAT`` exact or ``BIN_IVF_FLAT`` approximate (``csce_jax.search.milvus``).

faiss takes codes whose length is a multiple of 8 bits: a 12-bit code is stored as 16 bits
whose last 4 are zero in every code, which changes no distance. faiss is optional
(``pip install faiss-cpu``).
"""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from csce_jax.errors import CodesError
from csce_jax.search import milvus
from csce_jax.utils.atomic import write_file_atomically
from csce_jax.utils.digest import file_digest

ENGINES = ("scan", "faiss-flat", "faiss-ivf", "faiss-hnsw", "milvus")
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
    if engine == "milvus":
        milvus._pymilvus()


class Engine:
    """Top-k search over one index's packed codes (uint8, (N, ceil(bits / 8)))."""

    def __init__(self, name: str, codes: np.ndarray, bits: int, params: dict[str, Any], index):
        self.name, self.codes, self.bits, self.params = name, codes, bits, params
        self._index = index

    def search(
        self, packed_queries: np.ndarray, k: int, among: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(indices, distances), each (Q, k'), ordered by (distance, index); k' = min(k, N).
        An approximate engine may find fewer than k' for a query: -1 pads its row.
        ``among``: search only these index positions (a label filter), exactly."""
        if among is not None:
            return self._search_among(packed_queries, k, among)
        k = min(k, len(self.codes))
        if self.name == "scan":
            return self._index.search(packed_queries, k)
        dist, idx = self._index.search(np.ascontiguousarray(packed_queries, np.uint8), k)
        return idx.astype(np.int64), dist.astype(np.int64)

    def _search_among(self, packed_queries, k, among):
        from csce_jax.retrieval.metrics import search_topk

        if not len(among):
            empty = np.zeros((len(packed_queries), 0), np.int64)
            return empty, empty
        idx, dist = search_topk(packed_queries, self.codes[among], k, bits=self.bits)
        return among[idx].astype(np.int64), dist.astype(np.int64)

    def close(self) -> None:
        """Let go of what the engine holds outside this process (a database connection)."""


class MilvusEngine(Engine):
    """Search through a Milvus collection; its items (image rows) mapped to index positions,
    hits ordered by (distance, index position) as the other engines order them."""

    def __init__(self, codes, bits, record, store: milvus.Store, rows: np.ndarray):
        super().__init__("milvus", codes, bits, record["params"], store)
        self.store, self.rows = store, rows

    def search(self, packed_queries, k, among=None, label: str | None = None):
        k = min(k, len(self.codes))
        items, dists = self.store.search(packed_queries, k, label)
        idx = np.full((len(packed_queries), k), -1, np.int64)
        dist = np.full((len(packed_queries), k), -1, np.int64)
        for q, (i, d) in enumerate(zip(items, dists, strict=True)):
            pos = np.searchsorted(self.rows, i)
            found = (pos < len(self.rows)) & (self.rows[np.minimum(pos, len(self.rows) - 1)] == i)
            order = np.lexsort((pos[found], d[found]))
            n = len(order)
            idx[q, :n], dist[q, :n] = pos[found][order], d[found][order]
        return idx, dist

    def close(self) -> None:
        self.store.close()


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
    if engine == "milvus":
        raise CodesError("the milvus engine is filled by `search index` (index.insert_into_milvus)")
    params = {**default_params(engine, len(codes)), **params}
    check_engine(engine, params)
    record: dict[str, Any] = {"name": engine, "params": params}
    if engine in ("scan", "faiss-flat"):
        return record  # nothing to store: built from the codes when loaded
    start = time.perf_counter()
    index = _faiss_index(engine, codes, params)
    record["build_seconds"] = round(time.perf_counter() - start, 3)
    record["file"] = f"{engine}.faiss"
    data = _faiss().serialize_index_binary(index).tobytes()
    write_file_atomically(folder / record["file"], lambda f: f.write(data))
    record["sha256"] = hashlib.sha256(data).hexdigest()  # checked when loaded
    return record


def load(
    record: dict[str, Any],
    codes: np.ndarray,
    bits: int,
    folder: Path,
    *,
    rows: np.ndarray | None = None,
    plan: str = "",
) -> Engine:
    """The engine an index manifest records, over that index's ``codes`` (``rows``: each
    code's image row, which Milvus keys its items by; ``plan``: the index's plan id)."""
    name, params = record["name"], dict(record.get("params", {}))
    if name == "milvus":
        if rows is None:
            raise CodesError(f"{folder}: its shards carry no image rows: rebuild the index")
        store = milvus.Store(record, folder)
        try:
            store.check_index(plan, len(codes))
        except CodesError:
            store.close()
            raise
        return MilvusEngine(codes, bits, record, store, rows)
    check_engine(name, params)
    if name == "scan":
        from csce_jax.retrieval.metrics import CodeScanner

        return Engine(name, codes, bits, params, CodeScanner(codes, bits))
    if name == "faiss-flat":
        return Engine(name, codes, bits, params, _faiss_index(name, codes, params))
    path = folder / record["file"]
    if not path.is_file():
        raise CodesError(
            f"{path} is missing, but the manifest names the {name} engine: rebuild the index"
        )
    if "sha256" in record and file_digest(path) != record["sha256"]:
        raise CodesError(
            f"{path} does not match the digest recorded in index.json (changed or damaged): "
            "rebuild the index"
        )
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
