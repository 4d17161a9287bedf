"""Orbax checkpoints: the latest N (periodic, asynchronous) plus the best by validation mAP.

A checkpoint holds the whole training state (parameters, BatchNorm statistics, hash centres,
optimiser state, step; the data position and the random key are functions of the step) and a JSON
record with the resolved config, the centres' fingerprint and the metrics at that step. Orbax
writes into a temporary directory and renames it when complete, so a checkpoint is either whole or
absent; leftovers of an interrupted write are cleaned up. A checkpoint that fails to restore is
reported with its path and the next older one is tried, never a silent fresh start.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging


class CheckpointError(RuntimeError):
    """No checkpoint in a directory can be restored; the message lists each failure."""


def _manager(directory: Path, keep: int, async_save: bool) -> ocp.CheckpointManager:
    # Each manager needs its own barrier names: "latest" and "best" may save the same step at
    # once, and shared names deadlock the processes of a multi-host run.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save,
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            barrier_sync_key_prefix=directory.name
        ),
    )
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))


class Checkpoints:
    """``<workdir>/checkpoints/latest`` (keep N) and ``<workdir>/checkpoints/best`` (keep 1)."""

    def __init__(self, workdir: str | os.PathLike, keep: int = 2, async_save: bool = True):
        root = Path(workdir).absolute() / "checkpoints"
        self.latest = _manager(root / "latest", keep, async_save)
        self.best = _manager(root / "best", 1, async_save)

    def save(self, step: int, state: Any, meta: dict[str, Any], *, best: bool = False) -> None:
        """Save ``state`` at ``step`` (asynchronously) in latest, and in best too if ``best``."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        # A step saved before a restart (a best written just before a kill, or a corrupt one
        # the restore skipped) is replaced: the run has gone back before it and redone it.
        self._replace(self.latest, step, args)
        if best:
            # Only one best is kept: the new one replaces it once written. Across processes the
            # two managers' writes are serialised so their collectives cannot interleave.
            if jax.process_count() > 1:
                self.latest.wait_until_finished()
            self._replace(self.best, step, args)

    @staticmethod
    def _replace(manager: ocp.CheckpointManager, step: int, args: Any) -> None:
        if step in manager.all_steps():
            manager.wait_until_finished()
            manager.delete(step)
        manager.save(step, args=args, force=True)

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self.latest.close()
        self.best.close()

    @staticmethod
    def _restore(
        manager: ocp.CheckpointManager, target: Any, step: int | None
    ) -> tuple[int, Any, dict[str, Any]] | None:
        steps = sorted(manager.all_steps(), reverse=True)
        if step is not None:
            if step not in steps:
                raise CheckpointError(
                    f"no checkpoint at step {step} in {manager.directory} "
                    f"(available: {sorted(steps)})"
                )
            steps = [step]
        if not steps:
            return None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        errors = []
        for s in steps:
            path = Path(manager.directory) / str(s)
            try:
                restored = manager.restore(
                    s,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
                    ),
                )
                return s, restored.state, dict(restored.meta)
            except Exception as e:  # truncated files, wrong shapes (another config), ...
                msg = f"{path}: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
                logging.error("cannot restore checkpoint %s; trying an older one", msg)
                errors.append(msg)
        raise CheckpointError("no checkpoint could be restored:\n  " + "\n  ".join(errors))

    def restore_latest(
        self, target: Any, step: int | None = None
    ) -> tuple[int, Any, dict[str, Any]] | None:
        """(step, state, meta) of the newest restorable checkpoint, or None if there is none."""
        return self._restore(self.latest, target, step)

    def read_meta(self, step: int | None = None) -> tuple[int, dict[str, Any]] | None:
        """(step, JSON record) of ``step`` in latest, else of the best, else of the latest."""
        for manager in (self.latest,) if step is not None else (self.best, self.latest):
            steps = [step] if step is not None else sorted(manager.all_steps(), reverse=True)
            for s in steps:
                if s in manager.all_steps():
                    meta = manager.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
                    return s, dict(meta.meta)
        return None

    def restore_best(self, target: Any) -> tuple[int, Any, dict[str, Any]] | None:
        return self._restore(self.best, target, None)
