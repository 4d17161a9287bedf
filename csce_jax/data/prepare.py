r"""Write a data set's decoded, resized images once as ArrayRecord shards.

  csce-prepare --config configs/flowers102.py \
      --config.data.manual_dir=/data/flowers102 --out /data/flowers102_r128

Then train (or evaluate) from them with ``--config.data.prepared=/data/flowers102_r128``: the
same batches, pixel for pixel, as from the image files, without decoding a JPEG per step.

Each split's records are stored exactly as the image-file path computes them before cropping
(decode, banner trim, RGB, shorter side to ``data.resize``; ``csce_jax.data.records``). Shards
are written in ``--workers`` processes, each atomically (a temporary file, renamed when whole,
then its sidecar); a rerun after a kill keeps every finished shard and writes the rest, to the
same bytes. A write that fails (a full disk, a quota) stops the command with one line naming
the shard and the system's words, and leaves no partial file. An unreadable image is reported by name; the shard holding it is not written
unless ``data.skip_corrupt`` is set (then the record marks it unreadable and readers skip it,
as they do for image files). ``manifest.json`` is written last: a folder without it is not a
record set. ``--format jpeg`` stores each resized image as a JPEG (``--jpeg_quality``):
smaller on disk, slower to read, and the pixels are no longer the image files' exactly.
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import hashlib
import json
import math
import multiprocessing
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

import csce_jax.data.records as R
from csce_jax.data.base import Source
from csce_jax.data.datasets import DATASETS, RetrievalData, load_data
from csce_jax.data.images import resized_rgb
from csce_jax.errors import DataError
from csce_jax.runtime.workers import start_niced_worker
from csce_jax.utils.atomic import write_file_atomically, write_text_atomically
from csce_jax.utils.progress import Progress

VIEW_NAMES = ("train", "fit", "val", "database", "query")


def base_splits(data: RetrievalData) -> tuple[dict[str, Source], dict[str, Any], dict]:
    """(base sources to store, view specs, subset index arrays) of a data set's five views.

    A view is either a base source itself or a subset (index array) of one; a source that
    two views share (the database that is the training set) is stored once.
    """
    bases: dict[str, Source] = {}
    views: dict[str, Any] = {}
    index: dict[str, np.ndarray] = {}
    for name in VIEW_NAMES:
        src = getattr(data, name)
        if src is None:
            views[name] = None
            continue
        idx = None
        while src.parent is not None:  # compose subsets of subsets down to the stored source
            parent, sub = src.parent
            idx = sub if idx is None else sub[idx]
            src = parent
        base = next((n for n, b in bases.items() if b is src), None)
        if base is None:
            base = name if name not in bases else f"{name}_{len(bases)}"
            bases[base] = src
        views[name] = {"source": base, "subset": idx is not None}
        if idx is not None:
            index[name] = idx
    return bases, views, index


def _part(src: Source, start: int, stop: int) -> Source:
    """Records [start, stop) of ``src`` as a small picklable source: file paths are copied out
    (a worker need not receive the whole list), lazy sources (tfds) stay lazy."""
    if len(src) and isinstance(src.images[start], str):
        idx = range(start, stop)
        return Source(
            [src.images[i] for i in idx],
            np.asarray(src.labels)[start:stop],
            [src.where[i] for i in idx],
            src.name,
            trim_bottom=src.trim_bottom,
        )
    part = src.subset(np.arange(start, stop), src.name)
    part.parent = None
    return part


def _write_shard(job: dict[str, Any]) -> dict[str, Any]:
    """Write one shard (in a worker process); returns its sidecar, or its unreadable images."""
    from array_record.python.array_record_module import ArrayRecordWriter

    src: Source = job["source"]
    out = Path(job["path"])
    records, bad = [], []
    for i in range(len(src)):
        rec = src[i]
        try:
            image = resized_rgb(
                rec["image"],
                job["resize"],
                rec["where"],
                trim_bottom=src.trim_bottom,
                draft=job["draft"],
            )
            error = None
        except DataError as e:
            image, error = None, str(e)
            bad.append({"where": rec["where"], "error": error})
        records.append(
            R.encode_record(
                image,
                rec["label"],
                rec["where"],
                image_format=job["format"],
                jpeg_quality=job["jpeg_quality"],
                error=error,
            )
        )
    if bad and not job["skip_corrupt"]:
        return {"bad": bad, "count": len(records)}
    tmp = out.with_name(out.name + ".tmp")
    digest = hashlib.sha256()
    try:
        writer = ArrayRecordWriter(str(tmp), R.WRITER_OPTIONS)
        for r in records:
            writer.write(r)
        writer.close()
        with open(tmp, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
        os.replace(tmp, out)
    except (OSError, RuntimeError) as e:
        raise _write_error(e, out) from None
    finally:
        tmp.unlink(missing_ok=True)
    side = {
        "file": out.name,
        "count": len(records),
        "bytes": out.stat().st_size,
        "sha256": digest.hexdigest(),
        "unreadable": len(bad),
    }
    write_text_atomically(out.with_name(out.name + ".json"), json.dumps(side))
    return {**side, "bad": bad}


# ArrayRecord reports a failed write as a RuntimeError carrying the system's words; these
# name the operating system's error, so the command can say it in one line with the shard.
_SYSTEM_ERRORS = {
    "No space left on device": errno.ENOSPC,
    "Disk quota exceeded": errno.EDQUOT,
    "File too large": errno.EFBIG,
    "Read-only file system": errno.EROFS,
    "Permission denied": errno.EACCES,
    "Input/output error": errno.EIO,
}


def _write_error(e: OSError | RuntimeError, out: Path) -> OSError:
    """A failed shard write as an OSError naming the shard (pickles back to the parent)."""
    if isinstance(e, OSError) and e.errno is not None:
        return OSError(e.errno, e.strerror or str(e), str(out))
    text = str(e)
    for words, code in _SYSTEM_ERRORS.items():
        if words.lower() in text.lower():
            return OSError(code, words, str(out))
    return OSError(
        errno.EIO, f"could not be written ({text.splitlines()[0] if text else e!r})", str(out)
    )


def _finished(path: Path) -> dict[str, Any] | None:
    """The sidecar of a shard that was written whole, or None."""
    side = path.with_name(path.name + ".json")
    try:
        meta = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if path.is_file() and path.stat().st_size == meta.get("bytes"):
        return {**meta, "bad": [], "written": False}
    return None


def plan_shards(
    bases: dict[str, Source], out: Path, d: Any, shard_size: int, image_format: str, quality: int
) -> list[dict[str, Any]]:
    """One job per shard of every stored split: its file and record range, and how to write."""
    jobs = []
    for split, src in bases.items():
        count = max(1, math.ceil(len(src) / shard_size))
        for s in range(count):
            jobs.append(
                {
                    "split": split,
                    "source": None,
                    "path": str(out / R.shard_name(split, s, count)),
                    "start": s * shard_size,
                    "stop": min(len(src), (s + 1) * shard_size),
                    "resize": d.resize,
                    "draft": bool(d.jpeg_draft),
                    "format": image_format,
                    "jpeg_quality": quality,
                    "skip_corrupt": bool(d.skip_corrupt),
                }
            )
    return jobs


def write_shards(
    jobs: list[dict[str, Any]], bases: dict[str, Source], workers: int, name: str
) -> dict[str, dict[str, Any]]:
    """Write every shard not already written whole, in ``workers`` processes; {path: result}."""
    results: dict[str, dict[str, Any]] = {}
    todo = []
    for job in jobs:
        done = _finished(Path(job["path"]))
        if done is None:
            todo.append(job)
        else:
            results[job["path"]] = done
    total = sum(j["stop"] - j["start"] for j in todo)
    print(
        f"{name}: {len(jobs)} shards, {len(jobs) - len(todo)} already written; preparing "
        f"{total} images in {workers} processes",
        flush=True,
    )
    progress = Progress(f"prepare {name}", total, stream=sys.stdout)
    if todo:
        ctx = multiprocessing.get_context("spawn")
        ex = cf.ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=start_niced_worker, initargs=(5,)
        )
        try:
            futures = {}
            for job in todo:
                job = {**job, "source": _part(bases[job["split"]], job["start"], job["stop"])}
                futures[ex.submit(_write_shard, job)] = job
            for fut in cf.as_completed(futures):
                res = fut.result()
                results[futures[fut]["path"]] = res
                progress.add(res["count"])
        finally:
            # On a failure (a full disk): stop the queued shards, let the running ones end,
            # and leave no partial file behind.
            ex.shutdown(wait=True, cancel_futures=True)
            for job in todo:
                Path(job["path"] + ".tmp").unlink(missing_ok=True)
    progress.add(0, force=True)
    return results


def write_index(
    out: Path,
    bases: dict[str, Source],
    jobs: list[dict[str, Any]],
    results: dict[str, dict[str, Any]],
    index: dict[str, np.ndarray],
) -> dict[str, Any]:
    """Each split's labels and names (``<split>.npz``) and the subsets' indices
    (``views.npz``), written atomically; returns the manifest's ``splits`` entry."""
    splits = {}
    for split, src in bases.items():
        shards = [
            {k: v for k, v in results[j["path"]].items() if k not in ("bad", "written")}
            for j in jobs
            if j["split"] == split
        ]
        labels_file = f"{split}.npz"
        arrays = {"labels": np.asarray(src.labels), "where": np.asarray(src.where, dtype=str)}
        write_file_atomically(out / labels_file, lambda f, a=arrays: np.savez(f, **a))
        splits[split] = {"count": len(src), "labels": labels_file, "shards": shards}
    write_file_atomically(out / R.VIEWS_FILE, lambda f: np.savez(f, **index))
    return splits


def prepare(
    config: Any,
    out_dir: str | os.PathLike,
    *,
    workers: int = 2,
    shard_size: int = 1024,
    image_format: str = "raw",
    jpeg_quality: int = 95,
) -> dict[str, Any]:
    """Write the record set of ``config.data`` into ``out_dir``; returns the summary."""
    d = config.data
    _check_request(d, image_format, shard_size, workers)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(d)
    bases, views, index = base_splits(data)
    jobs = plan_shards(bases, out, d, shard_size, image_format, jpeg_quality)
    results = write_shards(jobs, bases, workers, d.name)
    bad = [b for r in results.values() for b in r["bad"]]
    if any("file" not in r for r in results.values()):
        listed = "\n".join(f"  {b['error']}" for b in bad[:20])
        raise DataError(
            f"{len(bad)} unreadable image(s); their shards were not written (fix or remove "
            f"them and rerun, or set data.skip_corrupt=True to mark them unreadable):\n{listed}"
        )
    splits = write_index(out, bases, jobs, results, index)
    manifest = {
        "version": R.FORMAT_VERSION,
        "settings": R.settings_of(d),
        "format": image_format,
        "jpeg_quality": jpeg_quality if image_format == "jpeg" else None,
        "num_classes": data.num_classes,
        "multilabel": bool(data.multilabel),
        "topk": DATASETS[d.name].topk,
        "splits": splits,
        "views": views,
        "unreadable": [b["where"] for b in bad],
    }
    write_text_atomically(out / R.MANIFEST, json.dumps(manifest, indent=1))
    return _summary(out, splits, jobs, results, bad)


def _check_request(d: Any, image_format: str, shard_size: int, workers: int) -> None:
    if d.get("prepared"):
        raise DataError("data.prepared is set: prepare reads the image files, unset it")
    if image_format not in ("raw", "jpeg"):
        raise DataError(f"--format={image_format!r}: raw or jpeg")
    if shard_size < 1 or workers < 1:
        raise DataError("--shard_size and --workers must be at least 1")


def _summary(out: Path, splits, jobs, results, bad) -> dict[str, Any]:
    """What was written, printed in one line and returned."""
    total_bytes = sum(s["bytes"] for sp in splits.values() for s in sp["shards"])
    images = sum(sp["count"] for sp in splits.values())
    written = sum(1 for j in jobs if results[j["path"]].get("written", True))
    summary = {
        "images": images,
        "bytes": total_bytes,
        "bytes_per_image": total_bytes / max(images, 1),
        "unreadable": len(bad),
        "shards": len(jobs),
        "written": written,
    }
    print(
        f"wrote {out}: {images} images in {len(jobs)} shards, {total_bytes / 2**20:.1f} MiB, "
        f"{summary['bytes_per_image'] / 1024:.1f} KiB per image"
        + (f", {len(bad)} unreadable (skipped when read)" if bad else ""),
        flush=True,
    )
    return summary
