"""Plan a run before renting it: the training and encoding steps of a config compiled ahead of
time for a target (a TPU slice described on any host, N CPU devices, this host's GPUs), and
what XLA reports of the compiled programs.

Nothing is run and no weight or image is made: the steps are lowered on abstract arrays
(``jax.ShapeDtypeStruct`` on the target's mesh) and compiled for the target's devices, as the
trainer would compile them there (the same ``make_train_step`` and ``make_encode_step``, the
same ('data',) mesh over every device of every host, the same shardings). Per device, the
report gives the argument, temporary, output and code bytes against the chip's memory; the
FLOPs per step by XLA's cost analysis beside our analytic count (``csce_jax.train.flops``); a
step-time lower bound from the chip's peak FLOP/s and memory bandwidth
(``csce_jax.runtime.chips``); and the collectives of the compiled program.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental.compilation_cache import compilation_cache

from csce_jax.config import check_config, resolve_epochs
from csce_jax.data.datasets import DATASETS
from csce_jax.errors import ConfigError
from csce_jax.models.layers import resolve_kernels
from csce_jax.planning.targets import Target
from csce_jax.retrieval.encoder import make_encode_step
from csce_jax.runs.builders import run_parts
from csce_jax.runs.parts import RunParts
from csce_jax.runs.state import TrainSetup, abstract_train_state
from csce_jax.runtime import chips, sharding
from csce_jax.train import flops
from csce_jax.train.step import make_train_step

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}
DTYPE_BYTES.update({"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8})
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_OP = re.compile(r"=\s*(.*?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_CONV = re.compile(r"=\s*([a-z]+\d*)\[[\d,]*\][^=]*?\s+convolution\(.*conv_general_dilated")
DEFAULT_MARGIN = 0.1  # of the device's memory kept free (XLA's own reservations, fragmentation)


@dataclasses.dataclass(frozen=True)
class Request:
    """What to plan: the batch per device (training and encoding), the class count and label
    kind of the data (from the data set's table unless given), and the memory margin."""

    per_device_batch: int
    per_device_eval_batch: int
    num_classes: int
    multilabel: bool
    margin: float = DEFAULT_MARGIN


def data_shape(config: ml_collections.ConfigDict, num_classes: int = 0) -> tuple[int, bool]:
    """(classes, multi-label) of the config's data set, without reading it: the data set's
    table, or ``num_classes`` for list files and folders (whose data decide it)."""
    spec = DATASETS.get(config.data.name)
    if spec is None:
        raise ConfigError(f"config.data.name={config.data.name!r}: not a data set")
    classes = num_classes or spec.num_classes
    if not classes:
        raise ConfigError(
            f"config.data.name={config.data.name!r}: its class count comes from the data; "
            "give it with --num_classes"
        )
    multilabel = spec.multilabel
    if multilabel is None:
        multilabel = config.data.multilabel == "true"
    return classes, bool(multilabel)


def planned_config(
    config: ml_collections.ConfigDict, target: Target, request: Request
) -> ml_collections.ConfigDict:
    """``config`` with the request's batches over the target's devices, checked as a launch on
    the target checks it (devices, hosts); step counts from epochs use the documented
    training-split size (they change no compiled shape)."""
    c = ml_collections.ConfigDict(config.to_dict())
    devices = len(target.devices)
    c.batch_size = request.per_device_batch * devices
    c.eval_batch_size = request.per_device_eval_batch * devices
    sizes = DATASETS[c.data.name].sizes or {}
    resolve_epochs(c, sizes.get("train", c.batch_size))
    check_config(c, devices, target.hosts)
    return c


def abstract_batch(
    mesh: jax.sharding.Mesh, config: ml_collections.ConfigDict, request: Request
) -> dict[str, jax.ShapeDtypeStruct]:
    """The training batch as the loader gives it, sharded over ('data',)."""
    b, crop, spec = config.batch_size, config.data.crop, sharding.data_sharded(mesh)
    label = (
        jax.ShapeDtypeStruct((b, request.num_classes), jnp.int8, sharding=spec)
        if request.multilabel
        else jax.ShapeDtypeStruct((b,), jnp.int32, sharding=spec)
    )
    return {
        "image": jax.ShapeDtypeStruct((b, crop, crop, 3), jnp.uint8, sharding=spec),
        "flip": jax.ShapeDtypeStruct((b,), jnp.bool_, sharding=spec),
        "label": label,
    }


def collectives(hlo: str) -> dict[str, dict[str, int]]:
    """{kind: {"count", "bytes"}} of the collectives in a compiled program's text: each
    instruction once (the step has no loop), its bytes those of its result (an asynchronous
    start counted once, with the gathered result where it carries its operand too)."""
    out = {k: {"count": 0, "bytes": 0} for k in COLLECTIVES}
    for line in hlo.splitlines():
        m = _OP.search(line)
        if m is None:
            continue
        arrays = [_bytes(d, dims) for d, dims in _ARRAY.findall(m[1])]
        if m[3] and m[2] != "all-reduce" and len(arrays) > 1:
            arrays = arrays[len(arrays) // 2 :]  # (operands, results) of an async start
        out[m[2]]["count"] += 1
        out[m[2]]["bytes"] += sum(arrays)
    return {k: v for k, v in out.items() if v["count"]}


def _bytes(dtype: str, dims: str) -> int:
    count = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
    return count * DTYPE_BYTES.get(dtype, 4)


def convolution_dtypes(hlo: str) -> dict[str, int]:
    """How many of the network's convolutions (XLA convolutions made from
    ``conv_general_dilated``, not the matrix products it also lowers to convolutions) produce
    each dtype: bf16 where the model computes in bfloat16."""
    counts: dict[str, int] = {}
    for m in _CONV.finditer(hlo):
        counts[m[1]] = counts.get(m[1], 0) + 1
    return counts


def tree_bytes(tree: Any) -> int:
    """Bytes of every array of a pytree (of arrays or ShapeDtypeStructs)."""
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _cost(compiled: Any) -> dict[str, float]:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return cost or {}


def program_figures(compiled: Any, chip: chips.Chip | None, dtype: str) -> dict[str, Any]:
    """Per-device memory, FLOPs, bytes accessed, collectives and the step-time lower bound of
    one compiled program."""
    mem = compiled.memory_analysis()
    args, out = mem.argument_size_in_bytes, mem.output_size_in_bytes
    alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
    code = mem.generated_code_size_in_bytes
    cost = _cost(compiled)
    hlo = compiled.as_text()
    figures: dict[str, Any] = {
        "argument_bytes": int(args),
        "output_bytes": int(out),
        "alias_bytes": int(alias),
        "temp_bytes": int(temp),
        "code_bytes": int(code),
        "total_bytes": int(args + out - alias + temp + code),
        "flops_xla": float(cost.get("flops", 0.0)) or None,
        "bytes_accessed": float(cost.get("bytes accessed", 0.0)) or None,
        "collectives": collectives(hlo),
        "convolutions": convolution_dtypes(hlo),
    }
    figures.update(step_bound(figures["flops_xla"], figures["bytes_accessed"], chip, dtype))
    return figures


def step_bound(
    flops_per_device: float | None,
    bytes_accessed: float | None,
    chip: chips.Chip | None,
    dtype: str,
) -> dict[str, float | None]:
    """The step can take no less than its FLOPs at the chip's peak, nor than its memory
    traffic at the chip's bandwidth: the larger of the two (None where the chip is unknown)."""
    if chip is None or not flops_per_device:
        return {"bound_s": None, "compute_bound_s": None, "memory_bound_s": None}
    compute = flops_per_device / chips.peak(chip, dtype)
    memory = (bytes_accessed or 0.0) / chip.hbm_bytes_per_s
    return {"bound_s": max(compute, memory), "compute_bound_s": compute, "memory_bound_s": memory}


class DoesNotFit(Exception):
    """The compiler refused the program: it needs more memory than the device has."""

    def __init__(self, message: str, required: int | None, seconds: float):
        super().__init__(message)
        self.required, self.seconds = required, seconds


_REQUIRED = re.compile(r"\(([\d.]+)([KMGT])\) exceeds available")


@contextlib.contextmanager
def _without_compilation_cache() -> Iterator[None]:
    """JAX's persistent compilation cache off for the block, as it was after. JAX decides once,
    at a process's first compile, whether the cache is used: the reset makes it decide again."""
    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", before)
        compilation_cache.reset_cache()


def _compile(fn: Any, *args: Any) -> tuple[Any, float]:
    """Lower and compile; JAX's persistent cache is left out: a program for devices this host
    does not have can be written to it but not read back (each later read warns). A program
    too large for the device raises :class:`DoesNotFit` (XLA:TPU refuses to compile it)."""
    start = time.perf_counter()
    try:
        with _without_compilation_cache():
            compiled = fn.lower(*args).compile()
    except jax.errors.JaxRuntimeError as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "RESOURCE_EXHAUSTED" not in message:
            raise
        m = _REQUIRED.search(message)
        scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
        required = int(float(m[1]) * scale[m[2]]) if m else None
        raise DoesNotFit(message, required, time.perf_counter() - start) from None
    return compiled, time.perf_counter() - start


def _refused(e: DoesNotFit) -> dict[str, Any]:
    """A step the compiler would not fit in the device's memory."""
    return {"compile_error": str(e), "total_bytes": e.required, "compile_s": e.seconds}


def _same_layout(shardings: Any, expected: Any) -> bool:
    pairs = zip(jax.tree.leaves(shardings), jax.tree.leaves(expected), strict=True)
    return all(s.is_equivalent_to(e.sharding, len(e.shape)) for s, e in pairs)


@dataclasses.dataclass
class AbstractRun:
    """A run laid on a target's devices without allocating it: the trainer's mesh over them,
    the training state (shapes and shardings only) with the layers of the target's platform,
    and the run's parts (the step's and encoding's options)."""

    mesh: jax.sharding.Mesh
    setup: TrainSetup
    parts: RunParts


def abstract_run(
    config: ml_collections.ConfigDict, target: Target, request: Request
) -> AbstractRun:
    """The run of ``config`` on ``target``'s devices, abstract (see :class:`AbstractRun`)."""
    mesh = sharding.make_mesh(devices=target.devices)
    parts = run_parts(
        config, request.num_classes, request.multilabel, abstract=True, platform=target.platform
    )
    setup = abstract_train_state(
        parts.model, parts.tx, parts.schedule, parts.fingerprint, sharding.replicated(mesh)
    )
    return AbstractRun(mesh, setup, parts)


def compile_train(
    config: ml_collections.ConfigDict,
    target: Target,
    request: Request,
    run: AbstractRun | None = None,
) -> dict[str, Any]:
    """The training step compiled for ``target``: its figures, compile time, and whether the
    checkpoint's layout (the state restored into replicated abstract targets) is the step's
    own input and output layout, so a restored state needs no reshard. ``run``: the
    :func:`abstract_run` already made for this config and target."""
    run = run or abstract_run(config, target, request)
    mesh, setup = run.mesh, run.setup
    step = make_train_step(setup.graphdef, setup.tx, setup.schedule, run.parts.step, mesh)
    try:
        compiled, seconds = _compile(step, setup.state, abstract_batch(mesh, config, request))
    except DoesNotFit as e:
        return _refused(e)
    figures = program_figures(compiled, target.chip, config.model.dtype)
    state_in = compiled.input_shardings[0][0]
    state_out = compiled.output_shardings[0]
    figures.update(
        compile_s=seconds,
        state_bytes=tree_bytes(setup.state),
        checkpoint_layout_is_step_layout=_same_layout(state_in, setup.state)
        and _same_layout(state_out, setup.state),
    )
    return figures


def compile_encode(
    config: ml_collections.ConfigDict,
    target: Target,
    request: Request,
    run: AbstractRun | None = None,
) -> dict[str, Any]:
    """The encoding step (forward, DSF, and the all-gather of codes and indices every host
    reads) compiled for ``target`` (``run``: as for :func:`compile_train`)."""
    run = run or abstract_run(config, target, request)
    mesh, setup, encode = run.mesh, run.setup, run.parts.encode
    step = make_encode_step(
        setup.eval_graphdef, mesh, raw_eval_band=encode.raw_eval_band, bal=encode.balance
    )
    b, crop, spec = config.eval_batch_size, config.data.crop, sharding.data_sharded(mesh)
    weights = (setup.state["params"], setup.state["rest"])
    images = jax.ShapeDtypeStruct((b, crop, crop, 3), jnp.uint8, sharding=spec)
    index = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=spec)
    try:
        compiled, seconds = _compile(step, weights, images, index)
    except DoesNotFit as e:
        return _refused(e)
    figures = program_figures(compiled, target.chip, config.model.dtype)
    figures["compile_s"] = seconds
    return figures


def plan_target(
    config: ml_collections.ConfigDict, target: Target, request: Request, *, encode: bool = True
) -> dict[str, Any]:
    """Everything ``csce-plan`` reports for one target (one JSON-able dict)."""
    c = planned_config(config, target, request)
    capacity = target.memory_bytes()
    usable = capacity * (1 - request.margin) if capacity else None
    per_image = flops.model_flops_per_image(c, request.num_classes, platform=target.platform)
    run = abstract_run(c, target, request)  # one abstract state for both steps
    train = compile_train(c, target, request, run)
    _add_derived(train, per_image["train"] * request.per_device_batch, request.per_device_batch)
    report: dict[str, Any] = {
        **describe(target),
        "dtype": c.model.dtype,
        "kernels": resolve_kernels(c.model.kernels, target.platform),
        "per_device_batch": request.per_device_batch,
        "global_batch": c.batch_size,
        "host_batch": c.batch_size // target.hosts,
        "per_device_eval_batch": request.per_device_eval_batch,
        "memory_per_device_bytes": capacity,
        "margin": request.margin,
        "train": train,
        "fits": _fits(train, usable),
    }
    if encode:
        enc = compile_encode(c, target, request, run)
        _add_derived(
            enc, per_image["forward"] * request.per_device_eval_batch, request.per_device_eval_batch
        )
        report["encode"] = enc
        report["fits"] = report["fits"] and _fits(enc, usable)
    return report


def _fits(figures: dict[str, Any], usable: float | None) -> bool:
    if "compile_error" in figures:
        return False
    return usable is None or figures["total_bytes"] <= usable


def describe(target: Target) -> dict[str, Any]:
    """The target's name, platform, chip and host layout."""
    chip = target.chip
    return {
        "target": target.name,
        "topology": target.topology,
        "platform": target.platform,
        "device_kind": target.device_kind,
        "chip": chip.name if chip else None,
        "chip_source": chip.source if chip else None,
        "devices": len(target.devices),
        "hosts": target.hosts,
        "devices_per_host": target.devices_per_host,
    }


def _add_derived(figures: dict[str, Any], analytic: float, batch: int) -> None:
    """Our analytic FLOPs beside XLA's, and the best images/s per device the bound allows."""
    figures["flops_analytic"] = analytic
    if "compile_error" in figures:
        return
    xla = figures["flops_xla"]
    figures["flops_xla_over_analytic"] = xla / analytic if xla and analytic else None
    bound = figures["bound_s"]
    figures["images_per_s_per_device_bound"] = batch / bound if bound else None


def fit_batch(
    config: ml_collections.ConfigDict,
    target: Target,
    request: Request,
    *,
    limit: int = 4096,
    log: Any = None,
    known: dict[int, float] | None = None,
) -> dict[str, Any]:
    """The largest per-device training batch whose compiled step fits the device's memory
    (less the margin), found by compiling: a bracket [fits, does not fit] narrowed by
    interpolating the measured memory, which grows almost linearly with the batch, so a few
    compiles suffice (``known``: memory already measured, by batch). Near the limit XLA:TPU
    trades speed for memory, so the memory flattens there and a batch past it is refused by
    the compiler: the search then bisects. Returns {"largest_per_device_batch",
    "total_bytes", "usable_bytes", "compiles", "measured"}."""
    capacity = target.memory_bytes()
    if not capacity:
        raise ConfigError(f"--target {target.name}: its memory is unknown, nothing to fit to")
    usable = capacity * (1 - request.margin)
    measured: dict[int, float] = dict(known or {})
    compiled = [0]

    def total(batch: int) -> float:
        """The batch's memory; one the compiler refused counts as its stated need (or as
        too much, where it states none)."""
        if batch not in measured:
            r = dataclasses.replace(request, per_device_batch=batch)
            got = compile_train(planned_config(config, target, r), target, r)
            need = got["total_bytes"]
            if "compile_error" in got:
                need = max(need or 0, capacity + 1)
            measured[batch] = need
            compiled[0] += 1
            if log is not None:
                log(batch, measured[batch], usable)
        return measured[batch]

    lo, hi = 0, None  # lo fits (0: nothing known to fit), hi does not
    b = request.per_device_batch
    while hi is None and b <= limit:
        if total(b) <= usable:
            lo = b
            b = _grow(measured, lo, usable, limit)
        else:
            hi = b
    while hi is not None and hi - lo > 1:
        b = _narrow(measured, lo, hi, usable)
        if total(b) <= usable:
            lo = b
        else:
            hi = b
    return {
        "largest_per_device_batch": lo,
        "total_bytes": measured.get(lo),
        "usable_bytes": int(usable),
        "compiles": compiled[0],
        "measured": {str(k): v for k, v in sorted(measured.items())},
    }


def _line(measured: dict[int, float], usable: float, upto: int | None = None) -> float | None:
    """The batch where the line through the two largest measured batches (at most ``upto``)
    reaches ``usable``; None where the memory did not grow between them."""
    points = sorted((b, m) for b, m in measured.items() if upto is None or b <= upto)[-2:]
    if len(points) < 2:
        return None
    (b1, m1), (b2, m2) = points
    if m2 <= m1:
        return None  # flat: near the limit XLA:TPU trades speed for memory
    return b1 + (usable - m1) * (b2 - b1) / (m2 - m1)


def _grow(measured: dict[int, float], lo: int, usable: float, limit: int) -> int:
    """The next batch to try above ``lo`` (which fits): a little past the line's estimate,
    and at least a quarter more than ``lo`` (memory can stay flat for a while), at most
    double."""
    guess = _line(measured, usable, upto=lo)
    step = 2 * lo if guess is None else max(int(guess * 1.05) + 1, int(lo * 1.25))
    return min(max(step, lo + 1), 2 * lo, limit + 1)


def _narrow(measured: dict[int, float], lo: int, hi: int, usable: float) -> int:
    """The next batch inside (lo, hi): the line's estimate, kept in the middle half of the
    bracket so that it shrinks by a quarter at least."""
    guess = _line({b: measured[b] for b in (lo, hi) if b in measured}, usable)
    quarter = (hi - lo) // 4
    low, high = lo + max(1, quarter), hi - max(1, quarter)
    if guess is None or low > high:
        return (lo + hi) // 2
    return min(max(int(guess), low), high)
