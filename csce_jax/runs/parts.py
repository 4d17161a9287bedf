"""The typed parts of a run, built from its config once by :mod:`csce_jax.runs.builders`.

Jitted code and the libraries below take these objects, never the config: :class:`StepOptions`
is what the training step (:mod:`csce_jax.train.step`) reads, and :class:`RunParts` gathers
everything a run is made of (model, optimiser, the step's, the loss's and encoding's options,
the training loader's settings).
"""

from __future__ import annotations

import dataclasses

import optax
from flax import nnx

from csce_jax.data.pipeline import TrainLoaderArgs
from csce_jax.hashing.loss import LossOptions
from csce_jax.retrieval.encoder import EncodeOptions


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """What the training step needs besides the model and optimiser: the seed of its per-step
    keys, the elastic margin's mean and spread (a multi-label loss uses the mean as a fixed
    margin), rematerialisation, and the loss's options."""

    seed: int = 0
    margin: float = 0.15
    margin_std: float = 0.125
    remat: bool = False
    loss: LossOptions = dataclasses.field(default_factory=LossOptions)


@dataclasses.dataclass
class RunParts:
    """Everything one run builds from its config: the model (training mode; its leaves are
    ``ShapeDtypeStruct`` s when built abstract, as a restore target), the optimiser and its
    learning-rate schedule, the fingerprint of the model's hash centres, the step's and
    encoding's options, and the training loader's settings (``TrainLoader(source, **train_loader,
    process_index=..., process_count=...)``)."""

    model: nnx.Module
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    fingerprint: str
    step: StepOptions
    encode: EncodeOptions
    train_loader: TrainLoaderArgs

    @property
    def loss(self) -> LossOptions:
        return self.step.loss
