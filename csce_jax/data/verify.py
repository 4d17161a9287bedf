"""Decode every image of a data set once, up front, so a corrupt file is found before training.

  csce-verify --config configs/cub200.py [--out report.json]

Decoding runs in ``data.num_workers`` threads with a progress line on stderr; the report (JSON:
counts per split and every unreadable file with its error) is written atomically. With
``data.verify=True`` ``train.py`` runs the same check before training and writes
``<workdir>/data_report.json``; an unreadable image then stops the launch, naming it, unless
``data.skip_corrupt`` is set.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ml_collections

from csce_jax.data.base import Source
from csce_jax.data.datasets import RetrievalData
from csce_jax.data.images import load_rgb
from csce_jax.errors import DataError
from csce_jax.utils.atomic import write_text_atomically
from csce_jax.utils.progress import Progress


def _check(source: Source, i: int, resize: int) -> tuple[str, str] | None:
    rec = source[i]
    try:
        load_rgb(rec["image"], resize, rec["where"], trim_bottom=source.trim_bottom)
    except DataError as e:
        return rec["where"], str(e)
    return None


def splits_of(data: RetrievalData) -> dict[str, Source]:
    """The splits to check: train, query and (where it is not train) database."""
    splits = {"train": data.train, "query": data.query}
    if data.database is not data.train:
        splits["database"] = data.database
    return splits


def check_sources(
    splits: dict[str, Source], *, resize: int, threads: int, progress: bool = True
) -> dict[str, Any]:
    """Decode every record; returns {"checked", "splits": {name: count}, "bad": [...]}."""
    jobs = [(src, i) for src in splits.values() for i in range(len(src))]
    bad: list[dict[str, str]] = []
    counter = Progress("verify", len(jobs)) if progress else None
    with ThreadPoolExecutor(max(1, threads)) as pool:
        results = pool.map(lambda job: _check(job[0], job[1], resize), jobs)
        for n, result in enumerate(results, 1):
            if result is not None:
                bad.append({"where": result[0], "error": result[1]})
            if counter is not None:
                note = f" ({n * 100 // len(jobs)}%), {len(bad)} unreadable"
                counter.update(n, note=note, force=n == len(jobs))
    return {
        "checked": len(jobs),
        "splits": {name: len(src) for name, src in splits.items()},
        "bad": bad,
    }


def write_report(report: dict[str, Any], path: str | os.PathLike) -> None:
    write_text_atomically(path, json.dumps(report, indent=2))


def verify_data(
    data: RetrievalData, block: ml_collections.ConfigDict, report: str | os.PathLike
) -> dict[str, Any]:
    """Check every image of the data set of the config's ``data`` block; an unreadable one is
    an error unless ``data.skip_corrupt``."""
    result = check_sources(splits_of(data), resize=block.resize, threads=block.num_workers)
    write_report(result, report)
    if result["bad"] and not block.skip_corrupt:
        first = result["bad"][0]
        raise DataError(
            f"{len(result['bad'])} unreadable image(s) in {block.name}, first: "
            f"{first['where']} ({first['error']}); the full list is in {report}. Fix or remove "
            "them, or set data.skip_corrupt=True to train without them"
        )
    return result
