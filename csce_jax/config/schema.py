"""Every config field in one table: its default, allowed values, whether a resumed run may
change it, and what it means.

The defaults are the PyTorch release's recipe where it has one. :func:`base_config` builds a
config from the table, :func:`check_config` checks one against it (types, allowed values,
ranges, and the few rules between fields), and :func:`resumable` is the resume policy. Pure
Python: it is read while the command line is parsed, before JAX loads.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import ml_collections

from csce_jax.errors import ConfigError

Check = Callable[[Any], str | None]  # a value -> what is wrong with it, or None


def positive(v: Any) -> str | None:
    return (
        None
        if isinstance(v, int) and not isinstance(v, bool) and v > 0
        else "must be a positive integer"
    )


def at_least(low: float) -> Check:
    return lambda v: None if v >= low else f"must be >= {low:g}"


def fraction(v: Any) -> str | None:
    return None if 0 <= v < 1 else "must be in [0, 1)"


def steps(v: Any) -> str | None:  # 0 is allowed where config.epochs sets it (check_config)
    return None if isinstance(v, int) and v >= 0 else "must be a positive integer"


def code_length(v: Any) -> str | None:
    return positive(v) or (None if v >= 2 else "a code needs at least 2 bits")


def exit_status(v: Any) -> str | None:
    return None if isinstance(v, int) and 0 <= v <= 255 else "must be an exit status in 0..255"


def positive_number(v: Any) -> str | None:
    ok = isinstance(v, int | float) and math.isfinite(v) and v > 0
    return None if ok else "must be a positive finite number"


def finite_in(low: float, high: float, *, low_open: bool = False, high_open: bool = True):
    """A finite number in the interval from ``low`` to ``high`` (open ends as flagged)."""
    left, right = "(" if low_open else "[", ")" if high_open else "]"

    def check(v: Any) -> str | None:
        ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        ok = ok and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
        return None if ok else f"must be a finite number in {left}{low:g}, {high:g}{right}"

    return check


def topk_cutoff(v: Any) -> str | None:
    ok = isinstance(v, int) and not isinstance(v, bool) and v >= -1
    return None if ok else "must be 0 (the protocol's), -1 (the whole database) or k > 0"


def block_counts(v: Any) -> str | None:
    ok = len(v) == 4 and all(isinstance(d, int) and d > 0 for d in v)
    return None if ok else "must be 4 positive block counts, one per ResNet stage"


def window_sizes(v: Any) -> str | None:
    ok = len(v) > 0 and all(isinstance(w, int) and w > 0 for w in v)
    return None if ok else "must be one or more positive window sizes, e.g. (2, 4)"


def step_window(v: Any) -> str | None:
    ok = isinstance(v, tuple | list) and len(v) == 2
    ok = ok and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
    ok = ok and (tuple(v) == (0, 0) or 1 <= v[0] < v[1])
    return None if ok else "must be (first, stop) with 1 <= first < stop, or (0, 0) for none"


@dataclasses.dataclass(frozen=True)
class Field:
    """One config field. ``resumable``: a resumed run may change it (it leaves the mathematics
    of training alone)."""

    key: str
    default: Any
    doc: str
    choices: tuple[Any, ...] | None = None
    check: Check | None = None
    resumable: bool = False


def _f(key, default, doc, *, choices=None, check=None, resumable=False) -> Field:
    return Field(key, default, doc, choices, check, resumable)


# fmt: off
FIELDS: tuple[Field, ...] = (
    # --- the run -------------------------------------------------------------------------
    _f("seed", 0, "initialisation, data order and margins"),
    _f("bits", 64, "code length K", check=code_length),
    _f("centers_seed", 0, "seed of the hash centres"),
    _f("batch_size", 50, "global training batch, over all devices and hosts", check=positive),
    _f("eval_batch_size", 100, "global encoding batch", check=positive, resumable=True),
    _f("total_steps", 10_000, "training steps (0: from epochs)", check=steps, resumable=True),
    _f("log_every_steps", 50, "training rows in metrics.jsonl and the log", check=positive, resumable=True),
    _f("eval_every_steps", 1000, "validation cadence (0: from epochs)", check=steps, resumable=True),
    _f("checkpoint_every_steps", 1000, "checkpoint cadence (0: from epochs)", check=steps, resumable=True),
    _f("epochs", 0, "passes over the training split; sets the step counts left at 0", check=at_least(0), resumable=True),
    _f("eval_every_epochs", 5, "validation cadence in epochs (with epochs > 0)", check=positive, resumable=True),
    _f("checkpoint_every_epochs", 1, "checkpoint cadence in epochs (with epochs > 0)", check=positive, resumable=True),
    _f("keep_checkpoints", 2, "the latest N are kept, and the best by validation mAP", check=positive, resumable=True),
    _f("preempted_exit_code", 75, "exit status after SIGTERM/SIGINT (EX_TEMPFAIL: rerun me)", check=exit_status, resumable=True),
    _f("distributed", False, "call jax.distributed.initialize() (also: CSCE_DISTRIBUTED=1)", resumable=True),
    _f("coordinator_address", "", "HOST:PORT of process 0, with num_processes and process_id", resumable=True),
    _f("num_processes", 0, "with coordinator_address: the job's process count", resumable=True),
    _f("process_id", -1, "with coordinator_address: this process's index", resumable=True),
    _f("profile_steps", (0, 0), "a jax.profiler trace of steps first..stop-1 into <workdir>/profile/ ((0, 0): none)", check=step_window, resumable=True),
    _f("compilation_cache", "auto", 'XLA\'s persistent cache: "auto" ($CSCE_JAX_CACHE/xla), a path, or "" (off)', resumable=True),
    # --- data ----------------------------------------------------------------------------
    _f("data.name", "imagenet100", "the data set (docs/data.md)"),
    _f("data.data_dir", "", "tfds data_dir", resumable=True),
    _f("data.download", False, "let tfds download and prepare a missing data set", resumable=True),
    _f("data.manual_dir", "", "official files of aircraft, nabirds, vegfru, oxford_flowers102", resumable=True),
    _f("data.list_dir", "", "DeepHash list files train.txt, database.txt, test.txt[, val.txt]", resumable=True),
    _f("data.image_root", "", "root of the list files' paths, or an image folder", resumable=True),
    _f("data.multilabel", "auto", "list files: auto (any line with several 1s), true, false", choices=("auto", "true", "false")),
    _f("data.prepared", "", "a record set of csce_jax.data.prepare (the same pixels)", resumable=True),
    _f("data.resize", 256, "shorter side before cropping", check=positive),
    _f("data.jpeg_draft", False, "decode JPEGs at reduced DCT scale (faster, other pixels)"),
    _f("data.crop", 224, "the network's input size", check=positive),
    _f("data.flip", True, "random horizontal flips in training"),
    _f("data.keep_banner", False, "aircraft: keep the 20-pixel copyright banner"),
    _f("data.val_fraction", 0.1, "seeded, stratified hold-out of the training set", check=fraction),
    _f("data.query_fraction", 0.1, "image folders: share of images used as queries", check=fraction),
    _f("data.split_seed", 0, "seed of the validation and query hold-outs"),
    _f("data.topk", 0, "mAP cut-off: 0 the protocol's, -1 the whole database, k > 0 k", check=topk_cutoff),
    _f("data.skip_corrupt", False, "skip (and count) unreadable images", resumable=True),
    _f("data.verify", False, "decode every image once before training", resumable=True),
    _f("data.allow_size_mismatch", False, "accept split sizes other than the documented"),
    _f("data.num_workers", 4, "batches decoded at once on each host", check=positive, resumable=True),
    _f("data.worker_processes", True, "decode in processes (False: threads)", resumable=True),
    # --- model ---------------------------------------------------------------------------
    _f("model.width", 1.0, "channel multiplier of the ResNet-50 trunk", check=positive_number),
    _f("model.depths", (3, 4, 6, 3), "blocks per ResNet stage", check=block_counts),
    _f("model.window_sizes", (2, 4), "local windows of the patch features", check=window_sizes),
    _f("model.use_aspp", False, "the paper figure's ASPP block before the local attention"),
    _f("model.learn_centers", False, "train the hash centres"),
    _f("model.signt", 0.01, "threshold clip", check=finite_in(0, 1)),
    _f("model.dtype", "float32", "compute dtype (parameters stay float32)", choices=("float32", "bfloat16")),
    _f("model.remat", False, "rematerialise the backbone in the backward pass", resumable=True),
    _f("model.kernels", "auto", "layer implementations: auto, xla or cpu (same mathematics)", choices=("auto", "xla", "cpu"), resumable=True),
    _f("model.init_from", "", ".safetensors/.npz/.pth file or torchvision:IMAGENET1K_V1|V2", resumable=True),
    _f("model.init_scope", "auto", "what init_from loads: model, backbone, or auto", choices=("auto", "model", "backbone"), resumable=True),
    # --- loss, DSF, optimiser ------------------------------------------------------------
    _f("loss.margin_type", "arc", "additive angular (arc) or cosine margin", choices=("arc", "cos")),
    _f("loss.margin", 0.15, "the margin m (the mean, for the elastic margin)", check=finite_in(0, math.pi / 2)),
    _f("loss.margin_std", 0.125, "elastic margin (single-label)", check=finite_in(0, 1)),
    _f("loss.scale", 10.0, "logit scale s", check=finite_in(0, 1000, low_open=True, high_open=False)),
    _f("loss.ce", 1.0, "weight of the centre loss", check=finite_in(0, 1000, high_open=False)),
    _f("loss.quan", 1.0, "weight of the quantisation loss", check=finite_in(0, 1000, high_open=False)),
    _f("loss.quan_type", "cs", "quantisation loss: cosine (the release), l1 or l2", choices=("cs", "l1", "l2")),
    _f("loss.multilabel_loss", "label_smoothing", "multi-label centre loss", choices=("label_smoothing", "bce")),
    _f("dsf.estimator", "ste", "ste, or release (the release's frozen threshold)", choices=("ste", "release")),
    _f("dsf.temperature", 0.1, "the soft sign's temperature in training", check=finite_in(0, 100, low_open=True, high_open=False)),
    _f("optimizer.name", "rmsprop", "rmsprop has PyTorch's semantics", choices=("rmsprop", "adamw", "sgd")),
    _f("optimizer.lr", 1e-5, "peak learning rate", check=positive_number),
    _f("optimizer.weight_decay", 1e-5, "L2 added to the gradient (rmsprop, sgd); decoupled (adamw)", check=at_least(0)),
    _f("optimizer.momentum", 0.9, "sgd only"),
    _f("optimizer.schedule", "constant", "the rate after warm-up", choices=("constant", "cosine")),
    _f("optimizer.warmup_steps", 0, "linear warm-up from 0", check=at_least(0)),
    # --- the release's defects, each reproduced only when switched on (docs/model.md) -----
    _f("release_compat.fill_64bit", False, 'DSF fill decided by "> 32 positive" whatever K is'),
    _f("release_compat.raw_eval_band", False, "evaluation bands raw v"),
    _f("release_compat.clip_all_logits", False, "every logit through the arc clip round trip"),
    _f("release_compat.select_on_query", False, "best checkpoint by query mAP"),
    # --- the test suite's fault injection: after step signal_at_step, send `signal` to this
    # process (or to its whole process group, as a terminal's Ctrl-C does) ----------------
    _f("testing.signal_at_step", 0, "0 = off", check=at_least(0), resumable=True),
    _f("testing.signal", "SIGTERM", "the signal sent", choices=("SIGTERM", "SIGINT", "SIGKILL"), resumable=True),
    _f("testing.signal_group", False, "to the whole process group (as Ctrl-C)", resumable=True),
)
# fmt: on

BY_KEY: dict[str, Field] = {f.key: f for f in FIELDS}
GROUPS: tuple[str, ...] = tuple(dict.fromkeys(f.key.split(".")[0] for f in FIELDS if "." in f.key))


def choices(key: str) -> tuple[Any, ...]:
    """The allowed values of ``key`` (a field with choices)."""
    found = BY_KEY[key].choices
    assert found is not None, key
    return found


def base_config() -> ml_collections.ConfigDict:
    """Every field at its default (the release's recipe where it has one)."""
    tree: dict[str, Any] = {}
    for f in FIELDS:
        *groups, leaf = f.key.split(".")
        node = tree
        for g in groups:
            node = node.setdefault(g, {})
        node[leaf] = f.default
    return ml_collections.ConfigDict(tree)


def data_config(name: str = "digits") -> ml_collections.ConfigDict:
    """The ``data`` block at its defaults, for data set ``name``."""
    block = base_config().data
    block.name = name
    return block


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: leaf} of a nested dict or ConfigDict."""
    if isinstance(tree, dict | ml_collections.ConfigDict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def resumable(key: str) -> bool:
    """Whether a resumed run may change ``key``. A key the schema no longer has computes
    nothing now, so its disappearance from a config is no change of mathematics."""
    return key not in BY_KEY or BY_KEY[key].resumable


def unknown_key(dotted: str) -> str | None:
    """The message for a key (``a.b``) the schema does not have, or None."""
    if dotted in BY_KEY:
        return None
    if dotted in GROUPS:
        return f"config.{dotted} is a group, not a field: set one of its keys"
    group = dotted.rpartition(".")[0]
    keys = sorted(k.split(".")[-1] for k in BY_KEY if k.rpartition(".")[0] == group)
    if group and group not in GROUPS:
        keys = sorted(k.split(".")[0] for k in BY_KEY)
        return f"unknown config key config.{dotted}; valid groups and keys: {', '.join(dict.fromkeys(keys))}"
    where = f"config.{group}" if group else "config"
    return f"unknown config key config.{dotted}; valid keys of {where}: {', '.join(keys)}"


def check_config(config: ml_collections.ConfigDict, device_count: int, process_count: int) -> None:
    """Reject a config that is not the schema's, or a bad value, naming the key, before any data
    is read or code compiled."""
    values = flatten(config)
    for key in values:
        if (message := unknown_key(key)) is not None:
            raise ConfigError(message)
    for f in FIELDS:
        if f.key not in values:
            raise ConfigError(f"config.{f.key} is missing (a config starts from base_config())")
        value = values[f.key]
        problem = None
        if f.choices is not None and value not in f.choices:
            problem = f"must be one of {f.choices}"
        elif f.check is not None:
            try:
                problem = f.check(value)
            except TypeError:
                problem = f"has the wrong type ({type(value).__name__})"
        if problem:
            raise ConfigError(f"config.{f.key}={value!r}: {problem}")
    _check_between_fields(config, device_count, process_count)


def _check_between_fields(config: ml_collections.ConfigDict, devices: int, processes: int) -> None:
    def fail(key: str, msg: str) -> None:
        raise ConfigError(f"config.{key}={flatten(config)[key]!r}: {msg}")

    if config.epochs == 0:
        for key in ("total_steps", "eval_every_steps", "checkpoint_every_steps"):
            if config[key] == 0:
                fail(key, "must be a positive integer (or 0 with config.epochs > 0)")
    for key in ("batch_size", "eval_batch_size"):
        if config[key] % devices:
            fail(key, f"must be divisible by the {devices} devices")
        if config[key] % processes:
            fail(key, f"must be divisible by the {processes} processes")
    window = max(config.model.window_sizes)
    if -(-config.data.crop // 32) < window:  # the trunk's output: crop / 32, rounded up
        fail(
            "data.crop",
            f"too small for {window}x{window} windows: need at least {32 * (window - 1) + 1} pixels",
        )
    if config.total_steps:
        check_profile_window(config)
    if config.data.resize < config.data.crop:
        fail("data.resize", f"must be >= data.crop ({config.data.crop})")
    # Stage 3's output channels (csce_jax.models.resnet.stage_widths, times the expansion 4)
    # are cut into k x k windows of the patch features: each window size must divide them.
    f3_channels = 4 * max(1, round(256 * config.model.width))
    for k in config.model.window_sizes:
        if f3_channels % (k * k):
            fail(
                "model.width",
                f"gives {f3_channels} stage-3 channels (4 x round(256 x width)), which "
                f"{k}x{k} windows cannot divide: a multiple of {k * k} is needed (a wider "
                "model.width, or other model.window_sizes)",
            )


def resolve_epochs(config: ml_collections.ConfigDict, train_size: int) -> int:
    """Set the step counts left at 0 from ``config.epochs`` at the run's batch size (one
    epoch: ``train_size // batch_size`` steps, at least 1); returns the steps per epoch."""
    per_epoch = max(1, train_size // config.batch_size)
    if config.epochs > 0:
        for count, epochs in (
            ("total_steps", "epochs"),
            ("eval_every_steps", "eval_every_epochs"),
            ("checkpoint_every_steps", "checkpoint_every_epochs"),
        ):
            if config[count] == 0:
                config[count] = config[epochs] * per_epoch
        check_profile_window(config)
    return per_epoch


def check_profile_window(config: ml_collections.ConfigDict) -> None:
    """A profile window that begins after the run's last step would trace nothing."""
    first = config.profile_steps[0]
    if first > config.total_steps:
        raise ConfigError(
            f"config.profile_steps={tuple(config.profile_steps)!r}: begins after the run's last "
            f"step (config.total_steps={config.total_steps}): nothing would be traced"
        )


def from_json(tree: dict[str, Any], where: str) -> ml_collections.ConfigDict:
    """A config saved as JSON (a run's ``config.json``) back as a ConfigDict: the schema's
    fields over their defaults, lists made tuples again; keys the schema no longer has are
    dropped (they compute nothing now)."""
    config = base_config()
    for key, value in flatten(tree).items():
        if key not in BY_KEY:
            continue
        *groups, leaf = key.split(".")
        node = config
        for g in groups:
            node = node[g]
        if isinstance(BY_KEY[key].default, tuple):
            value = tuple(value)
        try:
            node[leaf] = value
        except TypeError as e:
            raise ConfigError(f"{where}: config.{key}={value!r}: {e}") from None
    return config
