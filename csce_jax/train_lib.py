"""The training loop: sharded jit step, periodic evaluation, checkpoints, logging, exact resume.

The step is a pure function of (state, batch) under ``jax.jit`` on a ('data',) mesh over every
device of every host: parameters replicated, the batch sharded, the state donated; its randomness
(the elastic margins) comes from ``fold_in(key(seed), step)``. The data order is a function of
(seed, step), so restarting from a checkpoint replays nothing and skips nothing: N steps straight
and N/2 + restart + N/2 give the same parameters, bit for bit on CPU.

Outputs in the workdir: ``config.json`` (resolved config), ``metrics.jsonl`` (one JSON object per
logged step, per evaluation, and a final row with ``query_map``), TensorBoard summaries (``tensorboard/``), and
``checkpoints/{latest,best}``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from csce_jax import builders, eval_lib, hostmem, sharding
from csce_jax.checkpointing import Checkpoints
from csce_jax.data import TrainLoader, ViewConfig, load_data, normalize
from csce_jax.hashing import centers_fingerprint
from csce_jax.losses import csce_loss, elastic_margins
from csce_jax.summary import ScalarWriter

METRICS_FILE = "metrics.jsonl"


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def maybe_initialize_distributed(config: ml_collections.ConfigDict) -> None:
    """``jax.distributed.initialize()`` when asked by the config or CSCE_DISTRIBUTED=1."""
    if (config.distributed or os.environ.get("CSCE_DISTRIBUTED") == "1") and not _dist_ready():
        jax.distributed.initialize()


def enable_compilation_cache(setting: str) -> str | None:
    """Point XLA's persistent compilation cache at ``setting`` ("auto", a path, or "")."""
    if not setting:
        return None
    if setting == "auto":
        from csce_jax.pretrained import cache_dir

        setting = str(cache_dir() / "xla")
    Path(setting).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", setting)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return setting


def _dist_ready() -> bool:
    try:
        from jax._src import distributed

        return distributed.global_state.client is not None
    except Exception:  # pragma: no cover - private API moved
        return False


def quiet_library_logs() -> None:
    """Keep Orbax's and grain's INFO chatter out of the log (warnings still show)."""
    import logging as pylogging

    def keep(record: pylogging.LogRecord) -> bool:
        noisy = ("/orbax/", "/grain/", "/etils/")
        return record.levelno >= pylogging.WARNING or not any(n in record.pathname for n in noisy)

    logging.get_absl_handler().addFilter(keep)


class MetricsLog:
    """``metrics.jsonl``: appended row by row; on resume, rows after the restored step go."""

    def __init__(self, workdir: Path, active: bool):
        self.path = workdir / METRICS_FILE
        self.active = active

    def truncate_after(self, step: int) -> None:
        if not self.active or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill: drop it
                continue
            if row.get("step", 0) <= step and "query_map" not in row:
                kept.append(line)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(x + "\n" for x in kept))
        os.replace(tmp, self.path)

    def write(self, row: dict[str, Any]) -> None:
        if self.active:
            with open(self.path, "a") as f:
                f.write(json.dumps(row, sort_keys=True) + "\n")

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]


@dataclasses.dataclass
class TrainSetup:
    """The model's structure (train and eval mode), its initial state, and the optimiser."""

    graphdef: Any
    eval_graphdef: Any
    state: dict[str, Any]
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    fingerprint: str


def create_train_state(
    config: ml_collections.ConfigDict, num_classes: int, init_from: str = ""
) -> TrainSetup:
    """Model, optimiser and the state pytree {"params", "rest", "opt", "step"}.

    ``rest`` holds every non-parameter variable: BatchNorm statistics and the hash centres.
    """
    model = builders.create_model(config, num_classes)
    if init_from:
        from csce_jax.pretrained import initialize_from

        initialize_from(model, init_from)
    eval_graphdef = nnx.graphdef(nnx.view(model, use_running_average=True))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx, schedule = builders.create_optimizer(config)
    state = {
        "params": params,
        "rest": rest,
        "opt": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
    }
    fingerprint = centers_fingerprint(np.asarray(model.centers[...]))
    return TrainSetup(graphdef, eval_graphdef, state, tx, schedule, fingerprint)


def make_train_step(graphdef, tx, schedule, config, multilabel: bool, mesh):
    """The jitted, donated training step: (state, batch) -> (state, metrics)."""
    dtype = builders.compute_dtype(config)
    loss_kw = builders.loss_options(config, multilabel)
    lc = config.loss

    def step_fn(state, batch):
        step = state["step"]
        key = builders.fold_key(config.seed, step)
        images = normalize(batch["image"], dtype)
        labels = batch["label"]
        if multilabel:
            margins = jnp.asarray(lc.margin, jnp.float32)
        else:
            margins = elastic_margins(key, labels.shape[0], lc.margin, lc.margin_std)

        def loss_fn(params):
            model = nnx.merge(graphdef, params, state["rest"], copy=True)
            out = model(images)
            losses = csce_loss(out.logits, out.codes, out.threshold, labels, margins, **loss_kw)
            _, _, new_rest = nnx.split(model, nnx.Param, ...)
            return losses["loss"], (losses, new_rest)

        if config.model.remat:
            loss_fn = jax.checkpoint(loss_fn)
        grads, (losses, new_rest) = jax.grad(loss_fn, has_aux=True)(state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = {"params": params, "rest": new_rest, "opt": opt, "step": step + 1}
        out = {
            "loss": losses["loss"],
            "ce": losses["ce"],
            "quant": losses["quant"],
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(params),
            "lr": schedule(step),
        }
        return new_state, out

    repl = sharding.replicated(mesh)
    return jax.jit(
        step_fn,
        in_shardings=(repl, sharding.data_sharded(mesh)),
        out_shardings=(repl, repl),
        donate_argnums=(0,),
    )


class _Preemption:
    """SIGTERM sets a flag; the loop saves at the next step and exits cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame):
        del signum, frame
        logging.warning("SIGTERM: saving a checkpoint at the next step, then exiting")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _host_metrics(m: dict[str, jax.Array]) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(m).items()}


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike
) -> dict[str, Any]:
    """Train (or resume) ``config`` in ``workdir``; returns the final metrics row."""
    maybe_initialize_distributed(config)
    builders.check_config(config, jax.device_count(), jax.process_count())
    enable_compilation_cache(config.compilation_cache)
    workdir = Path(workdir)
    lead = jax.process_index() == 0
    if lead:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))

    data = load_data(config.data)
    setup = create_train_state(config, data.num_classes, init_from=config.model.init_from)
    graphdef, eval_graphdef, state, tx, schedule = (
        setup.graphdef,
        setup.eval_graphdef,
        setup.state,
        setup.tx,
        setup.schedule,
    )
    fingerprint = setup.fingerprint

    mesh = sharding.make_mesh()
    ckpts = Checkpoints(workdir, keep=config.keep_checkpoints)
    log = MetricsLog(workdir, lead)
    best_map = -math.inf
    restored = ckpts.restore_latest(state)
    if restored is not None:
        start, state, meta = restored
        if meta.get("centers") != fingerprint:
            raise ValueError(
                f"checkpoint {workdir}/checkpoints/latest/{start} was made with other "
                "hash centres (different bits, classes or centers_seed)"
            )
        best_map = meta.get("best_map", -math.inf)
        logging.info("resumed from step %d (%s)", start, workdir / "checkpoints" / "latest")
        log.truncate_after(start)
    else:
        start = 0
        log.truncate_after(-1)
    state = jax.device_put(state, sharding.replicated(mesh))

    train_step = make_train_step(graphdef, tx, schedule, config, data.multilabel, mesh)
    encoder = eval_lib.Encoder(eval_graphdef, config, mesh)
    loader = TrainLoader(
        data.fit,
        global_batch=config.batch_size,
        num_steps=config.total_steps,
        seed=config.seed,
        view=ViewConfig(config.data.resize, config.data.crop, config.data.flip),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_threads=config.data.num_threads,
        skip_corrupt=config.data.skip_corrupt,
    )
    writer = ScalarWriter(workdir / "tensorboard", active=lead)
    select_on_query = config.release_compat.select_on_query or data.val is None

    def evaluate(step: int) -> dict[str, Any]:
        weights = (state["params"], state["rest"])
        if select_on_query:
            q = encoder.encode(weights, data.query)
            db = encoder.encode(weights, data.database)
            return {
                "step": step,
                "select_map": eval_lib.retrieval_map(q, db, data.topk),
                "select_on": "query",
            }
        q = encoder.encode(weights, data.val)
        db = encoder.encode(weights, data.fit)
        return {"step": step, "val_map": eval_lib.retrieval_map(q, db, data.topk)}

    def meta(step: int) -> dict[str, Any]:
        return {
            "step": step,
            "centers": fingerprint,
            "best_map": best_map,
            "num_classes": data.num_classes,
            "config": json.loads(config.to_json_best_effort()),
        }

    logging.info(
        "training %s: steps %d..%d, global batch %d on %d device(s), %d process(es), "
        "host allocator %s",
        config.data.name,
        start,
        config.total_steps,
        config.batch_size,
        jax.device_count(),
        jax.process_count(),
        "tuned" if hostmem.is_tuned() else "glibc default",
    )
    t0, tick, tick_step = time.time(), time.time(), start
    step = start
    with _Preemption() as preempt:
        for host_batch in loader.batches(start):
            batch = sharding.global_batch(
                mesh, {"image": host_batch["image"], "label": host_batch["label"]}
            )
            state, m = train_step(state, batch)
            step += 1
            last = step == config.total_steps
            stopping = preempt.requested  # read once: the signal may arrive at any moment
            checkpoint_now = last or stopping or step % config.checkpoint_every_steps == 0
            if step % config.log_every_steps == 0 or last or checkpoint_now:
                row = _host_metrics(m)
                if not all(math.isfinite(v) for v in row.values()):
                    ckpts.wait()
                    raise NonFiniteLossError(
                        f"non-finite loss at step {step}: {row}; the last good checkpoint in "
                        f"{workdir / 'checkpoints' / 'latest'} is kept"
                    )
                now = time.time()
                rate = (step - tick_step) * config.batch_size / max(now - tick, 1e-9)
                if step % config.log_every_steps == 0 or last:
                    row.update(step=step, images_per_sec=rate)
                    log.write(row)
                    writer.write_scalars(step, row)
                    eta = (config.total_steps - step) * (now - t0) / max(step - start, 1)
                    logging.info(
                        "step %d/%d loss %.4f (ce %.4f quant %.4f) %.1f img/s, ETA %s",
                        step,
                        config.total_steps,
                        row["loss"],
                        row["ce"],
                        row["quant"],
                        rate,
                        time.strftime("%H:%M:%S", time.gmtime(eta)),
                    )
                    tick, tick_step = now, step
            is_best = False
            if step % config.eval_every_steps == 0 or last:
                ev = evaluate(step)
                score = ev.get("val_map", ev.get("select_map"))
                is_best = score > best_map
                best_map = max(best_map, score)
                ev["best_map"] = best_map
                log.write(ev)
                writer.write_scalars(step, {k: v for k, v in ev.items() if isinstance(v, float)})
                logging.info("eval at step %d: %s", step, ev)
                tick, tick_step = time.time(), step  # keep evaluation out of images/s
            if checkpoint_now or is_best:
                ckpts.save(step, state, meta(step), best=is_best)
            if stopping and not last:
                ckpts.close()
                logging.warning("preempted: checkpoint at step %d saved, exiting", step)
                return {"step": step, "preempted": True}
    ckpts.wait()

    final = final_query_metrics(ckpts, state, encoder, data, config)
    log.write(final)
    writer.write_scalars(final["step"], {"query_map": final["query_map"]})
    writer.close()
    ckpts.close()
    logging.info("final: %s", final)
    return final


def final_query_metrics(ckpts: Checkpoints, state, encoder, data, config) -> dict[str, Any]:
    """Query-vs-database mAP of the selected (best) checkpoint."""
    best = ckpts.restore_best(state)
    if best is not None:
        best_step, best_state, _ = best
        state = jax.device_put(best_state, sharding.replicated(encoder.mesh))
    else:
        best_step = int(state["step"])
    weights = (state["params"], state["rest"])
    q = encoder.encode(weights, data.query)
    db = encoder.encode(weights, data.database)
    from csce_jax import metrics

    scores = metrics.map_at_ks(
        q["codes"],
        db["codes"],
        q["labels"],
        db["labels"],
        sorted({data.topk, None}, key=lambda k: k or 1 << 62),
    )
    query_map = scores["map@all" if data.topk is None else f"map@{data.topk}"]
    return {
        "step": config.total_steps,
        "query_map": query_map,
        "best_step": best_step,
        "bits": config.bits,
        "num_query": len(q["codes"]),
        "num_database": len(db["codes"]),
        **{f"query_{k}": v for k, v in scores.items()},
    }
