"""A run folder's writing side: its layout, one trainer at a time, and a record of the config it
was started and resumed with. :class:`RunWriter` (here, the trainer's) and
:class:`csce_jax.runs.reader.RunReader` (everything that only reads a run) are the pair.

- **Lock**: ``<workdir>/.lock`` is held with ``flock`` while ``train.py`` runs. A second trainer
  on the same folder is refused at once, naming the process that holds it. The kernel drops
  the lock when its process dies, so a ``kill -9`` never leaves a folder locked.
- **Resume policy**: a rerun on a folder with checkpoints may change, against the config saved
  in its newest checkpoint, only the fields the schema marks resumable (they leave the
  mathematics of training alone: cadence of logs, evaluations and checkpoints, the number of
  steps, paths and workers). Anything else (bits, learning rate, model, seed, ...) is refused
  before anything is written, listing each change.
- **Record**: ``config.json`` is the config in force; every launch appends a row to
  ``config_history.jsonl`` (time, resumed step, the changes it made, the command line).
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import ml_collections

from csce_jax.config.schema import flatten, resumable
from csce_jax.errors import WorkdirError
from csce_jax.utils.atomic import write_text_atomically


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each part of a run lives (docs/training.md, "The run folder")."""

    root: Path

    config = property(lambda self: self.root / "config.json")  # the config in force
    history = property(lambda self: self.root / "config_history.jsonl")  # one row per launch
    lock = property(lambda self: self.root / ".lock")  # held while a trainer runs
    metrics = property(lambda self: self.root / "metrics.jsonl")
    tensorboard = property(lambda self: self.root / "tensorboard")
    checkpoints = property(lambda self: self.root / "checkpoints")
    corrupt = property(lambda self: self.root / "corrupt_checkpoints")  # set aside, kept
    data_report = property(lambda self: self.root / "data_report.json")
    eval = property(lambda self: self.root / "eval")  # eval.py's outputs
    profile = property(lambda self: self.root / "profile")  # jax.profiler traces (profile_steps)


def layout(workdir: str | os.PathLike) -> Layout:
    return Layout(Path(workdir).absolute())


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old, new)} for every field that differs (JSON values)."""
    a, b = flatten(old), flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def config_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json_best_effort(sort_keys=True))


class RunWriter:
    """The workdir of one training run, as its trainer writes it: locked while open (only the
    lead process locks), the config recorded, the resume policy applied."""

    def __init__(self, workdir: str | os.PathLike, lead: bool = True):
        self.layout = layout(workdir)
        self.path = self.layout.root
        self.lead = lead
        self._lock_fd: int | None = None
        self._made = False  # this launch created the folder

    def __enter__(self) -> RunWriter:
        if self.lead:
            self._create()
            self._lock()
        return self

    def __exit__(self, kind, *exc) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None
            if kind is not None and self._made:
                self._remove_if_unused()

    def _remove_if_unused(self) -> None:
        """A launch refused before it wrote anything (missing data, a bad config found late)
        leaves no folder of its own making behind: only its lock and an empty checkpoint
        folder are there to remove."""
        try:
            names = {p.name for p in self.path.iterdir()}
            ckpt = self.layout.checkpoints
            if names <= {self.layout.lock.name, ckpt.name} and not (
                ckpt.is_dir() and any(ckpt.iterdir())
            ):
                self.layout.lock.unlink(missing_ok=True)
                if ckpt.is_dir():
                    ckpt.rmdir()
                self.path.rmdir()
        except OSError:  # something else appeared meanwhile: leave it all
            pass

    def _create(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise WorkdirError(f"workdir {self.path} exists and is not a folder")
        self._made = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise WorkdirError(f"cannot create workdir {self.path}: {e.strerror}") from None
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise WorkdirError(f"workdir {self.path} is not writable")

    def _lock(self) -> None:
        path = self.layout.lock
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise WorkdirError(f"cannot create {path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise WorkdirError(
                f"workdir {self.path} is in use by another train.py ({holder}); two trainers "
                "on one run would delete each other's checkpoints. Wait for it or stop it."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self._lock_fd = fd

    def has_checkpoints(self) -> bool:
        ckpt = self.layout.checkpoints
        return ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir())

    def recorded_config(self) -> dict[str, Any] | None:
        path = self.layout.config
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None

    def check_resume(
        self, config: ml_collections.ConfigDict, saved: dict[str, Any] | None = None
    ) -> dict[str, tuple[Any, Any]]:
        """The config changes of this launch against ``saved`` (the config recorded in the
        newest checkpoint; ``config.json`` when none is), refused with nothing written unless
        all resumable. A missing, broken or hand-edited ``config.json`` changes nothing."""
        old = saved if saved is not None else self.recorded_config()
        source = "its newest checkpoint's record" if saved is not None else self.layout.config
        if old is None or not self.has_checkpoints():
            return {}
        changes = config_changes(old, config_json(config))
        refused = {k: v for k, v in changes.items() if not resumable(k)}
        if refused:
            listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
            raise WorkdirError(
                f"{self.path} holds a run with another config ({listed}). These change what "
                "the run computes, so it cannot resume with them: use a new --workdir, or rerun "
                f"with the run's values (the first of each pair, from {source})."
            )
        return changes

    def record_config(
        self, config: ml_collections.ConfigDict, step: int, changes: dict[str, tuple[Any, Any]]
    ) -> None:
        """Write ``config.json`` (atomically) and append this launch to the history."""
        if not self.lead:
            return
        text = json.dumps(config_json(config), indent=2, sort_keys=True)
        write_text_atomically(self.layout.config, text)
        row = {
            "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "start_step": step,
            "changes": {k: list(v) for k, v in changes.items()},
            "argv": sys.argv,
        }
        with open(self.layout.history, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
