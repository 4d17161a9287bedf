"""Orbax checkpoints of a run: one manager keeping the latest N steps and the best one.

``<workdir>/checkpoints/<step>/`` holds three items: ``weights`` (parameters, BatchNorm
statistics, hash centres: all that encoding needs), ``train`` (optimiser state and step) and
``meta`` (JSON: the resolved config, the centres' fingerprint, and a digest of the ``weights``
and ``train`` data, ``csce_jax.utils.digest``). The best step is recorded once, as the validation
score Orbax saves with the checkpoint.
The data position and the per-step random key are functions of the step, so nothing else is
needed for an exact resume.

Which steps stay is Orbax's own preservation policy: the latest ``keep`` steps, plus the step
with the highest validation mAP (its score is saved as the checkpoint's metric; ties go to the
earlier step). Orbax writes into a temporary directory and renames it when complete, so a
checkpoint is whole or absent. A restore recomputes the digest of what it read: a checkpoint
that fails to restore, or whose data no longer match its digest, is reported with its path and
the next older one is tried, never a silent fresh start; the trainer moves such a checkpoint
out of ``checkpoints/`` into ``corrupt_checkpoints/`` (kept for inspection), so that it holds
no slot of the keep policy (:mod:`csce_jax.runs.recovery`). Readers (``eval.py``, search) open the
folder read-only: they never create, clean up or delete anything in a run that may be training.
"""

from __future__ import annotations

import functools
import math
import os
import re
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from csce_jax.errors import CheckpointError
from csce_jax.runs import recovery
from csce_jax.runs.orbax_log import install_log_filters
from csce_jax.runs.writer import layout
from csce_jax.utils.digest import tree_digest


def _score_key(metrics: dict[str, Any]) -> tuple[float, int]:
    # Sorted ascending and the last kept: the highest score, and among equal scores the
    # earliest step (a later step must beat the best to replace it).
    return (metrics["score"], -metrics["step"])


class Checkpoints:
    """The checkpoints of one run folder (``read_only`` for evaluation and search)."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        keep: int = 2,
        *,
        read_only: bool = False,
        async_save: bool = True,
    ):
        install_log_filters()
        self.directory = layout(workdir).checkpoints
        self.read_only = read_only
        self._closed = False
        self._pending: int | None = None  # the step whose asynchronous save may still run
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"no checkpoints in {self.directory}")
        policy = pp.AnyPreservationPolicy(
            [
                pp.LatestN(n=keep),
                pp.BestN(get_metric_fn=_score_key, n=1, keep_checkpoints_without_metrics=False),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            # The policy decides what is kept. best_fn is set too because this Orbax writes a
            # checkpoint's metrics to disk only when it is: without it the scores are lost on
            # restart and BestN would delete the best step at the next save.
            best_fn=_score_key,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,
            enable_async_checkpointing=async_save,
            preservation_policy=policy,
        )
        try:
            self.manager = ocp.CheckpointManager(
                self.directory, options=options, item_names=("weights", "train", "meta")
            )
        except OSError as e:
            raise CheckpointError(f"cannot open {self.directory}: {recovery.reason(e)}") from e

    def steps(self) -> list[int]:
        """Every saved step, oldest first."""
        return sorted(self.manager.all_steps())

    def save(
        self, step: int, state: dict[str, Any], meta: dict[str, Any], score: float | None = None
    ) -> None:
        """Save ``state`` at ``step`` asynchronously; ``score`` (validation mAP) ranks it.

        A failure (a full disk, a read-only folder), also one of an earlier asynchronous save,
        raises :class:`CheckpointError` naming the folder and the cause.
        """
        weights = {"params": state["params"], "rest": state["rest"]}
        train = {"opt": state["opt"], "step": state["step"]}
        meta = {**meta, "digest": {"weights": tree_digest(weights), "train": tree_digest(train)}}
        args = ocp.args.Composite(
            weights=ocp.args.StandardSave(weights),
            train=ocp.args.StandardSave(train),
            meta=ocp.args.JsonSave(meta),
        )
        metrics = None if score is None else {"score": float(score), "step": int(step)}
        self.check()
        try:
            self.manager.save(step, args=args, metrics=metrics, force=True)
            self._pending = step
        except Exception as e:
            self._pending = step if self._pending is None else self._pending
            raise self._save_failed(e) from e

    def check(self) -> None:
        """Raise CheckpointError, naming the step, if a background save has failed (cheap:
        the trainer calls it every step, so it stops at once, not at the next save)."""
        try:
            self.manager.check_for_errors()
        except Exception as e:
            raise self._save_failed(e) from e

    def _save_failed(self, e: BaseException) -> CheckpointError:
        # The step whose save failed: the temporary folder Orbax was writing, else the
        # newest step handed to a background save.
        match = re.search(r"/(\d+)\.orbax-checkpoint-tmp", str(e))
        step = int(match.group(1)) if match else self._pending
        which = f"of step {step} " if step is not None else ""
        before = sorted(
            int(p.name)
            for p in (self.directory.iterdir() if self.directory.is_dir() else ())
            if p.name.isdigit() and (step is None or int(p.name) < step)
        )
        kept = (
            f"the checkpoints before it are whole (steps {', '.join(map(str, before))})"
            if before
            else "no checkpoint was saved before it"
        )
        return CheckpointError(
            f"cannot save the checkpoint {which}in {self.directory}: {recovery.reason(e)}; {kept}"
        )

    def wait(self) -> None:
        """Block until pending saves are on disk; a failed one raises CheckpointError."""
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:
            raise self._save_failed(e) from e
        self._pending = None

    def close(self) -> None:
        """Wait for pending saves, then release the manager (a second call does nothing)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        finally:
            self.manager.close()

    def _restore_step(self, step: int, items: dict[str, Any]) -> dict[str, Any]:
        args = {}
        for name, target in items.items():
            if name == "meta":
                args[name] = ocp.args.JsonRestore()
            else:
                args[name] = ocp.args.StandardRestore(target)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        got = {name: restored[name] for name in items}
        recorded = (got.get("meta") or {}).get("digest", {})
        for name in ("weights", "train"):
            if name in got and name in recorded and tree_digest(got[name]) != recorded[name]:
                raise CheckpointError(
                    f"its {name} data do not match the digest saved with them (a file was "
                    "changed or damaged)"
                )
        return got

    def _set_aside(self, steps: list[int]) -> None:
        """Move unrestorable checkpoints to ``corrupt_checkpoints/`` (a writer only; every
        process of a job calls it, all then see the same steps)."""
        if self.read_only or not steps:
            return
        self.manager.wait_until_finished()
        recovery.move_aside(self.directory, steps)
        self.manager.reload()

    def _first_restorable(
        self, steps: list[int], items: dict[str, Any]
    ) -> tuple[int, dict[str, Any]] | None:
        restore = functools.partial(self._restore_step, items=items)
        return recovery.first_restorable(steps, restore, self.directory, self._set_aside)

    def set_aside_unreadable(self, *, start_over: bool = False) -> None:
        """Set aside every step folder whose record does not read (a junk or half-copied
        folder would hold a slot of the keep policy). Every process of a job calls it.

        Where no step's record reads, nothing is moved and the run stops (one line naming
        each step and why): a run never starts again from step 0 by itself. ``start_over``
        (the trainer's ``--start_over``) sets every step aside, readable or not."""
        steps = self.steps()
        if start_over:
            if steps:
                logging.warning("--start_over: setting aside steps %s, training from 0", steps)
            self._set_aside(steps)
            return
        bad = recovery.unreadable_records(steps, self.read_meta, self.directory)
        self._set_aside(list(bad))

    def restore_state(
        self, target: dict[str, Any], step: int | None = None
    ) -> tuple[int, dict[str, Any], dict[str, Any]] | None:
        """(step, state, meta) of the newest restorable checkpoint (or exactly ``step``).

        ``target`` is the training state's structure (arrays or ``jax.ShapeDtypeStruct``s with
        shardings, e.g. from ``nnx.eval_shape``). None when there is no checkpoint at all.
        """
        items = {
            "weights": {"params": target["params"], "rest": target["rest"]},
            "train": {"opt": target["opt"], "step": target["step"]},
            "meta": None,
        }
        found = self._first_restorable(self._candidates(step), items)
        if found is None:
            return None
        s, got = found
        state = {**got["weights"], **got["train"]}
        return s, state, dict(got["meta"])

    def restore_weights(
        self, target: dict[str, Any], step: int, *, fallback: bool = False
    ) -> tuple[int, dict[str, Any], dict[str, Any]]:
        """(step, {"params", "rest"}, meta) of ``step``: what encoding needs, no optimiser
        state. ``fallback``: when ``step`` does not restore, the newest other one that does."""
        steps = self._candidates(step)
        if fallback:
            steps += [s for s in reversed(self.steps()) if s != step]
        found = self._first_restorable(steps, {"weights": target, "meta": None})
        assert found is not None
        got_step, got = found
        return got_step, got["weights"], dict(got["meta"])

    def read_meta(self, step: int) -> dict[str, Any]:
        """The JSON record of ``step``."""
        try:
            return dict(self._restore_step(step, {"meta": None})["meta"])
        except Exception as e:
            raise CheckpointError(f"{self.directory / str(step)}: {recovery.reason(e)}") from e

    def saved_config(self) -> dict[str, Any] | None:
        """The config recorded in the newest checkpoint whose record reads (None: none)."""
        for s in reversed(self.steps()):
            try:
                config = self.read_meta(s).get("config")
            except CheckpointError:
                continue
            if isinstance(config, dict):
                return config
        return None

    def best_step(self) -> int | None:
        """The step with the best validation mAP among those saved with one (Orbax's own
        ranking of the saved scores; ties go to the earlier step), or None."""
        return self.manager.best_step()

    def best(self) -> tuple[int | None, float]:
        """(best step, its score), or (None, -inf): the one record of the best checkpoint is
        the score saved with it (the trainer resumes its best from here, too)."""
        step = self.manager.best_step()
        metrics = self.manager.metrics(step) if step is not None else None
        if not metrics or "score" not in metrics:
            return None, -math.inf
        return step, float(metrics["score"])

    def _candidates(self, step: int | None) -> list[int]:
        steps = self.steps()
        if step is None:
            return list(reversed(steps))
        if step not in steps:
            raise CheckpointError(
                f"no checkpoint at step {step} in {self.directory} (available: {steps})"
            )
        return [step]


def abstract_on(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """Shape/dtype leaves of ``tree`` laid out with ``sharding``: a restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
