"""Training: the loop around the jitted step (resume, logging, evaluation, checkpoints, stopping).

The step (:mod:`csce_jax.train.step`, built from the config's :class:`StepOptions`) is a pure
function of (state, batch) under ``jax.jit`` on a ('data',) mesh over every
device of every host: parameters replicated, the batch sharded, the state donated; its randomness
(the elastic margins) comes from ``fold_in(key(seed), step)``. The data order is a function of
(seed, step), so restarting from a checkpoint replays nothing and skips nothing: N steps straight
and N/2 + restart + N/2 give the same parameters, bit for bit on CPU.

Outputs in the workdir (``docs/training.md``): ``config.json`` and ``config_history.jsonl``,
``metrics.jsonl``, TensorBoard summaries (``tensorboard/``) and ``checkpoints/``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import json
import math
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
from absl import logging

from csce_jax.config import check_config, resolve_epochs
from csce_jax.data import RetrievalData, TrainLoader, load_data
from csce_jax.data.pipeline import TrainLoaderArgs
from csce_jax.data.verify import verify_data
from csce_jax.errors import CheckpointError, ConfigError, NonFiniteLossError, WorkdirError
from csce_jax.retrieval.encoder import Encoder
from csce_jax.retrieval.evaluator import RetrievalEvaluator
from csce_jax.runs import builders
from csce_jax.runs.checkpoints import Checkpoints
from csce_jax.runs.parts import RunParts
from csce_jax.runs.reader import RunReader
from csce_jax.runs.state import TrainSetup, abstract_train_state, check_centers, create_train_state
from csce_jax.runs.writer import RunWriter
from csce_jax.runtime import hostmem, sharding, startup
from csce_jax.train import flops
from csce_jax.train import step as step_lib
from csce_jax.train.clock import Clock, evaluations_left
from csce_jax.train.first_compile import compile_first
from csce_jax.train.preemption import MAX_IN_FLIGHT, Preempted, StopSignals
from csce_jax.train.profile import ProfileWindow
from csce_jax.train.writers import Writers

PREFETCH = 2  # sharded batches placed on the devices ahead of the step


@dataclasses.dataclass
class Run:
    """Everything one training run works with, set up by :func:`start_run`."""

    config: ml_collections.ConfigDict
    folder: RunWriter
    data: RetrievalData
    parts: RunParts
    setup: TrainSetup
    mesh: jax.sharding.Mesh
    ckpts: Checkpoints
    writers: Writers
    select: RetrievalEvaluator  # the periodic evaluation that selects the best checkpoint
    final: RetrievalEvaluator  # query against database: the run's final row
    loader: TrainLoader
    start: int
    best_map: float = -math.inf
    best_step: int | None = None
    finished: dict[str, Any] | None = None
    train_flops: float | None = None  # per image, where the devices' peak is known (for mfu)
    peak_flops: float | None = None

    @property
    def select_on(self) -> str:
        return "query" if self.select is self.final else "validation"

    def skipped_images(self) -> int:
        return len(self.loader.corrupt.names | self.select.encoder.skipped)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, start_over: bool = False
) -> dict[str, Any]:
    """Train (or resume) ``config`` in ``workdir``; returns the final metrics row, or
    ``{"step", "preempted": True}`` when a signal stopped it (every checkpoint whole).
    ``start_over``: set every checkpoint of the folder aside and train from step 0."""
    run = None
    with StopSignals(config.log_every_steps) as signals:
        try:
            signals.enter("start-up")  # a signal while train.py was importing stops here
            startup.prepare_jax(config)
            startup.initialize_distributed(config)
            signals.reinstall()  # after JAX's own SIGTERM handler of a multi-host job
            check_config(config, jax.device_count(), jax.process_count())
            with RunWriter(workdir, lead=jax.process_index() == 0) as folder:
                run, state = start_run(config, folder, start_over=start_over)
                if run.finished is not None:
                    return run.finished
                return train_loop(run, state, signals)
        except Preempted as stop:
            return stopped_early(run, stop)


def train_loop(run: Run, state: Any, signals: StopSignals) -> dict[str, Any]:
    """The steps from ``run.start`` on, then the final evaluation."""
    config = run.config
    train_step = step_lib.make_train_step(
        run.setup.graphdef, run.setup.tx, run.setup.schedule, run.parts.step, run.mesh
    )
    log_start(run)
    clock = Clock(run.start)
    in_flight: collections.deque = collections.deque()
    profile = ProfileWindow(config.profile_steps, run.folder.layout.profile, config.total_steps)
    with (
        contextlib.closing(device_batches(run)) as batches,  # closing stops the decoders
        contextlib.closing(profile),
    ):
        signals.enter("training")
        first = next(batches, None)
        if first is not None:
            signals.enter("first compile")  # a signal now stops at once, not after a step
            compile_first(train_step, state, first)
            signals.enter("training")
        steps = itertools.chain([first] if first is not None else [], batches)
        for step, batch in enumerate(steps, start=run.start + 1):
            profile.before(step)
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, step_metrics = train_step(state, batch)
            profile.after(step, step_metrics)
            if step == run.start + 1:
                log_first_step(step_metrics, clock)
            in_flight.append(step_metrics["loss"])
            if len(in_flight) > MAX_IN_FLIGHT:  # a stop is then a few steps away, not dozens
                jax.block_until_ready(in_flight.popleft())
            last = step == config.total_steps
            stopping = signals.should_stop(step, last)
            row = None
            if stopping or last or is_due(config, step):
                row = checked_metrics(run, step, step_metrics)
            if step % config.log_every_steps == 0 or last:
                log_train_row(run, step, row, clock)
            score = None
            if step % config.eval_every_steps == 0 or last:
                began = time.time()
                score = evaluate(run, state, step)
                clock.evaluated(time.time() - began)
                clock.restart(step)  # keep evaluation out of images/s
            save_if_due(run, step, state, score, force=stopping or last)
            run.ckpts.check()  # a failed background save stops the run now, naming its step
            fire_test_signal(config, step)
            if stopping and not last:
                return stop_preempted(run, step)
    signals.enter("final")
    return finish(run, state)


def start_run(
    config: ml_collections.ConfigDict, folder: RunWriter, *, start_over: bool = False
) -> tuple[Run, Any]:
    """Check the folder and the data, then restore the newest checkpoint or initialise
    (``start_over``: every checkpoint set aside, nothing resumed, no config compared)."""
    data = load_data(config.data)
    log_epochs(config, len(data.fit))
    changes = {}
    if not start_over:  # before anything is written
        changes = folder.check_resume(config, saved_run_config(folder))
    if config.data.verify:
        verify_data(data, config.data, report=folder.layout.data_report)
    mesh = sharding.make_mesh()
    ckpts = Checkpoints(folder.path, keep=config.keep_checkpoints)
    ckpts.set_aside_unreadable(start_over=start_over)  # every process: reading is collective
    resuming = bool(ckpts.steps())
    parts = builders.run_parts(
        config,
        data.num_classes,
        data.multilabel,
        abstract=resuming,
        init_from="" if resuming else config.model.init_from,
    )
    setup, start, state = initial_state(folder, config, ckpts, parts, mesh)
    folder.record_config(config, start, changes)
    writers = Writers(folder.path, active=folder.lead)
    encoder = Encoder(setup.eval_graphdef, parts.encode, mesh)
    final = RetrievalEvaluator(encoder, data.query, data.database, data.topk)
    on_query = data.val is None or config.release_compat.select_on_query
    select = final if on_query else RetrievalEvaluator(encoder, data.val, data.fit, data.topk)
    loader = host_loader(data.fit, parts.train_loader)
    run = Run(
        config, folder, data, parts, setup, mesh, ckpts, writers, select, final, loader, start
    )
    resume_records(run)
    return run, state


def log_epochs(config: ml_collections.ConfigDict, fit: int) -> None:
    """Resolve ``config.epochs`` into steps (for ``fit`` training images) and say so."""
    per_epoch = resolve_epochs(config, fit)
    if config.epochs:
        logging.info(
            "%d epochs of %d steps (%d training images, batch %d): %d steps",
            config.epochs,
            per_epoch,
            fit,
            config.batch_size,
            config.total_steps,
        )


def initial_state(
    folder: RunWriter,
    config: ml_collections.ConfigDict,
    ckpts: Checkpoints,
    parts: RunParts,
    mesh: jax.sharding.Mesh,
) -> tuple[TrainSetup, int, Any]:
    """(setup, first step, state on the devices): the newest restorable checkpoint into the
    parts' abstract state, else the parts' fresh one."""
    repl = sharding.replicated(mesh)
    if not ckpts.steps():
        setup = create_train_state(parts.model, parts.tx, parts.schedule)
        return setup, 0, jax.device_put(setup.state, repl)
    setup = abstract_train_state(parts.model, parts.tx, parts.schedule, parts.fingerprint, repl)
    start, state, meta = ckpts.restore_state(setup.state)
    check_restored(folder, config, start, meta, setup.fingerprint)
    logging.info("resumed from step %d (%s)", start, ckpts.directory / str(start))
    return setup, start, state


def resume_records(run: Run) -> None:
    """The best checkpoint so far, a finished run's final row, and the FLOP count for MFU."""
    run.best_step, run.best_map = run.ckpts.best()
    log = run.writers.log
    if run.start == run.config.total_steps and log.final_row() is not None:
        run.finished = log.final_row()
        logging.info("%s has finished already: %s", run.folder.path, run.finished)
        run.ckpts.close()
        run.writers.close()
    else:
        log.truncate_after(run.start)
    run.peak_flops = flops.peak_flops(jax.devices()[0], run.config.model.dtype)
    if run.peak_flops:  # MFU is logged only where the peak is known (not on a CPU)
        run.train_flops = flops.model_flops_per_image(run.config, run.data.num_classes)["train"]


def saved_run_config(folder: RunWriter) -> dict[str, Any] | None:
    """The config recorded in the run's newest readable checkpoint (None: no checkpoint)."""
    if not folder.has_checkpoints():
        return None
    with RunReader(folder.path) as reader:
        return reader.saved_config()


def check_restored(folder: RunWriter, config, step: int, meta: dict, fingerprint: str) -> None:
    """A restored checkpoint must belong to this config and lie within its steps."""
    where = folder.layout.checkpoints / str(step)
    check_centers(meta, fingerprint, where)
    if step > config.total_steps:
        raise WorkdirError(
            f"checkpoint {where} is past config.total_steps={config.total_steps}: raise it"
        )


def make_loader(config: ml_collections.ConfigDict, data: RetrievalData) -> TrainLoader:
    """The training loader of ``config`` over ``data.fit`` on this host."""
    return host_loader(data.fit, builders.train_loader_args(config))


def host_loader(source: Any, args: TrainLoaderArgs) -> TrainLoader:
    """The training loader of ``args`` over ``source``, for this host's share of the job."""
    return TrainLoader(
        source, **args, process_index=jax.process_index(), process_count=jax.process_count()
    )


def device_batches(run: Run) -> Iterator[dict[str, jax.Array]]:
    """Global batches from step ``run.start`` on, ``PREFETCH`` of them already on the devices."""
    queue: collections.deque = collections.deque()
    with contextlib.closing(run.loader.batches(run.start)) as hosts:
        for host in hosts:
            batch = {"image": host["image"], "flip": host["flip"], "label": host["label"]}
            queue.append(sharding.global_batch(run.mesh, batch))
            if len(queue) > PREFETCH:
                yield queue.popleft()
    while queue:
        yield queue.popleft()


def log_start(run: Run) -> None:
    c = run.config
    if run.select_on == "query" and not c.release_compat.select_on_query and run.start == 0:
        message = (
            f"{c.data.name}: the validation split is empty (data.val_fraction="
            f"{c.data.val_fraction}), so the best checkpoint is selected on the QUERY set, "
            "which flatters the reported query mAP"
        )
        logging.warning("%s", message)
        run.writers.write({"step": 0, "warning": message, "select_on": "query"})
    logging.info(
        "training %s: steps %d..%d, global batch %d on %d device(s), %d process(es), "
        "host allocator %s",
        c.data.name,
        run.start,
        c.total_steps,
        c.batch_size,
        jax.device_count(),
        jax.process_count(),
        "tuned" if hostmem.is_tuned() else "glibc default",
    )


def log_first_step(step_metrics: dict[str, jax.Array], clock: Clock) -> None:
    """Say when the first step (which compiles the step function) is done, so that the long
    wait before the first progress row is accounted for."""
    jax.block_until_ready(step_metrics["loss"])
    clock.first_step_seconds = time.time() - clock.t0
    logging.info(
        "first step done in %.1f s (compiling the training step)", clock.first_step_seconds
    )


def is_due(config: ml_collections.ConfigDict, step: int) -> bool:
    """Whether ``step`` logs, evaluates or checkpoints (the host reads the metrics then)."""
    every = (config.log_every_steps, config.eval_every_steps, config.checkpoint_every_steps)
    return any(step % n == 0 for n in every)


def checked_metrics(run: Run, step: int, step_metrics: dict[str, jax.Array]) -> dict[str, float]:
    """The step's metrics on the host; a non-finite one stops the run before anything is saved."""
    row = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
    if all(math.isfinite(v) for v in row.values()):
        return row
    run.ckpts.wait()
    kept = run.ckpts.steps()
    where = (
        f"the last good checkpoint, step {kept[-1]} in {run.ckpts.directory}, is kept"
        if kept
        else "no checkpoint had been saved yet"
    )
    raise NonFiniteLossError(
        f"non-finite loss or parameters at step {step} ({', '.join(f'{k} {v:.4g}' for k, v in row.items())}); "
        f"nothing non-finite was saved: {where}. Lower optimizer.lr or check the data."
    )


def log_train_row(run: Run, step: int, row: dict[str, float], clock: Clock) -> None:
    c = run.config
    row = {**row, "step": step, "images_per_sec": clock.rate(step, c.batch_size)}
    if c.data.skip_corrupt:
        row["skipped_images"] = run.skipped_images()
    if run.peak_flops:
        row["mfu"] = flops.mfu(
            run.train_flops, row["images_per_sec"], jax.device_count(), run.peak_flops
        )
    run.writers.write(row)
    clock.lap(step)
    logging.info(
        "step %d/%d loss %.4f (ce %.4f quant %.4f) %.1f img/s, ETA %s",
        step,
        c.total_steps,
        row["loss"],
        row["ce"],
        row["quant"],
        row["images_per_sec"],
        clock.eta(step, c.total_steps, evaluations_left(c, step)),
    )
    clock.restart(step)


def evaluate(run: Run, state: dict[str, Any], step: int) -> float:
    """Validation mAP (or query mAP where selection is on the query set); updates the best."""
    score = run.select.run((state["params"], state["rest"]))["map"]
    if score > run.best_map:
        run.best_map, run.best_step = score, step
    key = "select_map" if run.select_on == "query" else "val_map"
    row = {"step": step, key: score, "best_map": run.best_map}
    if run.select_on == "query":
        row["select_on"] = "query"
    run.writers.write(row)
    logging.info("eval at step %d: %s", step, row)
    return score


def save_if_due(run: Run, step: int, state, score: float | None, *, force: bool) -> None:
    """Checkpoint at the cadence, at the end, when stopping, and whenever a new best is found."""
    c = run.config
    if not (force or step % c.checkpoint_every_steps == 0 or run.best_step == step):
        return
    meta = {
        "step": step,
        "centers": run.setup.fingerprint,
        "num_classes": run.data.num_classes,
        "config": json.loads(c.to_json_best_effort()),
    }
    run.ckpts.save(step, state, meta, score=score)


def fire_test_signal(config: ml_collections.ConfigDict, step: int) -> None:
    """The test suite's deterministic fault injection (``config.testing``)."""
    if not config.testing.signal_at_step or step != config.testing.signal_at_step:
        return
    sig = getattr(signal, config.testing.signal)
    if not config.testing.signal_group:
        os.kill(os.getpid(), sig)
    elif os.getpgrp() == os.getpid():
        os.killpg(os.getpgrp(), sig)
    else:  # the group would reach whoever started train.py
        raise ConfigError("testing.signal_group needs train.py to lead its own process group")


def stopped_early(run: Run | None, stop: Preempted) -> dict[str, Any]:
    """A signal during start-up or the final evaluation: wait for a pending save, close."""
    if run is not None:
        run.ckpts.close()
        run.writers.close()
    step = run.start if run is not None else None
    # Read from the folder once every pending save has finished (close waits for it): the
    # manager's own list may predate the save that the signal interrupted.
    steps = saved_steps(run.folder) if run is not None else []
    logging.warning(
        "stopped by %s during %s; %s",
        stop.signal_name,
        stop.phase,
        f"the newest checkpoint kept is step {steps[-1]}" if steps else "no checkpoint to keep",
    )
    return {"step": steps[-1] if steps else step, "preempted": True}


def saved_steps(folder: RunWriter) -> list[int]:
    """The whole checkpoints in the run folder (Orbax renames a finished save into place)."""
    ckpt = folder.layout.checkpoints
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []


def stop_preempted(run: Run, step: int) -> dict[str, Any]:
    run.ckpts.close()
    run.writers.close()
    logging.warning("stopped by a signal: checkpoint at step %d saved, exiting", step)
    return {"step": step, "preempted": True}


def finish(run: Run, state: dict[str, Any]) -> dict[str, Any]:
    """Score the selected checkpoint on query vs database, write the final row, close."""
    run.ckpts.wait()
    final = final_query_metrics(run, state)
    run.writers.write(final)
    run.writers.close()
    run.ckpts.close()
    logging.info("final: %s", final)
    return final


def selected_weights(run: Run, state: dict[str, Any]) -> tuple[Any, int]:
    """The best checkpoint's weights; if it does not restore, the final state's (logged)."""
    final_step = int(state["step"])
    best = run.best_step
    if best is not None and best != final_step and best in run.ckpts.steps():
        target = {"params": state["params"], "rest": state["rest"]}
        try:
            _, weights, _ = run.ckpts.restore_weights(target, best)
            return (weights["params"], weights["rest"]), best
        except CheckpointError as e:
            logging.error("the best checkpoint does not restore (%s); using step %d", e, final_step)
    return (state["params"], state["rest"]), final_step


def final_query_metrics(run: Run, state: dict[str, Any]) -> dict[str, Any]:
    """Query-vs-database mAP of the selected (best) checkpoint: the run's final row."""
    weights, used_step = selected_weights(run, state)
    figures = run.final.run(weights)
    return {
        "step": run.config.total_steps,
        "query_map": figures["map"],
        "best_step": used_step,
        "select_on": run.select_on,
        "bits": figures["bits"],
        "num_query": figures["num_query"],
        "num_database": figures["num_database"],
        "skipped_images": run.skipped_images(),
        **{f"query_{k}": v for k, v in figures.items() if k.startswith("map@")},
    }
