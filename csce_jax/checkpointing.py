"""Orbax checkpoints of a run: one manager keeping the latest N steps and the best one.

``<workdir>/checkpoints/<step>/`` holds three items: ``weights`` (parameters, BatchNorm
statistics, hash centres: all that encoding needs), ``train`` (optimiser state and step) and
``meta`` (JSON: the resolved config, the centres' fingerprint, and a digest of the ``weights``
and ``train`` data, ``csce_jax.digest``). The best step is recorded once, as the validation
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
no slot of the keep policy. Readers (``eval.py``, search) open the
folder read-only: they never create, clean up or delete anything in a run that may be training.
"""

from __future__ import annotations

import errno
import logging as pylogging
import math
import os
import re
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from csce_jax.digest import tree_digest
from csce_jax.errors import CheckpointError
from csce_jax.workdir import layout

__all__ = ["CheckpointError", "Checkpoints"]


class _IntendedNotices(pylogging.Filter):
    """Drops Orbax's warnings about what we do on purpose: opening a run read-only, and saving
    a periodic checkpoint without a validation score."""

    NOTICES = ("read_only=True", "directory is read only", "did not provide metrics")

    def filter(self, record: pylogging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(n in message for n in self.NOTICES)


class _OneLineErrors(pylogging.Filter):
    """A failed save is raised to the trainer, which prints one ``error:`` line naming the
    step and the cause; Orbax's background threads and asyncio under them also log it, each
    with its traceback, often several times. Those records are dropped (any other Orbax or
    asyncio error keeps its line, without the traceback)."""

    MARKERS = (
        ".orbax-checkpoint-tmp",
        "RESOURCE_EXHAUSTED",
        "Handler Commit operations",
        "(save_finalize) failed",
        "cannot schedule new futures after",
        "os_error_code",
        *(os.strerror(code) for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)),
    )

    def filter(self, record: pylogging.LogRecord) -> bool:
        if record.levelno < pylogging.ERROR or not any(
            n in record.pathname for n in ("/orbax/", "/asyncio/", "/etils/")
        ):
            return True
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += f" {record.exc_info[1]}"
        if any(m in text for m in self.MARKERS):
            return False
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


_filters_installed = False


def install_log_filters() -> None:
    """Keep Orbax's notices about what we do on purpose, and its tracebacks of a failed save
    (reported once by the trainer), out of the log. Installed when the first checkpoint folder
    is opened, not at import, so that importing this module changes no one's logging."""
    global _filters_installed
    if _filters_installed:
        return
    _filters_installed = True
    pylogging.getLogger("absl").addFilter(_IntendedNotices())
    for name in ("absl", "asyncio"):
        pylogging.getLogger(name).addFilter(_OneLineErrors())
    # An interrupted asynchronous save can leave a serialisation coroutine never awaited.
    warnings.filterwarnings(
        "ignore", message="coroutine 'async_serialize_from_host", category=RuntimeWarning
    )


def _score_key(metrics: dict[str, Any]) -> tuple[float, int]:
    # Sorted ascending and the last kept: the highest score, and among equal scores the
    # earliest step (a later step must beat the best to replace it).
    return (metrics["score"], -metrics["step"])


def _reason(err: BaseException) -> str:
    """The cause of a failed read or write in the system's words where it gave them
    (tensorstore carries the OS error inside its own message)."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = str(err)
    code = re.search(r"os_error_code\W{0,2}(\d+)", text)
    if code:
        return os.strerror(int(code.group(1)))
    for c in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EIO):
        if os.strerror(c) in text:
            return os.strerror(c)
    return f"{type(err).__name__}: {text.splitlines()[0][:300] if text else ''}"


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
            raise CheckpointError(f"cannot open {self.directory}: {_reason(e)}") from e

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
            f"cannot save the checkpoint {which}in {self.directory}: {_reason(e)}; {kept}"
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

    def _first_restorable(
        self, steps: list[int], items: dict[str, Any]
    ) -> tuple[int, dict[str, Any]] | None:
        errors = []
        for i, s in enumerate(steps):
            try:
                found = s, self._restore_step(s, items)
            except Exception as e:  # truncated or edited files, wrong shapes, ...
                msg = f"{self.directory / str(s)}: {_reason(e)}"
                then = f"trying step {steps[i + 1]}" if i + 1 < len(steps) else "none left"
                logging.error("cannot restore checkpoint %s; %s", msg, then)
                errors.append((s, msg))
                continue
            self._set_aside([bad for bad, _ in errors])
            return found
        if errors:
            raise CheckpointError(
                "no checkpoint could be restored: " + "; ".join(m for _, m in errors)
            )
        return None

    def _set_aside(self, steps: list[int]) -> None:
        """Move unrestorable checkpoints to ``corrupt_checkpoints/`` (a writer only; every
        process of a job calls it, process 0 moves, all then see the same steps)."""
        if self.read_only or not steps:
            return
        self.manager.wait_until_finished()
        if jax.process_index() == 0:
            aside = layout(self.directory.parent).corrupt
            aside.mkdir(exist_ok=True)
            for s in steps:
                dest = aside / f"{s}-{os.getpid()}"
                os.replace(self.directory / str(s), dest)
                logging.warning("moved the unrestorable checkpoint of step %d to %s", s, dest)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("csce_jax.checkpoints.set_aside")
        self.manager.reload()

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
        bad = {}
        for s in steps:
            try:
                meta = self.read_meta(s)
                if not isinstance(meta.get("step"), int):
                    raise CheckpointError("no step in its record")
            except CheckpointError as e:
                bad[s] = _reason(e.__cause__) if e.__cause__ else str(e)
        if steps and len(bad) == len(steps):
            listed = "; ".join(f"step {s}: {why}" for s, why in bad.items())
            raise CheckpointError(
                f"{self.directory} holds no checkpoint whose record reads ({listed}); nothing "
                "was moved. Restore the files, or rerun with --start_over to set them aside "
                "and train from step 0"
            )
        for s, why in bad.items():
            logging.error("checkpoint %s has no readable record: %s", s, why)
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
            raise CheckpointError(f"{self.directory / str(step)}: {_reason(e)}") from e

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
