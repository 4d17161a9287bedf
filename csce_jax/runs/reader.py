"""A training run's folder, read only: its config, class count, and the weights of its best (or
any) checkpoint restored into abstract targets, checked against the config's hash centres.

``eval.py``, :func:`csce_jax.load_model`, search and the trainer's resume check read runs
through it. It never creates, cleans up or deletes anything in a run that may be training; the
writing side is :class:`csce_jax.runs.writer.RunWriter`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from csce_jax.config.files import read_config_json
from csce_jax.config.schema import from_json
from csce_jax.errors import CheckpointError, WorkdirError
from csce_jax.retrieval.encoder import Encoder
from csce_jax.runs import builders, state
from csce_jax.runs.checkpoints import Checkpoints, abstract_on
from csce_jax.runs.writer import layout
from csce_jax.runtime import sharding


@dataclasses.dataclass
class Restored:
    """Weights of one checkpoint, in the evaluation-mode model's structure."""

    graphdef: Any  # evaluation mode (BatchNorm running averages)
    weights: dict[str, Any]  # {"params", "rest"}
    step: int
    meta: dict[str, Any]

    @property
    def pair(self) -> tuple[Any, Any]:
        """``(params, rest)``, what :class:`csce_jax.retrieval.encoder.Encoder` takes."""
        return self.weights["params"], self.weights["rest"]

    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.weights["params"], self.weights["rest"])


class RunReader:
    """The checkpoints and config of one run folder, opened read-only."""

    def __init__(self, workdir: str | os.PathLike):
        self.layout = layout(workdir)
        if not self.layout.checkpoints.is_dir():
            raise WorkdirError(
                f"{self.layout.root} is not a training run (it holds no checkpoints/): point "
                "--workdir at a run's folder"
            )
        self.checkpoints = Checkpoints(self.layout.root, read_only=True)

    def __enter__(self) -> RunReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.checkpoints.close()

    def _newest_meta(self) -> dict[str, Any]:
        steps = self.checkpoints.steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.layout.checkpoints}")
        return self.checkpoints.read_meta(steps[-1])

    def saved_config(self) -> dict[str, Any] | None:
        """The config (JSON) recorded in the newest checkpoint whose record reads."""
        return self.checkpoints.saved_config()

    def config(self, given: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
        """``given``, else the config the run recorded in its newest checkpoint, else its
        ``config.json``."""
        if given is not None:
            return given
        saved = self.saved_config()
        if saved is not None:
            return from_json(saved, str(self.layout.checkpoints))
        return read_config_json(self.layout.config)

    def num_classes(self) -> int:
        """The class count the run was trained with."""
        return int(self._newest_meta()["num_classes"])

    def weights(
        self,
        config: ml_collections.ConfigDict,
        step: int | None = None,
        *,
        mesh: jax.sharding.Mesh | None = None,
    ) -> Restored:
        """The best checkpoint (Orbax's, by the saved validation scores), else the newest, or
        exactly ``step``. A best that does not restore falls back to the newest that does (the
        log says so); an explicit ``step`` that does not restore is an error."""
        num_classes = self.num_classes()
        model = nnx.eval_shape(lambda: builders.create_model(config, num_classes))
        _, eval_graphdef, params, rest = state.split_model(model)
        mesh = mesh if mesh is not None else sharding.make_mesh()
        target = abstract_on({"params": params, "rest": rest}, sharding.replicated(mesh))
        ckpts = self.checkpoints
        if not ckpts.steps():
            raise CheckpointError(f"no checkpoint in {ckpts.directory}")
        wanted = step if step is not None else ckpts.best_step() or ckpts.steps()[-1]
        got, weights, meta = ckpts.restore_weights(target, wanted, fallback=step is None)
        fingerprint = builders.config_fingerprint(config, num_classes)
        state.check_centers(meta, fingerprint, ckpts.directory / str(got))
        return Restored(eval_graphdef, weights, got, meta)

    def encoding(
        self, config: ml_collections.ConfigDict, step: int | None = None, *, local: bool = False
    ) -> RunEncoding:
        """The best (or ``step``) checkpoint as an encoder of ``config``'s evaluation: the one
        restore-and-encode path of ``eval.py`` and search. The weights are restored on every
        host's devices, as they were saved; ``local``: then copied to this host's devices
        alone, so that each host of a job encodes its own images."""
        restored = self.weights(config, step, mesh=sharding.make_mesh())
        mesh = sharding.make_mesh(local=local)
        weights = restored.pair
        if local and jax.process_count() > 1:
            weights = jax.tree.map(
                lambda a: jax.device_put(
                    np.asarray(a.addressable_data(0)), sharding.replicated(mesh)
                ),
                weights,
            )
        encoder = builders.make_encoder(config, restored.graphdef, mesh)
        return RunEncoding(encoder, weights, restored.step, restored.graphdef)


@dataclasses.dataclass
class RunEncoding:
    """A run's checkpoint ready to encode: the :class:`Encoder` of the config's evaluation
    settings, the weights it takes, and the step they come from."""

    encoder: Encoder
    weights: tuple[Any, Any]  # (params, rest) on the encoder's mesh
    step: int
    graphdef: Any  # evaluation mode, for encoders of other batch sizes on the same mesh


def run_config(
    workdir: str | os.PathLike, given: ml_collections.ConfigDict | None = None
) -> ml_collections.ConfigDict:
    """``given``, else the config of the run in ``workdir`` (see :meth:`RunReader.config`)."""
    if given is not None:
        return given
    with RunReader(workdir) as run:
        return run.config()
