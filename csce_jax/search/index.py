"""The index folder: shards of packed codes written by every host, a manifest, an engine.

  <index>/plan.json        what is being encoded (checkpoint, bits, centres, collection, shards)
  <index>/shards/NNNNN.npz packed codes, paths, labels and unreadable images of one shard
  <index>/index.json       the manifest, written last: the index is complete when it exists;
                           it records the SHA-256 of every shard and engine file and its own,
                           all checked whenever the index is loaded
  <index>/<engine>.faiss   an approximate engine's own index (faiss-ivf, faiss-hnsw)
  <index>/milvus.db        the milvus engine's Milvus Lite file (or a collection on a server),
                           with shards/NNNNN.milvus.json marking each shard inserted

The collection is cut into shards of ``shard_size`` images in index order; with several
processes (``--config.distributed=True``), shard j is encoded by process j mod P on its own
devices. Every file is written atomically, so an interrupted build resumes where it stopped:
a shard already written for the same plan is kept. Process 0 writes the manifest and builds
the engine once every shard is there. A folder that holds another plan is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np

from csce_jax.errors import CodesError
from csce_jax.retrieval.metrics import pack_codes
from csce_jax.search import engines, milvus
from csce_jax.search.collection import Collection
from csce_jax.utils.atomic import write_file_atomically, write_json_atomically
from csce_jax.utils.digest import file_digest, json_digest
from csce_jax.utils.progress import Progress

INDEX_VERSION = 3
DEFAULT_SHARD_SIZE = 50_000
PLAN_KEYS = ("bits", "centers", "workdir", "step", "encoder", "collection", "count", "shard_size")
MANIFEST_KEYS = ("bits", "centers", "workdir", "step", "shard_size")  # and "encoder", if any


class CodeEncoder(Protocol):
    """What an index is built with: a run's checkpoint (``search.encoder.RunEncoder``) or an
    exported ONNX encoder (``search.onnx_encoder.OnnxEncoder``)."""

    meta: dict[str, Any]  # bits, centers, workdir, step[, encoder]: recorded in the index
    resize: int  # the shorter side images are resized to

    def encode(self, source: Any, progress: Any = None) -> dict[str, Any]: ...

    def encode_one(self, image: str | bytes, name: str = "query") -> np.ndarray: ...

    def check_index(self, meta: dict[str, Any], where: str) -> None: ...


def _log(message: str) -> None:
    prefix = f"[process {jax.process_index()}] " if jax.process_count() > 1 else ""
    print(f"{prefix}{message}", file=sys.stderr, flush=True)


def _progress(what: str, total: int) -> Progress:
    """A progress line of this process's images, every 10 s (each process of a job its own)."""
    prefix = f"[process {jax.process_index()}] " if jax.process_count() > 1 else ""
    return Progress(what, total, every=10.0, prefix=prefix)


def _shard_path(folder: Path, j: int) -> Path:
    return folder / "shards" / f"{j:05d}.npz"


def _read_shard(path: Path, plan_id: str, *, building: bool = True) -> dict[str, Any] | None:
    """A finished shard of this plan, or None (absent, another plan's, unreadable). Read
    whole, so that a damaged shard is encoded again rather than kept (``building``; a query
    only reports it)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["plan"]) != plan_id:
                return None
            shard = {k: z[k] for k in ("codes", "paths", "labels", "skipped")}
            shard["rows"] = z["rows"] if "rows" in z.files else None
            return shard
    except FileNotFoundError:
        return None
    except Exception as e:
        then = "it is encoded again" if building else "rebuild the index"
        _log(f"warning: {path} is unreadable ({type(e).__name__}); {then}")
        return None


def _encode_shard(
    enc: CodeEncoder,
    coll: Collection,
    rows: range,
    path: Path,
    plan_id: str,
    progress: Progress,
    done_before: int,
) -> int:
    sub = coll.source.subset(np.arange(rows.start, rows.stop), f"shard {path.stem}")
    out = enc.encode(sub, progress=lambda n: progress.update(done_before + n))
    kept = rows.start + out["index"]
    arrays = {
        "codes": pack_codes(out["codes"]),
        "paths": np.asarray([coll.paths[i] for i in kept], dtype=str),
        "labels": np.asarray([coll.labels[i] for i in kept], dtype=str),
        "skipped": np.asarray(sorted(out.get("skipped", [])), dtype=str),
        "rows": np.asarray(kept, np.int64),  # each code's image row (Milvus's primary key)
        "plan": np.asarray(plan_id),
    }
    write_file_atomically(path, lambda f: np.savez(f, **arrays))  # unreadable ones: logged
    return len(rows)


def _start_plan(folder: Path, plan: dict[str, Any]) -> str:
    """The plan's id; the folder is refused when it holds another plan."""
    plan_id = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]
    path = folder / "plan.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            old = {}
        if old.get("id") != plan_id:
            differ = [k for k in PLAN_KEYS if old.get(k) != plan.get(k)] or ["its plan"]
            raise CodesError(
                f"{folder} holds (part of) another index ({', '.join(differ)} differ): remove "
                "it or choose another --out"
            )
    elif jax.process_index() == 0:
        write_json_atomically(path, {**plan, "id": plan_id})
    (folder / "shards").mkdir(parents=True, exist_ok=True)
    return plan_id


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def encode_shards(enc: CodeEncoder, coll: Collection, folder: Path, shard_size: int) -> str:
    """Encode this process's shards of ``coll`` into ``folder`` (those not already there)."""
    if shard_size < 1:
        raise CodesError(f"--shard_size={shard_size}: expected a positive number of images")
    count = len(coll.paths)
    plan = {
        **enc.meta,
        "collection": coll.fingerprint(),
        "described": coll.described,
        "count": count,
        "shard_size": shard_size,
    }
    plan_id = _start_plan(folder, plan)
    shards = [range(s, min(s + shard_size, count)) for s in range(0, count, shard_size)]
    mine = [j for j in range(len(shards)) if j % jax.process_count() == jax.process_index()]
    todo = [j for j in mine if _read_shard(_shard_path(folder, j), plan_id) is None]
    if len(todo) < len(mine):
        _log(f"index: {len(mine) - len(todo)} of this process's {len(mine)} shards done earlier")
    progress = _progress("index", sum(len(shards[j]) for j in todo))
    done = 0
    for j in todo:
        done += _encode_shard(enc, coll, shards[j], _shard_path(folder, j), plan_id, progress, done)
        progress.update(done, force=True)
    _barrier("csce_jax.search.index.shards")
    return plan_id


def insert_into_milvus(store: milvus.Store, folder: Path, plan_id: str) -> None:
    """Put the shards in the index's Milvus collection: every process its own shards on a
    server; process 0 all of them in a Milvus Lite file (one process opens it at a time).
    Shards already marked as inserted are skipped."""
    plan = json.loads((folder / "plan.json").read_text())
    server = milvus.is_server(store.record["uri"])  # else only process 0 gets here
    if jax.process_index() == 0:
        store.ensure(plan, plan_id, plan["bits"])
    if server:
        _barrier("csce_jax.search.milvus.collection")
    n = -(-plan["count"] // plan["shard_size"])
    if server:
        mine = [j for j in range(n) if j % jax.process_count() == jax.process_index()]
    else:
        mine = list(range(n)) if jax.process_index() == 0 else []
    todo = [
        j
        for j in mine
        if milvus.read_marker(milvus.marker_path(_shard_path(folder, j)), plan_id, store.collection)
        is None
    ]
    if len(todo) < len(mine):
        _log(
            f"milvus: {len(mine) - len(todo)} of this process's {len(mine)} shards inserted earlier"
        )
    shards = {j: _read_shard(_shard_path(folder, j), plan_id) for j in todo}
    progress = _progress("milvus", sum(len(x["codes"]) for x in shards.values() if x))
    done = 0
    for j, shard in shards.items():
        if shard is None or shard["rows"] is None:
            raise CodesError(f"{_shard_path(folder, j)} is missing: run the same command again")
        marker = milvus.marker_path(_shard_path(folder, j))
        done += store.insert_shard(
            shard, marker, plan_id, progress=lambda m, d=done: progress.update(d + m)
        )
        progress.update(done, force=True)
    if server:
        _barrier("csce_jax.search.milvus.inserted")


def _milvus_record(store: milvus.Store, folder: Path, plan_id: str, count: int, n: int) -> dict:
    """The manifest's engine record: the collection, and which shards are in it (all)."""
    inserted = []
    for j in range(n):
        marker = milvus.marker_path(_shard_path(folder, j))
        if milvus.read_marker(marker, plan_id, store.collection) is None:
            raise CodesError(f"{marker} is missing: run the same command again")
        inserted.append(marker.name)
    store.flush()  # once, at the end of the build: searching never flushes
    got = store.count()
    if got != count:
        raise CodesError(
            f"Milvus at {store.where}: collection {store.collection} holds {got} codes but the "
            f"shards {count}: run the same command again"
        )
    return {**store.record, "shards_in_collection": inserted}


def finish_index(
    folder: Path,
    plan_id: str,
    engine: str,
    params: dict[str, int],
    store: milvus.Store | None = None,
) -> dict:
    """Gather the shards into the manifest and build the engine (process 0)."""
    plan = json.loads((folder / "plan.json").read_text())
    n = -(-plan["count"] // plan["shard_size"])
    parts = []
    for j in range(n):
        shard = _read_shard(_shard_path(folder, j), plan_id)
        if shard is None:
            raise CodesError(f"{_shard_path(folder, j)} is missing: run the same command again")
        parts.append(shard)
    codes = np.concatenate([p["codes"] for p in parts])
    if not len(codes):
        raise CodesError(f"{folder}: no image of the collection could be read")
    if store is not None:
        record = _milvus_record(store, folder, plan_id, len(codes), n)
    else:
        record = engines.build(engine, codes, plan["bits"], params, folder)
    manifest = {
        "version": INDEX_VERSION,
        **{k: plan[k] for k in MANIFEST_KEYS},
        **({"encoder": plan["encoder"]} if "encoder" in plan else {}),
        "collection": {"described": plan.get("described", ""), "fingerprint": plan["collection"]},
        "count": len(codes),
        "skipped": [str(s) for p in parts for s in p["skipped"]],
        "shards": [
            {
                "file": _shard_path(folder, j).name,
                "count": len(p["codes"]),
                "sha256": file_digest(_shard_path(folder, j)),
            }
            for j, p in enumerate(parts)
        ],
        "engine": record,
        "plan": plan_id,
    }
    manifest["digest"] = json_digest(manifest)  # checked by load_index, as the files' are
    write_json_atomically(folder / "index.json", manifest)
    return manifest


@dataclasses.dataclass
class Index:
    """A loaded index: packed codes (uint8 (N, ceil(bits / 8))), paths and labels in index
    order, the manifest, and the folder it came from."""

    codes: np.ndarray
    paths: list[str]
    labels: list[str]
    meta: dict[str, Any]
    folder: Path
    rows: np.ndarray | None = None  # each code's image row (None: an index made before rows)

    def engine(self) -> engines.Engine:
        return engines.load(
            self.meta["engine"],
            self.codes,
            self.meta["bits"],
            self.folder,
            rows=self.rows,
            plan=self.meta.get("plan", ""),
        )


def _check_codes(where: Path, codes: np.ndarray, bits: Any, count: int) -> None:
    if not isinstance(bits, int) or bits < 1:
        raise CodesError(f"{where}: bad code length {bits!r} in its record")
    if codes.dtype != np.uint8 or codes.ndim != 2 or codes.shape[1] != -(-bits // 8):
        raise CodesError(
            f"{where}: codes of shape {codes.shape} and dtype {codes.dtype} do not hold "
            f"{bits}-bit codes packed into uint8 ({-(-bits // 8)} bytes each)"
        )
    if count != len(codes):
        raise CodesError(f"{where}: {len(codes)} codes but {count} paths")


def _check_digests(path: Path, meta: dict[str, Any]) -> None:
    """The manifest and every shard against the digests recorded when they were written
    (the engine's file is checked by ``engines.load``). An index built before digests were
    recorded is read with a warning."""
    if "digest" not in meta:
        _log(f"warning: {path} records no digests (an older index): rebuild it to have them")
        return
    if json_digest(meta) != meta["digest"]:
        raise CodesError(
            f"{path / 'index.json'} does not match its own digest (edited or damaged): "
            "rebuild the index"
        )
    for shard in meta["shards"]:
        file = path / "shards" / shard["file"]
        if not file.is_file():
            raise CodesError(f"{file} is missing: rebuild the index")
        if file_digest(file) != shard.get("sha256"):
            raise CodesError(
                f"{file} does not match the digest recorded in index.json (changed, damaged "
                "or replaced): rebuild the index"
            )


def load_index(path: str | os.PathLike) -> Index:
    """An index folder, checked for consistency (its manifest, shards and digests)."""
    path = Path(path)
    if path.is_file():
        raise CodesError(f"{path} is a file, not an index folder (one holding index.json)")
    manifest = path / "index.json"
    if not manifest.is_file():
        if (path / "plan.json").is_file():
            raise CodesError(f"{path}: an unfinished index; run its `search index` again")
        raise CodesError(f"index not found: {path}")
    try:
        meta = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CodesError(f"{manifest} is not a csce_jax index manifest: {e}") from None
    if meta.get("version") != INDEX_VERSION:
        raise CodesError(f"{path}: index version {meta.get('version')}, expected {INDEX_VERSION}")
    _check_digests(path, meta)
    parts = []
    for shard in meta["shards"]:
        got = _read_shard(path / "shards" / shard["file"], meta["plan"], building=False)
        if got is None or len(got["codes"]) != shard["count"]:
            raise CodesError(f"{path / 'shards' / shard['file']}: missing or not this index's")
        parts.append(got)
    codes = np.concatenate([p["codes"] for p in parts])
    paths = [str(x) for p in parts for x in p["paths"]]
    labels = [str(x) for p in parts for x in p["labels"]]
    rows = None
    if all(p["rows"] is not None for p in parts):
        rows = np.concatenate([p["rows"] for p in parts]).astype(np.int64)
    _check_codes(path, codes, meta.get("bits"), len(paths))
    if len(codes) != meta["count"]:
        raise CodesError(f"{manifest}: records {meta['count']} codes, its shards {len(codes)}")
    return Index(codes, paths, labels, meta, path, rows)
