"""TensorBoard scalar summaries without TensorFlow.

clu's ``metric_writers`` package imports TensorFlow on import, which is not a dependency here, so
this writes the same event files with tensorboard's own pure-Python writer. Only the lead process
writes; the others log.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from absl import logging


class ScalarWriter:
    """``write_scalars(step, {name: value})`` to ``<logdir>`` event files, then ``flush()``."""

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
            if isinstance(v, int | float) and k != "step"
        ]
        event = event_pb2.Event(
            wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)
        )
        self._writer.add_event(event)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        logging.flush()
