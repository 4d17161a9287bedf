"""Where a run's figures go: ``metrics.jsonl`` (one JSON object per row) and TensorBoard.

``metrics.jsonl`` is a contract that other tools read (keys: ``docs/training.md``). It is
appended row by row; on resume the rows after the restored step are dropped first (written to a
temporary file, then renamed, so a failure leaves the old file whole). TensorBoard event files
are written with tensorboard's own pure-Python writer: clu's ``metric_writers`` imports
TensorFlow, which is not a dependency here. Only the lead process writes.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from csce_jax.runs.writer import layout
from csce_jax.utils.atomic import write_text_atomically


class MetricsLog:
    """``<workdir>/metrics.jsonl``."""

    def __init__(self, workdir: str | os.PathLike, active: bool = True):
        self.path = layout(workdir).metrics
        self.active = active

    def rows(self) -> list[dict[str, Any]]:
        """Every complete row (a line cut by a kill is skipped)."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def final_row(self) -> dict[str, Any] | None:
        """The row a finished run ends with (it has ``query_map``), if there is one."""
        finals = [r for r in self.rows() if "query_map" in r]
        return finals[-1] if finals else None

    def truncate_after(self, step: int) -> None:
        """Drop the rows after ``step`` and any final row: the run redoes them."""
        if not self.active or not self.path.exists():
            return
        kept = [r for r in self.rows() if r.get("step", 0) <= step and "query_map" not in r]
        write_text_atomically(
            self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept)
        )

    def write(self, row: dict[str, Any]) -> None:
        if self.active:
            with open(self.path, "a") as f:
                f.write(json.dumps(row, sort_keys=True) + "\n")


class ScalarWriter:
    """TensorBoard scalars: ``write_scalars(step, {name: value})`` to ``<logdir>`` event files."""

    def __init__(self, logdir: str | Path, active: bool = True):
        self._writer = None
        if active:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            Path(logdir).mkdir(parents=True, exist_ok=True)
            self._writer = EventFileWriter(str(logdir))

    def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
        if self._writer is None:
            return
        from tensorboard.compat.proto import event_pb2, summary_pb2

        values = [
            summary_pb2.Summary.Value(tag=k, simple_value=float(v))
            for k, v in scalars.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k != "step"
        ]
        event = event_pb2.Event(
            wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)
        )
        self._writer.add_event(event)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class Writers:
    """Both outputs of a run: every row goes to metrics.jsonl and its numbers to TensorBoard."""

    def __init__(self, workdir: str | os.PathLike, active: bool = True):
        self.log = MetricsLog(workdir, active)
        self.tensorboard = ScalarWriter(layout(workdir).tensorboard, active)

    def write(self, row: dict[str, Any]) -> None:
        self.log.write(row)
        self.tensorboard.write_scalars(row["step"], row)

    def close(self) -> None:
        self.tensorboard.close()
