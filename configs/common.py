"""Fields and helpers shared by every config: the full field set with the release's recipe,
config-argument parsing, the release-compat switch and the per-data-set recipe builder.

``configs/default.py`` (the embedded demo) and each data-set config start from
:func:`base_config`. What each field means: ``docs/training.md``.
"""

from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """``"bits=48,release"`` -> ConfigDict(bits=48, release=True) over ``defaults``.

    An unknown name or a value of the wrong type raises ``ValueError`` naming it.
    """
    out = ml_collections.ConfigDict(defaults)
    for part in (arg or "").split(","):
        part = part.strip()
        if not part:
            continue
        key, eq, value = part.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; valid: {', '.join(defaults)}")
        kind = type(defaults[key])
        if not eq:
            if kind is not bool:
                raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
            out[key] = True
        elif kind is bool:
            if value.lower() not in ("1", "true", "yes", "0", "false", "no"):
                raise ValueError(f"config argument {key}={value!r}: expected true or false")
            out[key] = value.lower() in ("1", "true", "yes")
        else:
            try:
                out[key] = kind(value)
            except ValueError:
                raise ValueError(
                    f"config argument {key}={value!r}: expected {kind.__name__}"
                ) from None
    return out


def data_config(name: str = "digits") -> ml_collections.ConfigDict:
    """The ``data`` block: which data set and how its images are served."""
    return ml_collections.ConfigDict(
        {
            "name": name,
            "data_dir": "",  # tfds data_dir (tfds data sets)
            "download": False,  # let tfds download and prepare a missing data set
            "manual_dir": "",  # official files of aircraft, nabirds, vegfru, oxford_flowers102
            "list_dir": "",  # DeepHash list files train.txt, database.txt, test.txt[, val.txt]
            "image_root": "",  # root of the list files' paths, or an image folder
            "multilabel": "auto",  # name=lists: auto (any line with several 1s), true, false
            # a record set written by `python -m csce_jax.data.prepare` (decoded, resized
            # images): read instead of the image files, the same pixels
            "prepared": "",
            "resize": 256,  # shorter side before cropping
            "jpeg_draft": False,  # decode JPEGs at reduced DCT scale (faster, other pixels)
            "crop": 224,  # the network's input size
            "flip": True,
            "keep_banner": False,  # aircraft: keep the 20-pixel copyright banner at the bottom
            "val_fraction": 0.1,  # seeded, stratified hold-out of the training set
            "query_fraction": 0.1,  # image folders only: share of images used as queries
            "split_seed": 0,
            "topk": 0,  # mAP cut-off: 0 = the protocol's, -1 = whole database, k > 0 = k
            "skip_corrupt": False,  # skip (and count) unreadable images instead of failing
            "verify": False,  # decode every image once before training (csce_jax.data.verify)
            "allow_size_mismatch": False,  # accept split sizes that differ from the documented
            "num_workers": 4,  # batches decoded at once on each host
            "worker_processes": True,  # decode in processes (False: threads)
        }
    )


def base_config() -> ml_collections.ConfigDict:
    """Every field, with the release's recipe where it has one."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.bits = 64
    c.centers_seed = 0
    c.batch_size = 50  # global, over all devices and hosts
    c.eval_batch_size = 100
    c.total_steps = 10_000
    c.log_every_steps = 50
    c.eval_every_steps = 1000
    c.checkpoint_every_steps = 1000
    # Counting in passes over the training split instead: with epochs > 0, each of the three
    # step counts above left at 0 is set when the data are loaded, at the run's batch size:
    # total_steps = epochs * (training images // batch_size), and so on.
    c.epochs = 0
    c.eval_every_epochs = 5
    c.checkpoint_every_epochs = 1
    c.keep_checkpoints = 2  # the latest N are kept, and the best by validation mAP
    c.preempted_exit_code = 75  # exit status after SIGTERM/SIGINT (EX_TEMPFAIL: rerun me)
    c.distributed = False  # call jax.distributed.initialize() (also: CSCE_DISTRIBUTED=1)
    c.coordinator_address = ""  # HOST:PORT of process 0; with num_processes and process_id
    c.num_processes = 0
    c.process_id = -1
    # XLA's persistent compilation cache: "auto" = $CSCE_JAX_CACHE/xla (~/.cache/csce_jax/xla),
    # a path, or "" to disable. A restart or a second run then skips recompiling.
    c.compilation_cache = "auto"
    c.data = data_config("imagenet100")
    c.model = ml_collections.ConfigDict(
        {
            "width": 1.0,
            "depths": (3, 4, 6, 3),
            "window_sizes": (2, 4),
            "use_aspp": False,  # the paper figure's ASPP block before the local attention
            "learn_centers": False,
            "signt": 0.01,  # threshold clip
            "dtype": "float32",  # compute dtype: float32 or bfloat16 (parameters stay float32)
            "remat": False,  # rematerialise the backbone in the backward pass (large batches)
            # layer implementations: "auto" (CPU-tuned on a CPU backend, plain XLA elsewhere),
            # "xla" or "cpu"; the same parameters and mathematics (docs/performance.md)
            "kernels": "auto",
            "init_from": "",  # .safetensors/.npz/.pth file or torchvision:IMAGENET1K_V1|V2
            # what init_from loads: "model" (all), "backbone", or "auto" (backbone for
            # torchvision's ImageNet weights, the whole model for any other file)
            "init_scope": "auto",
        }
    )
    c.loss = ml_collections.ConfigDict(
        {
            "margin_type": "arc",
            "margin": 0.15,
            "margin_std": 0.125,  # elastic margin (single-label)
            "scale": 10.0,
            "ce": 1.0,
            "quan": 1.0,
            "quan_type": "cs",
            "multilabel_loss": "label_smoothing",
        }
    )
    c.dsf = ml_collections.ConfigDict({"estimator": "ste", "temperature": 0.1})
    c.optimizer = ml_collections.ConfigDict(
        {
            "name": "rmsprop",
            "lr": 1e-5,
            "weight_decay": 1e-5,
            "momentum": 0.9,  # sgd only
            "schedule": "constant",  # or cosine
            "warmup_steps": 0,
        }
    )
    # Each release defect that changes numbers, reproduced only when switched on
    # (docs/model.md). The DSF's frozen threshold is dsf.estimator="release".
    c.release_compat = ml_collections.ConfigDict(
        {
            "fill_64bit": False,  # DSF fill decided by "> 32 positive" whatever K is
            "raw_eval_band": False,  # evaluation bands raw v (training bands 2*hardtanh(v))
            "clip_all_logits": False,  # every logit through the arc clip round trip
            "select_on_query": False,  # choose the best checkpoint by query mAP, not validation
        }
    )
    # Deterministic fault injection for the test suite: after step ``signal_at_step`` the run
    # sends itself ``signal`` (SIGTERM, SIGINT or SIGKILL). 0 = off.
    # The test suite's fault injection: after step signal_at_step, send `signal` to this process
    # (or, with signal_group, to its whole process group, as a terminal's Ctrl-C does).
    c.testing = ml_collections.ConfigDict(
        {"signal_at_step": 0, "signal": "SIGTERM", "signal_group": False}
    )
    return c


def apply_release(c: ml_collections.ConfigDict) -> None:
    """Switch every release-compat behaviour on (for port comparisons)."""
    c.dsf.estimator = "release"
    for key in c.release_compat:
        c.release_compat[key] = True


def release_recipe(
    name: str, arg: str | None, *, bits: int, epochs: int, train_size: int
) -> ml_collections.ConfigDict:
    """The release's recipe on data set ``name``: ResNet-50 from ImageNet weights, RMSprop
    lr 1e-5 / wd 1e-5, batch 50, 256 -> 224 crops, evaluation every 5 epochs.

    Config arguments: bits=K, release (all release-compat switches), aspp, estimator=ste|release,
    seed=N, epochs=N.
    """
    a = parse_arg(arg, bits=bits, release=False, aspp=False, estimator="ste", seed=0, epochs=epochs)
    c = base_config()
    c.seed = a.seed
    c.bits = a.bits
    c.data = data_config(name)
    c.model.init_from = "torchvision:IMAGENET1K_V1"
    c.model.use_aspp = a.aspp
    c.dsf.estimator = a.estimator
    # Steps follow from the training split and the batch size when the data are loaded
    # (``train_size`` is the documented count: at batch 50 it gives
    # ``epochs * (train_size // 50)`` steps).
    del train_size
    c.epochs = a.epochs
    c.total_steps = c.eval_every_steps = c.checkpoint_every_steps = 0
    c.eval_every_epochs, c.checkpoint_every_epochs = 5, 1
    c.log_every_steps = 50
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
    c.log_every_steps = 50
    c.eval_every_steps = c.checkpoint_every_steps = eval_every
    c.model.width = width
    c.model.depths = (1, 1, 1, 1)
    c.model.use_aspp = a.aspp
    c.optimizer.name = "adamw"
    c.optimizer.lr = lr
    c.optimizer.weight_decay = weight_decay
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = warmup_steps
    c.dsf.estimator = a.estimator
    if a.release:
        apply_release(c)
    return c
