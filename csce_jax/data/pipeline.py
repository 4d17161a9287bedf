"""grain pipelines: deterministic, per-host sharded, resumable training and padded evaluation.

Training order is a pure function of the seed: ``order = shuffle(range(n), seed)`` repeated with a
fresh shuffle each epoch, laid end to end as one stream. Global batch s is stream positions
[s*B, (s+1)*B); host h of P reads the contiguous block [s*B + h*B/P, s*B + (h+1)*B/P). The
augmentation of position p is seeded by (seed, p), so the pixels do not depend on the number of
hosts, threads or restarts, and resuming at step s is just starting the stream there: the
iterator state is the step number, saved in the checkpoint.

Evaluation pads the last global batch with blank images of index -1, so every host runs the
same number of steps (collectives must match).
"""

from __future__ import annotations

import atexit
import dataclasses
import gc
import math
import os
import signal
import threading
from collections.abc import Iterable, Iterator
from typing import Any, TypedDict, Unpack

import grain
import numpy as np
from absl import flags, logging

from csce_jax.data.base import Source
from csce_jax.data.images import DataError, center_crop, random_window, resized_rgb
from csce_jax.runtime.workers import exit_with_parent


@dataclasses.dataclass(frozen=True)
class ViewConfig:
    """How images are sized: resize the shorter side to ``resize``, crop ``crop``; ``draft``:
    JPEG decoding at reduced DCT scale (``data.jpeg_draft``)."""

    resize: int = 256
    crop: int = 224
    flip: bool = True
    draft: bool = False


def resized_image(source: Source, i: int, view: ViewConfig) -> np.ndarray:
    """Record ``i``'s image decoded and resized (uint8 H x W x 3): read as it is from a
    prepared record set, computed from the file otherwise. DataError names the image."""
    image = source.images[i]
    if source.prepared:
        return image
    return resized_rgb(
        image, view.resize, source.where[i], trim_bottom=source.trim_bottom, draft=view.draft
    )


WORKER_NICENESS = 10  # decoding processes' CPU priority below the trainer's


@dataclasses.dataclass(frozen=True)
class Workers:
    """How host batches are decoded in parallel: ``count`` threads, or ``count`` processes.

    ``Workers()`` is threads, which start at once (a spawned process takes about a second).
    ``train.py`` decodes in processes by default (``data.worker_processes``): decoded in the
    trainer, batches fragment the host heap that the CPU step reuses (docs/data.md).
    """

    count: int = 4
    processes: bool = False


_WARNED: set[str] = set()  # unreadable images already logged by this process, numbered once


class CorruptImages:
    """The distinct unreadable images a loader skipped (``data.skip_corrupt``); the log names
    each once per process, however many loaders meet it.

    Examples report what they skipped inside their batch (``skipped``), so the count is kept
    in the consuming thread whether the batch was decoded by a thread or by another process.
    """

    def __init__(self):
        self.names: set[str] = set()

    @property
    def count(self) -> int:
        return len(self.names)

    def add(self, where: str, err: str) -> None:
        if where in self.names:
            return
        self.names.add(where)
        if where in _WARNED:  # met by another loader of this process (each split's encoding)
            return
        _WARNED.add(where)
        n = len(_WARNED)
        if n <= 10 or n % 1000 == 0:
            logging.warning("skipped unreadable image #%d: %s (%s)", n, where, err)

    def noting(self, batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, np.ndarray]]:
        """``batches`` without their ``skipped`` lists, each skip recorded here; closing this
        closes ``batches`` (and stops their workers)."""
        try:
            for batch in batches:
                for where, err in batch.pop("skipped"):
                    self.add(where, err)
                yield batch
        finally:
            getattr(batches, "close", lambda: None)()


def _stream_position(q: int, global_batch: int, host_batch: int, process_index: int) -> int:
    """Global stream position of this host's q-th example: batch q // host_batch, slot
    q % host_batch of this host's contiguous block of that global batch."""
    step, k = divmod(q, host_batch)
    return step * global_batch + process_index * host_batch + k


def _collate(items: Iterable[dict[str, Any]], size: int) -> dict[str, np.ndarray]:
    """Build a host batch of ``size`` examples (image, label, index, and flip where
    present); the images they skipped as one list of (name, error). Each image is copied
    into the batch as soon as it is made, so its source (a decoded file, a record) is freed
    before the next one is read: the memory it used is reused while still in cache."""
    images, rest = None, []
    for k, x in enumerate(items):
        if images is None:
            images = np.empty((size, *x["image"].shape), x["image"].dtype)
        images[k] = x.pop("image")
        rest.append(x)
    out = {
        "image": images,
        "label": np.stack([np.asarray(x["label"]) for x in rest]),
        "index": np.asarray([x["index"] for x in rest], np.int64),
        "skipped": [s for x in rest for s in x["skipped"]],
    }
    if "flip" in rest[0]:
        out["flip"] = np.asarray([x["flip"] for x in rest], bool)
    return out


def apply_flips(images: np.ndarray, flip: np.ndarray) -> np.ndarray:
    """The training images as the model sees them: each one with ``flip`` mirrored left-right
    (training batches carry unflipped crops and a ``flip`` mask; the step mirrors them on the
    devices, where it is cheap: a mirrored copy of uint8 pixels is slow on the host)."""
    return np.where(np.asarray(flip)[:, None, None, None], images[:, :, ::-1], images)


def _host_batches(
    examples, num_steps: int, host_batch: int, workers: Workers, start: int = 0
) -> Iterator[dict[str, Any]]:
    """Batches ``start..num_steps-1`` of ``examples(q)``, each built whole by one worker (its
    crops copied once, straight into the batch) and read ahead two per worker; the order does
    not depend on the workers."""

    def batch(step: int) -> dict[str, Any]:
        _lower_thread_priority()
        q0 = step * host_batch
        return _collate((examples(q) for q in range(q0, q0 + host_batch)), host_batch)

    ds = grain.MapDataset.range(num_steps)[start:].map(batch)
    if not workers.processes:
        options = grain.ReadOptions(
            num_threads=workers.count, prefetch_buffer_size=2 * workers.count
        )
        return iter(ds.to_iter_dataset(options))
    if not flags.FLAGS.is_parsed():  # grain's worker pool reads absl flags; outside an absl app
        flags.FLAGS.mark_as_parsed()
    _release_shared_batches_at_exit()
    serial = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
    options = grain.MultiprocessingOptions(num_workers=workers.count, per_worker_buffer_size=2)
    return iter(serial.mp_prefetch(options, worker_init_fn=_start_decoding_process))


_release_registered = False


def _release_shared_batches_at_exit() -> None:
    """Batches from decoding processes arrive in shared memory, which grain unlinks when the
    last array over it is deleted, in a background thread. At exit the arrays still alive
    (the last batch a caller held) and the deletions still queued would be left for the
    resource tracker to report as leaked: collect them and wait for the deletions first."""
    global _release_registered
    if _release_registered:
        return
    _release_registered = True

    def release() -> None:
        try:
            from grain._src.python.ipc.shared_memory_array import SharedMemoryArray
        except ImportError:  # another grain layout: nothing to wait for that we know of
            return
        gc.collect()
        pool = getattr(SharedMemoryArray, "_del_thread_pool", None)
        if pool is not None:
            pool.close()
            pool.join()

    atexit.register(release)


_niced = threading.local()


def _lower_thread_priority() -> None:
    """Run this decoding thread at nice +``WORKER_NICENESS`` (Linux sets niceness per thread),
    once: where decoding threads share the cores with the step's compute threads, a decoder
    then waits for a free core instead of stalling half of the step's parallel work. Not for
    the trainer's own thread (the loader's first batch may be built there)."""
    if getattr(_niced, "done", False) or threading.current_thread() is threading.main_thread():
        return
    _niced.done = True
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICENESS)
    except (AttributeError, OSError):  # not Linux, or not permitted: run at normal priority
        pass


def _start_decoding_process(worker_index: int, num_workers: int) -> None:
    """In each decoding process: yield the CPU to the trainer where they share cores (nice +10;
    a worker then waits for a core instead of stalling half of the step's parallel work),
    leave SIGINT and SIGTERM to the trainer (a Ctrl-C reaches the whole process group; the
    trainer saves, then closes its workers), and exit when the trainer is gone (``kill -9``),
    so no worker outlives it."""
    del worker_index, num_workers
    os.nice(WORKER_NICENESS)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    exit_with_parent()


class LoaderArgs(TypedDict, total=False):
    """The keywords both loaders take besides the source: the global batch, the view, this
    host's place in the job, the host decoding, and whether unreadable images are skipped."""

    global_batch: int
    view: ViewConfig
    process_index: int
    process_count: int
    workers: Workers
    skip_corrupt: bool


class TrainLoaderArgs(LoaderArgs, total=False):
    """:class:`TrainLoader`'s keywords: the shared ones, the number of steps and the seed."""

    num_steps: int
    seed: int


class _HostLoader:
    """What both loaders share: this host's share of each global batch of ``source``, decoded
    by ``workers``, with unreadable images skipped (and noted) where ``skip_corrupt``."""

    def __init__(
        self,
        source: Source,
        *,
        global_batch: int,
        view: ViewConfig,
        process_index: int = 0,
        process_count: int = 1,
        workers: Workers = Workers(),
        skip_corrupt: bool = False,
    ):
        if global_batch % process_count:
            raise ValueError(f"global batch {global_batch} not divisible by {process_count} hosts")
        self.source, self.view = source, view
        self.global_batch = global_batch
        self.host_batch = global_batch // process_count
        self.process_index = process_index
        self.workers, self.skip_corrupt = workers, skip_corrupt
        self.corrupt = CorruptImages()
        self._epoch: tuple[int, np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:
        """What a decoding process needs: everything but the parent's record of skips."""
        return {k: v for k, v in self.__dict__.items() if k not in ("corrupt", "_epoch")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _epoch=None, corrupt=CorruptImages())


class TrainLoader(_HostLoader):
    """Host batches {"image": uint8 (b, crop, crop, 3), "flip", "label", "index"} for steps
    [0, num_steps). ``image`` holds the crops unflipped; ``flip`` (bool (b,)) says which ones the
    release's random flip mirrors (:func:`apply_flips`; the training step does it on the
    devices)."""

    def __init__(self, source: Source, *, num_steps: int, seed: int, **shared: Unpack[LoaderArgs]):
        super().__init__(source, **shared)
        global_batch = self.global_batch
        if len(source) < global_batch:
            raise DataError(
                f"{source.name}: {len(source)} records, fewer than one batch of {global_batch}"
            )
        self.seed, self.num_steps = seed, num_steps

    def _example(self, q: int) -> dict[str, Any]:
        pos = _stream_position(q, self.global_batch, self.host_batch, self.process_index)
        idx = self.record_at(pos)
        rng = np.random.default_rng((self.seed, pos))
        skipped = []
        for _ in range(len(self.source)):
            try:
                arr = resized_image(self.source, idx, self.view)
                c = self.view.crop
                top, left, flip = random_window(*arr.shape[:2], rng, crop=c, flip=self.view.flip)
                image = arr[top : top + c, left : left + c]
                label = self.source.labels[idx]
                return {
                    "image": image,
                    "flip": flip,
                    "label": label,
                    "index": idx,
                    "skipped": skipped,
                }
            except DataError as e:
                if not self.skip_corrupt:
                    raise
                skipped.append((self.source.where[idx], str(e)))
                idx = (idx + 1) % len(self.source)  # a deterministic stand-in
        raise DataError(f"{self.source.name}: no decodable image")

    def record_at(self, pos: int) -> int:
        """The record at stream position ``pos``: grain's index shuffle of the epoch (seed + epoch),
        computed for a whole epoch at once and kept (one lookup per example after that)."""
        n = len(self.source)
        epoch, k = divmod(pos, n)
        if self._epoch is None or self._epoch[0] != epoch:
            shuffled = grain.MapDataset.range(n).shuffle(seed=(self.seed + epoch) % 2**32)
            self._epoch = (epoch, np.fromiter((shuffled[i] for i in range(n)), np.int64, n))
        return int(self._epoch[1][k])

    def batches(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Host batches for steps start_step, start_step + 1, ..., num_steps - 1."""
        batches = _host_batches(
            self._example, self.num_steps, self.host_batch, self.workers, start_step
        )
        return self.corrupt.noting(batches)


class EvalLoader(_HostLoader):
    """Host batches {"image", "label", "index"} over a whole split; the last is padded with
    blank images of index -1 (so every host runs the same steps), as are skipped images."""

    def __init__(self, source: Source, **shared: Unpack[LoaderArgs]):
        super().__init__(source, **shared)
        self.num_steps = max(1, math.ceil(len(source) / self.global_batch))

    def _example(self, q: int) -> dict[str, Any]:
        pos = _stream_position(q, self.global_batch, self.host_batch, self.process_index)
        blank = np.zeros((self.view.crop, self.view.crop, 3), np.uint8)
        pad = {"image": blank, "index": -1, "skipped": []}
        if pos >= len(self.source):  # padding: nothing to read
            return {**pad, "label": self.source.labels[0]}
        label = self.source.labels[pos]
        try:
            image = center_crop(resized_image(self.source, pos, self.view), self.view.crop)
        except DataError as e:
            if not self.skip_corrupt:
                raise
            return {**pad, "label": label, "skipped": [(self.source.where[pos], str(e))]}
        return {"image": image, "label": label, "index": pos, "skipped": []}

    def batches(self) -> Iterator[dict[str, np.ndarray]]:
        """Host batches over the whole split."""
        batches = _host_batches(self._example, self.num_steps, self.host_batch, self.workers)
        return self.corrupt.noting(batches)
