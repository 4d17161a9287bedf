"""The retrieval evaluation: a query set searched against a database, both encoded with one
model's weights, then every figure of the protocol.

:class:`RetrievalEvaluator` owns its encoder and its two sets; ``run(weights)`` gives the
figures. Training's periodic and final evaluation, ``eval.py`` and the PyTorch comparison all
build one, so each figure has one definition; :func:`score` scores codes made elsewhere.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from csce_jax.data.base import Source
from csce_jax.retrieval import metrics
from csce_jax.retrieval.encoder import Encoder

PRECISION_KS = (1, 10, 50, 100, 500, 1000, 5000)

Codes = dict[str, np.ndarray]  # {"codes": int8 (N, K) of ±1, "labels", "index"}


class RetrievalEvaluator:
    """``query`` searched against ``database``, both encoded by ``encoder``; ``topk`` is the
    protocol's mAP cut-off (None: the whole database), ``curves`` adds precision/recall at k,
    the Hamming-radius figures and the PR curve. The codes of the last :meth:`run` stay in
    :attr:`codes` (``eval.py`` saves them and draws the retrieval grid from them)."""

    def __init__(
        self,
        encoder: Encoder,
        query: Source,
        database: Source,
        topk: int | None,
        *,
        curves: bool = False,
    ):
        self.encoder, self.query, self.database = encoder, query, database
        self.topk, self.curves = topk, curves
        self.codes: tuple[Codes, Codes] | None = None

    def encode(self, weights: Any) -> tuple[Codes, Codes]:
        """The codes (and labels, indices) of the query set and the database under ``weights``."""
        query = self.encoder.encode(weights, self.query)
        self.codes = query, self.encoder.encode(weights, self.database)
        return self.codes

    def score(self, query: Codes, database: Codes) -> dict[str, Any]:
        """This evaluation's figures for codes of its two sets (made by any encoder)."""
        return score(query, database, self.topk, curves=self.curves)

    def run(self, weights: Any) -> dict[str, Any]:
        """Encode both sets with ``weights`` and score them."""
        return self.score(*self.encode(weights))


def score(
    query: Codes,
    database: Codes,
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
