"""The retrieval evaluation: a query set and a database encoded with one model's weights, then
every figure of the protocol. Training's periodic and final evaluation, ``eval.py`` and the
PyTorch comparison all score through :func:`score`, so each figure has one definition."""

from __future__ import annotations

from typing import Any

import numpy as np

from csce_jax import metrics
from csce_jax.data.sources import Source
from csce_jax.encoding import Encoder

PRECISION_KS = (1, 10, 50, 100, 500, 1000, 5000)


def encode_pair(
    encoder: Encoder, weights: Any, query: Source, database: Source
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The codes (and labels, indices) of ``query`` and ``database`` under ``weights``."""
    return encoder.encode(weights, query), encoder.encode(weights, database)


def score(
    query: dict[str, np.ndarray],
    database: dict[str, np.ndarray],
    topk: int | None,
    *,
    curves: bool = False,
) -> dict[str, Any]:
    """``map`` (at the protocol's cut-off ``topk``; None: the whole database), ``map@all`` and
    ``map@<topk>``, the set sizes and the code length; with ``curves``, also precision and
    recall at ``PRECISION_KS``, precision within Hamming radius 2 and the radius curve."""
    args = (query["codes"], database["codes"], query["labels"], database["labels"])
    maps = metrics.map_at_ks(*args, metrics.protocol_cutoffs(topk))
    n_db = len(database["codes"])
    out: dict[str, Any] = {
        "map": maps[metrics.map_key(topk)],
        "topk": topk if topk is not None else "all",
        **maps,
        "bits": int(query["codes"].shape[1]),
        "num_query": len(query["codes"]),
        "num_database": n_db,
    }
    if not curves:
        return out
    pk = metrics.precision_recall_at_k(*args, [k for k in PRECISION_KS if k <= n_db] or [n_db])
    radius = metrics.hamming_radius_curve(*args)
    out.update(
        precision_at_k=dict(zip(map(str, pk["k"]), pk["precision"], strict=True)),
        recall_at_k=dict(zip(map(str, pk["k"]), pk["recall"], strict=True)),
        precision_within_radius_2=metrics.precision_at_radius(radius, 2),
        pr_curve=radius,
    )
    return out
