"""The recipes presets are made of: the release's (one definition, also used by the PyTorch
comparison and the benchmarks), the CPU presets', and the ``path.py:arg`` argument parser."""

from __future__ import annotations

import ml_collections

from csce_jax.config.schema import base_config, data_config

RELEASE_OPTIMIZER = {
    "name": "rmsprop",
    "lr": 1e-5,
    "weight_decay": 1e-5,
    "schedule": "constant",
    "warmup_steps": 0,
}


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """``"bits=48,release"`` -> ConfigDict(bits=48, release=True) over ``defaults``.

    An unknown name or a value of the wrong type raises ``ValueError`` naming it.
    """
    out = ml_collections.ConfigDict(defaults)
    for part in (arg or "").split(","):
        key, eq, value = (s.strip() for s in part.partition("="))
        if not key:
            continue
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; valid: {', '.join(defaults)}")
        kind = type(defaults[key])
        if kind is bool:
            if eq and value.lower() not in ("1", "true", "yes", "0", "false", "no"):
                raise ValueError(f"config argument {key}={value!r}: expected true or false")
            out[key] = not eq or value.lower() in ("1", "true", "yes")
            continue
        if not eq:
            raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
        try:
            out[key] = kind(value)
        except ValueError:
            raise ValueError(f"config argument {key}={value!r}: expected {kind.__name__}") from None
    return out


def apply_release(c: ml_collections.ConfigDict) -> None:
    """Switch every release-compat behaviour on (the release's DSF and its defects)."""
    c.dsf.estimator = "release"
    for key in c.release_compat:
        c.release_compat[key] = True


def release_training(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``c`` trained exactly as the release trains: RMSprop (lr 1e-5, weight decay 1e-5,
    constant rate), float32, every release-compat switch on. For port comparisons."""
    c.optimizer.update(RELEASE_OPTIMIZER)
    c.model.dtype = "float32"
    apply_release(c)
    return c


def release_recipe(
    name: str, arg: str | None, *, bits: int, epochs: int
) -> ml_collections.ConfigDict:
    """The release's recipe on data set ``name``: ResNet-50 from ImageNet weights, RMSprop
    lr 1e-5 / wd 1e-5, batch 50, 256 -> 224 crops, evaluation every 5 epochs; the step counts
    follow from ``epochs`` and the training split when the data are loaded.

    Config arguments: bits=K, release (all release-compat switches), aspp, estimator=ste|release,
    seed=N, epochs=N.
    """
    a = parse_arg(arg, bits=bits, release=False, aspp=False, estimator="ste", seed=0, epochs=epochs)
    c = base_config()
    c.seed, c.bits = a.seed, a.bits
    c.data = data_config(name)
    c.model.init_from = "torchvision:IMAGENET1K_V1"
    c.model.use_aspp = a.aspp
    c.optimizer.update(RELEASE_OPTIMIZER)
    c.dsf.estimator = a.estimator
    c.epochs = a.epochs
    c.total_steps = c.eval_every_steps = c.checkpoint_every_steps = 0
    c.eval_every_epochs, c.checkpoint_every_epochs = 5, 1
    if a.release:
        apply_release(c)
    return c


def small_cpu_recipe(
    c: ml_collections.ConfigDict,
    a: ml_collections.ConfigDict,
    *,
    width: float,
    steps: int,
    eval_every: int,
    lr: float,
    weight_decay: float,
    warmup_steps: int,
) -> ml_collections.ConfigDict:
    """The CPU presets' recipe on ``c``: a narrow CSCE-Net (one block per stage), batch 64,
    AdamW with a cosine schedule, and the config arguments ``a`` (bits, seed, aspp,
    estimator, release)."""
    c.seed, c.bits = a.seed, a.bits
    c.batch_size = 64
    c.total_steps = steps
    c.eval_every_steps = c.checkpoint_every_steps = eval_every
    c.model.width = width
    c.model.depths = (1, 1, 1, 1)
    c.model.use_aspp = a.aspp
    c.optimizer.update(
        name="adamw", lr=lr, weight_decay=weight_decay, schedule="cosine", warmup_steps=warmup_steps
    )
    c.dsf.estimator = a.estimator
    if a.release:
        apply_release(c)
    return c
