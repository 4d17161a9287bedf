"""``search query``: the nearest indexed images to query images, one or many at once."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from csce_jax.errors import CodesError
from csce_jax.retrieval.metrics import pack_codes
from csce_jax.retrieval.pictures import hits_strip
from csce_jax.search import collection
from csce_jax.search.index import CodeEncoder, Index, load_index
from csce_jax.search.onnx_encoder import OnnxEncoder
from csce_jax.utils.atomic import write_text_atomically

HIT_FIELDS = ("rank", "distance", "index", "label", "path")


def query_encoder(
    meta: dict[str, Any],
    *,
    workdir: str | None = None,
    encoder: str | None = None,
    config: ml_collections.ConfigDict | None = None,
) -> CodeEncoder:
    """What encodes the queries of an index: the ONNX ``encoder`` given, the run ``workdir``
    given, else what built the index (its exported encoder, checked to be the same file, or
    its run folder)."""
    if workdir and encoder:
        raise CodesError("give --workdir or --encoder, not both")
    if encoder:
        return OnnxEncoder(encoder)
    if not workdir and "encoder" in meta:
        recorded = meta["encoder"]
        if not Path(recorded["file"]).is_file():
            raise CodesError(
                f"the index was built with the encoder {recorded['file']}, which is not there: "
                "give --encoder FILE (the same export, moved) or --workdir RUN"
            )
        return OnnxEncoder(recorded["file"], sha256=recorded["sha256"])
    from csce_jax.search.encoder import RunEncoder  # the model code, for a run only

    return RunEncoder(workdir or meta["workdir"], meta["step"], config)


class Searcher:
    """An index, its engine and the encoder of its queries (the checkpoint or the exported
    encoder that made it, or one giving the same codes), ready for queries."""

    def __init__(
        self,
        index: str | os.PathLike,
        *,
        workdir: str | None = None,
        encoder: str | None = None,
        config: ml_collections.ConfigDict | None = None,
    ):
        self.where = str(index)
        self.index: Index = load_index(index)
        meta = self.index.meta
        self.engine = self.index.engine()
        try:
            self.encoder = query_encoder(meta, workdir=workdir, encoder=encoder, config=config)
            self.encoder.check_index(meta, self.where)
        except BaseException:
            self.engine.close()
            raise

    def __enter__(self) -> Searcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Let go of the engine's connection (a Milvus engine's)."""
        self.engine.close()

    def hits(
        self, codes: np.ndarray, k: int, label: str | None = None
    ) -> list[list[dict[str, Any]]]:
        """Ranked hits of each {-1,+1} code: rank, distance, index, label, path; ``label``:
        only items whose label is it or lists it among its classes (Milvus filters in the
        database; the other engines scan the matching items exactly)."""
        if k < 1:
            raise CodesError(f"-k {k}: the number of hits must be at least 1")
        packed = pack_codes(codes)
        if label and self.engine.name == "milvus":
            idx, dist = self.engine.search(packed, k, label=label)
        elif label:
            among = np.flatnonzero([label_matches(t, label) for t in self.index.labels])
            idx, dist = self.engine.search(packed, k, among=among)
        else:
            idx, dist = self.engine.search(packed, k)
        return [self._ranked(i, d) for i, d in zip(idx, dist, strict=True)]

    def _ranked(self, idx: np.ndarray, dist: np.ndarray) -> list[dict[str, Any]]:
        keep = idx >= 0  # an approximate engine pads a short row with -1
        return [
            {
                "rank": rank,
                "distance": int(d),
                "index": int(i),
                "label": self.index.labels[i],
                "path": self.index.paths[i],
            }
            for rank, (i, d) in enumerate(zip(idx[keep], dist[keep], strict=True), 1)
        ]

    def query_files(self, paths: list[str], k: int, label: str | None = None) -> dict[str, Any]:
        """{"queries": [{"query": path, "hits": [...]}], "skipped": [unreadable queries]}."""
        coll = collection.from_paths(paths, name="queries")
        out = self.encoder.encode(coll.source)
        found = self.hits(out["codes"], k, label) if len(out["index"]) else []
        return {
            "queries": [
                {"query": paths[q], "hits": h} for q, h in zip(out["index"], found, strict=True)
            ],
            "skipped": sorted(out.get("skipped", [])),
        }


def label_matches(text: str, label: str) -> bool:
    """Whether an item's label text is ``label`` or lists it among its classes ("3,17")."""
    return text == label or label in text.split(",")


def write_hits(result: dict[str, Any], out: str) -> None:
    """The hits of a batch of queries as JSON (``.json``) or CSV (``.csv``: a row per hit)."""
    path = Path(out)
    if path.suffix not in (".json", ".csv"):
        raise CodesError(f"--out {out}: expected a .json or .csv file")
    if path.suffix == ".json":
        write_text_atomically(path, json.dumps(result, indent=1))
        return
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(("query", *HIT_FIELDS))
    for q in result["queries"]:
        for h in q["hits"]:
            w.writerow((q["query"], *(h[x] for x in HIT_FIELDS)))
    write_text_atomically(path, text.getvalue())


def draw_hits(result: dict[str, Any], picture: str) -> None:
    """One query's image and its hits as a PNG strip: the query framed, each hit captioned
    with its Hamming distance and label."""
    hits = result["hits"]
    captions = ["query"] + [f"d={h['distance']} {h['label']}".strip() for h in hits]
    hits_strip([result["query"]] + [h["path"] for h in hits], picture, captions=captions)


def search(
    index: str,
    image: str,
    k: int = 10,
    picture: str | None = None,
    *,
    workdir: str | None = None,
    encoder: str | None = None,
    config: ml_collections.ConfigDict | None = None,
) -> list[tuple[str, int]]:
    """The ``k`` nearest indexed images to ``image``: [(path, Hamming distance)], ties by order.

    ``picture``: also write the query and its hits, with their distances, as a PNG."""
    if k < 1:
        raise CodesError(f"-k {k}: the number of hits must be at least 1")
    with Searcher(index, workdir=workdir, encoder=encoder, config=config) as searcher:
        got = searcher.query_files([str(Path(image).absolute())], k)
    if got["skipped"]:
        raise CodesError(f"cannot read the query image {image}")
    hits = got["queries"][0]["hits"]
    if picture:
        draw_hits(got["queries"][0], picture)
    return [(h["path"], h["distance"]) for h in hits]
