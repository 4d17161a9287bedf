"""A run's checkpoint as an image encoder for indexing and queries (the run is only read)."""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
import numpy as np

from csce_jax.data.base import Source
from csce_jax.data.pipeline import Workers
from csce_jax.errors import CodesError
from csce_jax.retrieval.encoder import Encoder
from csce_jax.runs import builders
from csce_jax.runs.reader import RunReader
from csce_jax.search.collection import full_path


class RunEncoder:
    """Images -> {-1,+1} codes with a run's best (or ``step``) checkpoint.

    ``local``: encode on this host's devices alone (each host of a job its own images); the
    weights are restored on every host's devices, as a checkpoint is, then copied locally.
    """

    def __init__(
        self,
        workdir: str,
        step: int | None = None,
        config: ml_collections.ConfigDict | None = None,
        *,
        local: bool = False,
    ):
        with RunReader(workdir) as run:
            config = run.config(config)
            config.data.skip_corrupt = True
            num_classes = run.num_classes()
            run_encoding = run.encoding(config, step, local=local)
        self._encoder = run_encoding.encoder
        # One image at a time (a search by upload, `search query` of one file): a batch of one
        # per device, decoded in this process: no worker start, one small compiled forward
        # that stays warm between queries.
        mesh = self._encoder.mesh
        one = dataclasses.replace(
            self._encoder.options, batch=mesh.devices.size, workers=Workers(1, processes=False)
        )
        self._single = Encoder(run_encoding.graphdef, one, mesh)
        self._weights = run_encoding.weights
        got_step = run_encoding.step
        self.config = config
        self.resize = int(config.data.resize)  # the shorter side images are resized to
        self.meta: dict[str, Any] = {
            "bits": int(config.bits),
            "centers": builders.config_fingerprint(config, num_classes),
            "workdir": str(full_path(workdir)),
            "step": int(got_step),
        }

    def encode(self, source: Source, progress=None) -> dict[str, Any]:
        """{"codes" (int8 {-1,+1}), "index" (records kept, in order)[, "skipped"]}."""
        few = len(source) <= self._single.options.batch  # one image: the warm small path
        encoder = self._single if few else self._encoder
        return encoder.encode(self._weights, source, progress=progress)

    def encode_one(self, image: str | bytes, name: str = "query") -> np.ndarray:
        """The code of one image file or encoded image (bytes), as a (1, bits) array."""
        src = Source([image], np.zeros(1, np.int32), [name], "query")
        out = self.encode(src)
        if out.get("skipped"):
            raise CodesError(f"cannot read the query image {name}")
        return out["codes"]

    def check_index(self, meta: dict[str, Any], where: str) -> None:
        """Refuse an index made under other codes than this checkpoint gives."""
        if self.meta["bits"] != meta["bits"] or self.meta["centers"] != meta["centers"]:
            raise CodesError(
                f"{where} was built with {meta['bits']}-bit codes under centres "
                f"{meta['centers']}, but {self.meta['workdir']} step {meta['step']} now gives "
                f"{self.meta['bits']} bits under {self.meta['centers']}: rebuild the index"
            )
