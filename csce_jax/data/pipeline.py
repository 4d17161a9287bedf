"""grain pipelines: deterministic, per-host sharded, resumable training and padded evaluation.

Training order is a pure function of the seed: ``order = shuffle(range(n), seed)`` repeated with a
fresh shuffle each epoch, laid end to end as one stream. Global batch s is stream positions
[s*B, (s+1)*B); host h of P reads the contiguous block [s*B + h*B/P, s*B + (h+1)*B/P). The
augmentation of position p is seeded by (seed, p), so the pixels do not depend on the number of
hosts, threads or restarts, and resuming at step s is just starting the stream there: the
iterator state is the step number, saved in the checkpoint.

Evaluation pads the last global batch with copies of record 0 and a ``mask`` of False, so every
host runs the same number of steps (collectives must match).
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np
from absl import logging

from csce_jax.data.images import DataError, eval_view, load_rgb, train_view
from csce_jax.data.sources import Source


@dataclasses.dataclass(frozen=True)
class ViewConfig:
    """How images are sized: resize the shorter side to ``resize``, crop ``crop``."""

    resize: int = 256
    crop: int = 224
    flip: bool = True


class CorruptImages:
    """The distinct unreadable images a loader skipped (``data.skip_corrupt``)."""

    def __init__(self):
        self.names: set[str] = set()
        self.lock = threading.Lock()

    @property
    def count(self) -> int:
        return len(self.names)

    def add(self, where: str, err: Exception) -> None:
        with self.lock:
            new = where not in self.names
            self.names.add(where)
            n = len(self.names)
        if new and (n <= 10 or n % 1000 == 0):
            logging.warning("skipped unreadable image #%d: %s (%s)", n, where, err)


def _stream_position(q: int, global_batch: int, host_batch: int, process_index: int) -> int:
    """Global stream position of this host's q-th example: batch q // host_batch, slot
    q % host_batch of this host's contiguous block of that global batch."""
    step, k = divmod(q, host_batch)
    return step * global_batch + process_index * host_batch + k


def _collate(items: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Stack examples into a host batch (image, label, index, and mask where present)."""
    out = {
        "image": np.stack([x["image"] for x in items]),
        "label": np.stack([np.asarray(x["label"]) for x in items]),
        "index": np.asarray([x["index"] for x in items], np.int64),
    }
    if "mask" in items[0]:
        out["mask"] = np.asarray([x["mask"] for x in items], bool)
    return out


def _host_batches(
    examples, num_steps: int, host_batch: int, threads: int, start: int = 0
) -> Iterator[dict[str, np.ndarray]]:
    """Batches ``start..num_steps-1`` of ``examples(q)``, read ahead by ``threads`` threads."""
    ds = grain.MapDataset.range(num_steps * host_batch).map(examples)
    ds = ds.batch(host_batch, drop_remainder=True, batch_fn=_collate)[start:]
    options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
    return iter(ds.to_iter_dataset(options))


class TrainLoader:
    """Host batches {"image": uint8 (b, crop, crop, 3), "label", "index"} for steps [0, num_steps)."""

    def __init__(
        self,
        source: Source,
        *,
        global_batch: int,
        num_steps: int,
        seed: int,
        view: ViewConfig,
        process_index: int = 0,
        process_count: int = 1,
        num_threads: int = 4,
        skip_corrupt: bool = False,
    ):
        if global_batch % process_count:
            raise ValueError(f"global batch {global_batch} not divisible by {process_count} hosts")
        if len(source) < global_batch:
            raise DataError(
                f"{source.name}: {len(source)} records, fewer than one batch of {global_batch}"
            )
        self.source, self.view, self.seed = source, view, seed
        self.global_batch, self.num_steps = global_batch, num_steps
        self.host_batch = global_batch // process_count
        self.process_index = process_index
        self.num_threads, self.skip_corrupt = num_threads, skip_corrupt
        self.corrupt = CorruptImages()
        epochs = math.ceil(num_steps * global_batch / len(source)) + 1
        self._order = grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat(epochs)

    def _example(self, q: int) -> dict[str, Any]:
        pos = _stream_position(q, self.global_batch, self.host_batch, self.process_index)
        idx = int(self._order[pos])
        rng = np.random.default_rng((self.seed, pos))
        for _ in range(len(self.source)):
            rec = self.source[idx]
            try:
                img = load_rgb(
                    rec["image"],
                    self.view.resize,
                    rec["where"],
                    trim_bottom=self.source.trim_bottom,
                )
                image = train_view(
                    img, rng, resize=self.view.resize, crop=self.view.crop, flip=self.view.flip
                )
                return {"image": image, "label": rec["label"], "index": idx}
            except DataError as e:
                if not self.skip_corrupt:
                    raise
                self.corrupt.add(rec["where"], e)
                idx = (idx + 1) % len(self.source)  # a deterministic stand-in
        raise DataError(f"{self.source.name}: no decodable image")

    def batches(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Host batches for steps start_step, start_step + 1, ..., num_steps - 1."""
        return _host_batches(
            self._example, self.num_steps, self.host_batch, self.num_threads, start_step
        )


class EvalLoader:
    """Host batches {"image", "label", "index", "mask"} over a whole split, padded and masked."""

    def __init__(
        self,
        source: Source,
        *,
        global_batch: int,
        view: ViewConfig,
        process_index: int = 0,
        process_count: int = 1,
        num_threads: int = 4,
        skip_corrupt: bool = False,
    ):
        if global_batch % process_count:
            raise ValueError(f"global batch {global_batch} not divisible by {process_count} hosts")
        self.source, self.view = source, view
        self.global_batch = global_batch
        self.host_batch = global_batch // process_count
        self.process_index = process_index
        self.num_steps = max(1, math.ceil(len(source) / global_batch))
        self.num_threads, self.skip_corrupt = num_threads, skip_corrupt
        self.corrupt = CorruptImages()

    def _example(self, q: int) -> dict[str, Any]:
        pos = _stream_position(q, self.global_batch, self.host_batch, self.process_index)
        blank = np.zeros((self.view.crop, self.view.crop, 3), np.uint8)
        if pos >= len(self.source):  # padding: nothing to read
            return {"image": blank, "label": self.source.labels[0], "index": -1, "mask": False}
        rec = self.source[pos]
        try:
            img = load_rgb(
                rec["image"], self.view.resize, rec["where"], trim_bottom=self.source.trim_bottom
            )
            image = eval_view(img, resize=self.view.resize, crop=self.view.crop)
        except DataError as e:
            if not self.skip_corrupt:
                raise
            self.corrupt.add(rec["where"], e)
            return {"image": blank, "label": rec["label"], "index": -1, "mask": False}
        return {"image": image, "label": rec["label"], "index": pos, "mask": True}

    def batches(self) -> Iterator[dict[str, np.ndarray]]:
        return _host_batches(self._example, self.num_steps, self.host_batch, self.num_threads)
