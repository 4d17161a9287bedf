"""Config -> objects: the model (with its centres), the optimiser, and the loss/encoding options.

Shared by training, evaluation and search so that all three read a config the same way.
Also the config checks that must fail before anything is read, written or compiled.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from csce_jax.data.pipeline import ViewConfig, Workers
from csce_jax.errors import ConfigError
from csce_jax.hashing import hash_centers
from csce_jax.models import CSCENet
from csce_jax.models.resnet import downsampled_size
from csce_jax.optim import learning_rate_schedule, make_optimizer, with_frozen

_CHOICES = {
    "model.dtype": ("float32", "bfloat16"),
    "model.kernels": ("auto", "xla", "cpu"),
    "model.init_scope": ("auto", "model", "backbone"),
    "dsf.estimator": ("ste", "release"),
    "loss.margin_type": ("arc", "cos"),
    "loss.quan_type": ("cs", "l1", "l2"),
    "loss.multilabel_loss": ("label_smoothing", "bce"),
    "optimizer.name": ("rmsprop", "adamw", "sgd"),
    "optimizer.schedule": ("constant", "cosine"),
    "testing.signal": ("SIGTERM", "SIGINT", "SIGKILL"),
}


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def check_config(config: ml_collections.ConfigDict, device_count: int, process_count: int) -> None:
    """Reject bad values, naming the key, before any data is read or code compiled."""

    def fail(key, msg):
        raise ConfigError(f"config.{key}={_get(config, key)!r}: {msg}")

    by_epochs = config.get("epochs", 0) > 0  # a step count left at 0 follows from epochs
    for key in (
        "bits",
        "batch_size",
        "eval_batch_size",
        "log_every_steps",
        "keep_checkpoints",
        "eval_every_epochs",
        "checkpoint_every_epochs",
    ):
        if not isinstance(_get(config, key), int) or _get(config, key) <= 0:
            fail(key, "must be a positive integer")
    for key in ("total_steps", "eval_every_steps", "checkpoint_every_steps"):
        value = _get(config, key)
        if not isinstance(value, int) or value < 0 or (value == 0 and not by_epochs):
            fail(key, "must be a positive integer (or 0 with config.epochs > 0)")
    if not isinstance(config.epochs, int) or config.epochs < 0:
        fail("epochs", "must be a whole number of passes >= 0 (0: count total_steps)")
    if config.bits < 2:
        fail("bits", "a code needs at least 2 bits")
    for key in ("batch_size", "eval_batch_size"):
        if _get(config, key) % device_count:
            fail(key, f"must be divisible by the {device_count} devices")
        if _get(config, key) % process_count:
            fail(key, f"must be divisible by the {process_count} processes")
    for key, allowed in _CHOICES.items():
        if _get(config, key) not in allowed:
            fail(key, f"must be one of {allowed}")
    _check_model(config, fail)
    need = 32 * (max(config.model.window_sizes) - 1) + 1
    if downsampled_size(config.data.crop, 5) < max(config.model.window_sizes):
        fail(
            "data.crop",
            f"too small for {max(config.model.window_sizes)}x"
            f"{max(config.model.window_sizes)} windows: need at least {need} pixels",
        )
    if config.data.resize < config.data.crop:
        fail("data.resize", f"must be >= data.crop ({config.data.crop})")
    if not 0 <= config.data.val_fraction < 1:
        fail("data.val_fraction", "must be in [0, 1)")
    lr = config.optimizer.lr
    if not isinstance(lr, int | float) or not math.isfinite(lr) or lr <= 0:
        fail("optimizer.lr", "must be a positive finite number (a negative rate ascends the loss)")
    for key in ("optimizer.weight_decay", "optimizer.warmup_steps", "testing.signal_at_step"):
        if _get(config, key) < 0:
            fail(key, "must be >= 0")
    if config.data.num_workers < 1:
        fail("data.num_workers", "must be at least 1")
    if not 0 <= config.preempted_exit_code <= 255:
        fail("preempted_exit_code", "must be an exit status in 0..255")


def resolve_epochs(config: ml_collections.ConfigDict, train_size: int) -> int:
    """Set the step counts left at 0 from ``config.epochs`` at the run's batch size (one
    epoch: ``train_size // batch_size`` steps, at least 1); returns the steps per epoch."""
    per_epoch = max(1, train_size // config.batch_size)
    if config.epochs > 0:
        for steps, epochs in (
            ("total_steps", "epochs"),
            ("eval_every_steps", "eval_every_epochs"),
            ("checkpoint_every_steps", "checkpoint_every_epochs"),
        ):
            if config[steps] == 0:
                config[steps] = config[epochs] * per_epoch
    return per_epoch


def _check_model(config: ml_collections.ConfigDict, fail) -> None:
    m = config.model
    if m.width <= 0:
        fail("model.width", "must be positive")

    def positive_ints(values) -> bool:
        return all(isinstance(v, int) and v > 0 for v in values)

    if len(m.depths) != 4 or not positive_ints(m.depths):
        fail("model.depths", "must be 4 positive block counts, one per ResNet stage")
    if not m.window_sizes or not positive_ints(m.window_sizes):
        fail("model.window_sizes", "must be one or more positive window sizes, e.g. (2, 4)")


def view_config(config: ml_collections.ConfigDict, *, train: bool) -> ViewConfig:
    """How the data block sizes images: training (random crop, flip) or evaluation views."""
    d = config.data
    return ViewConfig(d.resize, d.crop, bool(d.flip) and train, bool(d.get("jpeg_draft", False)))


def decode_workers(config: ml_collections.ConfigDict) -> Workers:
    """The host decoding of ``data.num_workers`` / ``data.worker_processes``."""
    return Workers(config.data.num_workers, config.data.worker_processes)


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
    """The model's compute dtype (parameters, loss and metrics stay float32)."""
    return jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32


def create_model(
    config: ml_collections.ConfigDict, num_classes: int, centers: np.ndarray | None = None
) -> CSCENet:
    """The configured CSCE-Net; centres from ``hash_centers(num_classes, bits, centers_seed)``."""
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
        kernels=m.kernels,
        rngs=nnx.Rngs(config.seed),
    )


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


def loss_options(config: ml_collections.ConfigDict, multilabel: bool) -> dict[str, Any]:
    """Keyword arguments of :func:`csce_jax.losses.csce_loss` for this config."""
    lc = config.loss
    return {
        "multilabel": multilabel,
        "margin_type": lc.margin_type,
        "scale": lc.scale,
        "ce_weight": lc.ce,
        "quan_weight": lc.quan,
        "quan_type": lc.quan_type,
        "multilabel_loss": lc.multilabel_loss,
        "estimator": config.dsf.estimator,
        "clip_all_logits": config.release_compat.clip_all_logits,
        "balance": balance(config),
        "temperature": config.dsf.temperature,
    }


def fold_key(seed: int, step: jax.Array) -> jax.Array:
    """The per-step random key: a pure function of (seed, step), so resume is exact."""
    return jax.random.fold_in(jax.random.key(seed), step)
