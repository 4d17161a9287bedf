"""Images -> binary codes: the jitted, sharded encoding step, over whole splits.

Used by the trainer's periodic evaluation, by ``eval.py``, by search and by the public
``csce_jax.encode``. The last batch of a split is padded and masked so that every host runs
the same number of steps (their collectives must match).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from csce_jax.data.base import Source
from csce_jax.data.pipeline import EvalLoader, ViewConfig, Workers
from csce_jax.hashing import binarize
from csce_jax.runtime.sharding import data_sharded, gather, global_batch, replicated


def make_encode_step(graphdef: Any, mesh: jax.sharding.Mesh, *, raw_eval_band: bool, bal):
    """jit((weights, uint8 images, indices) -> (int8 {-1,+1} codes, continuous codes v,
    indices)). The batch comes in sharded over ('data',); the three outputs leave replicated,
    so the gather that every host of a multi-host job needs is one all-gather inside the
    compiled step (what ``csce-plan`` reports), not a host round trip after it."""

    def step(weights, images, index):
        model = nnx.merge(graphdef, *weights, copy=True)
        out = model(images)
        codes = binarize(out.codes, out.threshold, raw_eval_band=raw_eval_band, balance=bal)
        return codes.astype(jnp.int8), out.codes, index

    return jax.jit(
        step,
        in_shardings=(replicated(mesh), data_sharded(mesh), data_sharded(mesh)),
        out_shardings=replicated(mesh),
    )


@dataclasses.dataclass(frozen=True)
class EncodeOptions:
    """How a split is read and binarised: the global batch, the evaluation view, the host
    decoding, whether unreadable images are skipped, and the DSF's evaluation settings."""

    batch: int
    view: ViewConfig
    workers: Workers = dataclasses.field(default_factory=Workers)
    skip_corrupt: bool = False
    raw_eval_band: bool = False
    balance: float | None = None


class Encoder:
    """Encodes whole sources with one model structure; the weights are passed per call.

    On a mesh of every host's devices, every host reads its part of each batch; on a mesh of
    this host's devices alone (``make_mesh(local=True)``) this host reads the whole source.
    """

    def __init__(self, graphdef: Any, options: EncodeOptions, mesh: jax.sharding.Mesh):
        self.mesh = mesh
        self._local = all(d.process_index == jax.process_index() for d in mesh.devices.flat)
        self.options = options
        self._step = make_encode_step(
            graphdef, mesh, raw_eval_band=options.raw_eval_band, bal=options.balance
        )
        self.skipped: set[str] = set()  # unreadable images met so far (skip_corrupt)

    def encode_batch(self, weights: Any, images: np.ndarray) -> np.ndarray:
        """int8 {-1,+1} codes of one batch of images already cropped to the view (uint8,
        N x crop x crop x 3), padded to the devices here (this host's mesh only)."""
        pad = -len(images) % self.mesh.size
        padded = np.concatenate([images, np.zeros((pad, *images.shape[1:]), np.uint8)])
        codes, _, _ = self._step(weights, padded, np.arange(len(padded), dtype=np.int32))
        return np.asarray(codes)[: len(images)]

    def encode(
        self,
        weights: Any,
        source: Source,
        *,
        with_continuous: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> dict[str, np.ndarray]:
        """Codes of every record of ``source`` in source order: {"codes", "labels"[, "v"]}.

        ``weights`` is ``(params, rest)``. Unreadable images (with ``data.skip_corrupt``) are
        left out; their names are in ``out["skipped"]``. ``progress(records done)`` is called
        after each batch.
        """
        o = self.options
        loader = EvalLoader(
            source,
            global_batch=o.batch,
            view=o.view,
            process_index=0 if self._local else jax.process_index(),
            process_count=1 if self._local else jax.process_count(),
            workers=o.workers,
            skip_corrupt=o.skip_corrupt,
        )
        codes, cont, index = [], [], []
        for host in loader.batches():
            batch = global_batch(self.mesh, {"image": host["image"], "index": host["index"]})
            b, v, idx = self._step(weights, batch["image"], batch["index"])
            idx = gather(idx)
            keep = idx >= 0
            codes.append(gather(b)[keep])
            index.append(idx[keep])
            if with_continuous:
                cont.append(gather(v)[keep])
            if progress is not None:
                progress(min(len(source), len(codes) * o.batch))
        index = np.concatenate(index)
        order = np.argsort(index, kind="stable")
        index = index[order]
        out = {
            "codes": np.concatenate(codes)[order],
            "index": index,
            "labels": source.labels[index],
        }
        if with_continuous:
            out["v"] = np.concatenate(cont)[order]
        if loader.corrupt.count:
            out["skipped"] = loader.corrupt.names
            self.skipped.update(loader.corrupt.names)
        return out
