"""Config -> a run's parts: the model (with its centres), the optimiser, and the typed options of
the loss, the training step, encoding and the training loader.

:func:`run_parts` is the one call a run makes; the functions it is made of serve the readers
that need one part (a run's encoder, the model of a weights file). Training, evaluation, search,
``csce-plan`` and the PyTorch comparison all read a config through this module, so that all of
them read it the same way; the libraries below take these objects, never the config.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from csce_jax.convert.pretrained import initialize_from
from csce_jax.data.pipeline import TrainLoaderArgs, ViewConfig, Workers
from csce_jax.hashing import centers_fingerprint, hash_centers
from csce_jax.hashing.loss import LossOptions
from csce_jax.models import CSCENet
from csce_jax.models.layers import resolve_kernels
from csce_jax.retrieval.encoder import EncodeOptions, Encoder
from csce_jax.runs.optimizer import learning_rate_schedule, make_optimizer, with_frozen
from csce_jax.runs.parts import RunParts, StepOptions


def run_parts(
    config: ml_collections.ConfigDict,
    num_classes: int,
    multilabel: bool = False,
    *,
    abstract: bool = False,
    platform: str | None = None,
    init_from: str = "",
) -> RunParts:
    """Every part of a run of ``config`` on ``num_classes`` classes. ``abstract``: the model's
    leaves are shapes only (a restore or compile target; nothing is allocated); ``platform``:
    where its programs run (see :func:`create_model`); ``init_from``: a weights file loaded into
    the (concrete) model, with ``model.init_scope``."""
    centers = hash_centers(num_classes, config.bits, seed=config.centers_seed)
    if abstract:
        model = nnx.eval_shape(
            lambda: create_model(config, num_classes, centers, platform=platform)
        )
    else:
        model = create_model(config, num_classes, centers, platform=platform)
        if init_from:
            initialize_from(model, init_from, scope=config.model.init_scope)
    tx, schedule = create_optimizer(config)
    return RunParts(
        model=model,
        tx=tx,
        schedule=schedule,
        fingerprint=centers_fingerprint(centers),
        step=step_options(config, multilabel),
        encode=encode_options(config),
        train_loader=train_loader_args(config),
    )


def view_config(config: ml_collections.ConfigDict, *, train: bool) -> ViewConfig:
    """How the data block sizes images: training (random crop, flip) or evaluation views."""
    d = config.data
    return ViewConfig(d.resize, d.crop, bool(d.flip) and train, bool(d.get("jpeg_draft", False)))


def decode_workers(config: ml_collections.ConfigDict) -> Workers:
    """The host decoding of ``data.num_workers`` / ``data.worker_processes``."""
    return Workers(config.data.num_workers, config.data.worker_processes)


def train_loader_args(config: ml_collections.ConfigDict) -> TrainLoaderArgs:
    """The training loader's settings: batch, steps, seed, view, decoding, corrupt images."""
    return TrainLoaderArgs(
        global_batch=config.batch_size,
        num_steps=config.total_steps,
        seed=config.seed,
        view=view_config(config, train=True),
        workers=decode_workers(config),
        skip_corrupt=config.data.skip_corrupt,
    )


def encode_options(config: ml_collections.ConfigDict) -> EncodeOptions:
    """How ``config``'s evaluation encodes: its batch, view, decoding and DSF settings."""
    return EncodeOptions(
        batch=config.eval_batch_size,
        view=view_config(config, train=False),
        workers=decode_workers(config),
        skip_corrupt=config.data.skip_corrupt,
        raw_eval_band=config.release_compat.raw_eval_band,
        balance=balance(config),
    )


def make_encoder(
    config: ml_collections.ConfigDict, graphdef: Any, mesh: jax.sharding.Mesh
) -> Encoder:
    """The encoder of ``config``'s evaluation for the model structure ``graphdef``."""
    return Encoder(graphdef, encode_options(config), mesh)


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
    """The model's compute dtype (parameters, loss and metrics stay float32)."""
    return jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32


def create_model(
    config: ml_collections.ConfigDict,
    num_classes: int,
    centers: np.ndarray | None = None,
    *,
    platform: str | None = None,
) -> CSCENet:
    """The configured CSCE-Net; centres from ``hash_centers(num_classes, bits, centers_seed)``.

    ``platform``: where its programs will run (default: JAX's default backend), which decides
    what ``model.kernels="auto"`` means (:func:`csce_jax.models.layers.resolve_kernels`).
    """
    if centers is None:
        centers = hash_centers(num_classes, config.bits, seed=config.centers_seed)
    m = config.model
    return CSCENet(
        centers,
        image_size=config.data.crop,
        width=m.width,
        depths=tuple(m.depths),
        window_sizes=tuple(m.window_sizes),
        use_aspp=m.use_aspp,
        learn_centers=m.learn_centers,
        signt=m.signt,
        dtype=compute_dtype(config),
        kernels=resolve_kernels(m.kernels, platform),
        rngs=nnx.Rngs(config.seed),
    )


def config_fingerprint(config: ml_collections.ConfigDict, num_classes: int) -> str:
    """The fingerprint of the hash centres this config gives for ``num_classes`` classes."""
    return centers_fingerprint(hash_centers(num_classes, config.bits, seed=config.centers_seed))


def create_optimizer(
    config: ml_collections.ConfigDict,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimiser, learning-rate schedule). The release's frozen threshold head stays frozen."""
    o = config.optimizer
    schedule = learning_rate_schedule(
        o.lr, config.total_steps, warmup_steps=o.warmup_steps, decay=o.schedule
    )
    tx = make_optimizer(o.name, schedule, weight_decay=o.weight_decay, momentum=o.momentum)
    frozen = ("threshold_fc",) if config.dsf.estimator == "release" else ()
    return with_frozen(tx, frozen), schedule


def balance(config: ml_collections.ConfigDict) -> float | None:
    """The DSF fill rule's positive count: K/2, or the release's hard-coded 32."""
    return 32.0 if config.release_compat.fill_64bit else None


def loss_options(config: ml_collections.ConfigDict, multilabel: bool) -> LossOptions:
    """The options of :func:`csce_jax.hashing.loss.csce_loss` for this config."""
    lc = config.loss
    return LossOptions(
        multilabel=bool(multilabel),
        margin_type=lc.margin_type,
        scale=float(lc.scale),
        ce_weight=float(lc.ce),
        quan_weight=float(lc.quan),
        quan_type=lc.quan_type,
        multilabel_loss=lc.multilabel_loss,
        estimator=config.dsf.estimator,
        clip_all_logits=bool(config.release_compat.clip_all_logits),
        balance=balance(config),
        temperature=float(config.dsf.temperature),
    )


def step_options(config: ml_collections.ConfigDict, multilabel: bool) -> StepOptions:
    """The options of the training step (:mod:`csce_jax.train.step`) for this config."""
    return StepOptions(
        seed=int(config.seed),
        margin=float(config.loss.margin),
        margin_std=float(config.loss.margin_std),
        remat=bool(config.model.remat),
        loss=loss_options(config, multilabel),
    )
