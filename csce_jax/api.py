"""The public Python API: load a model (a converted or PyTorch file, or a run) and encode images.

  model = csce_jax.load_model("runs/cub48")              # or "model.safetensors", "release.pt"
  codes = csce_jax.encode(model, images_uint8)             # (N, bits) int8 in {-1, +1}

``encode`` prepares images exactly as ``eval.py`` does: shorter side resized to ``resize``,
centre crop of ``crop``, ImageNet normalisation inside the model, the DSF with the run's
settings. Both are re-exported by ``csce_jax`` itself.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from csce_jax import convert
from csce_jax.data.base import Source
from csce_jax.data.pipeline import ViewConfig, Workers
from csce_jax.errors import ConversionError
from csce_jax.models import CSCENet
from csce_jax.retrieval.encoder import EncodeOptions, Encoder
from csce_jax.runs import builders
from csce_jax.runs.reader import RunReader
from csce_jax.runtime import sharding

DEFAULT_RESIZE_RATIO = 256 / 224  # the release's evaluation resize for its 224 crop


@dataclasses.dataclass
class LoadedModel:
    """An evaluation-mode CSCE-Net with what encoding needs to know about it."""

    model: CSCENet
    bits: int
    centers: np.ndarray  # (classes, bits) int8 {-1, +1}
    resize: int
    crop: int
    raw_eval_band: bool = False
    balance: float | None = None
    step: int | None = None  # the checkpoint step, for a run
    _encoders: dict = dataclasses.field(default_factory=dict, repr=False)

    def __call__(self, images: jax.Array) -> Any:
        return self.model(images)

    def encoder(self, batch: int = 1) -> tuple[Encoder, Any]:
        """The :class:`csce_jax.retrieval.encoder.Encoder` of this model on this host's devices (the
        encoder of ``eval.py`` and search) for batches of about ``batch`` images, and the
        weights it takes; built once per batch size and settings, then kept warm."""
        mesh = sharding.make_mesh(local=True)
        batch = -(-max(1, batch) // mesh.size) * mesh.size
        key = (batch, self.resize, self.crop, self.raw_eval_band, self.balance)
        if key not in self._encoders:
            graphdef, params, rest = nnx.split(self.model, nnx.Param, ...)
            options = EncodeOptions(
                batch=batch,
                view=ViewConfig(self.resize, self.crop, flip=False),
                workers=Workers(1, processes=False),
                raw_eval_band=self.raw_eval_band,
                balance=self.balance,
            )
            weights = jax.device_put((params, rest), sharding.replicated(mesh))
            self._encoders[key] = (Encoder(graphdef, options, mesh), weights)
        return self._encoders[key]

    def encode_batch(self, images: np.ndarray) -> np.ndarray:
        """int8 {-1,+1} codes of a batch of uint8 images already cropped to ``crop``."""
        encoder, weights = self.encoder(len(images))
        return encoder.encode_batch(weights, np.asarray(images, np.uint8))


def _from_run(workdir: Path, step: int | None) -> LoadedModel:
    with RunReader(workdir) as run:
        config = run.config()
        restored = run.weights(config, step)
    return _loaded(restored.model(), config, step=restored.step)


def _loaded(
    model: CSCENet, config: ml_collections.ConfigDict | None, step: int | None = None
) -> LoadedModel:
    crop = config.data.crop if config is not None else model.image_size[0]
    resize = config.data.resize if config is not None else round(crop * DEFAULT_RESIZE_RATIO)
    return LoadedModel(
        model=nnx.view(model, use_running_average=True),
        bits=model.bits,
        centers=np.asarray(model.centers[...]).astype(np.int8),
        resize=resize,
        crop=crop,
        raw_eval_band=bool(config.release_compat.raw_eval_band) if config is not None else False,
        balance=builders.balance(config) if config is not None else None,
        step=step,
    )


def _from_file(path: Path) -> LoadedModel:
    arrays = convert.read_state_file(path)
    if any("/" in k for k in arrays):  # our converted layout
        model = convert.model_from_flat(arrays, str(path))
    else:
        model = convert.model_from_release(arrays)
    return _loaded(model, None)


RELEASE_BALANCE = 32.0  # the release's fill rule: "more than 32 positive", whatever K is


def load_model(
    path_or_workdir: str | os.PathLike, step: int | None = None, *, release_codes: bool = False
) -> LoadedModel:
    """An evaluation-mode model from a run folder (its best checkpoint, or ``step``), a
    converted ``.safetensors``/``.npz``, or a PyTorch release ``.pth``/``.pt``.

    ``release_codes=True`` makes :func:`encode` binarise as the release's evaluation does:
    the DSF band applied to the raw code v (not to 2 * hardtanh(v)) and the fill value decided
    by "more than 32 positive entries" (right only for 64 bits). Otherwise a run's own
    settings apply (defaults for a file: band on 2 * hardtanh(v), fill by K/2).
    """
    path = Path(path_or_workdir)
    if path.is_dir():
        loaded = _from_run(path, step)
    elif step is not None:
        raise ConversionError(f"{path}: step={step} needs a run folder, not a file")
    else:
        loaded = _from_file(path)
    if release_codes:
        loaded.raw_eval_band, loaded.balance = True, RELEASE_BALANCE
    return loaded


def _as_source(images: Any) -> Source:
    """uint8 RGB (or grey) arrays of any size as an in-memory source; anything else refused."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    arrays = []
    for i, img in enumerate(images):
        arr = np.asarray(img)
        if arr.dtype != np.uint8:
            raise ValueError(f"image {i}: expected uint8 RGB pixels, got {arr.dtype}")
        if arr.ndim not in (2, 3):
            raise ValueError(f"image {i}: expected (H, W) or (H, W, C) pixels, got {arr.shape}")
        arrays.append(arr)
    names = [f"image {i}" for i in range(len(arrays))]
    return Source(arrays, np.zeros(len(arrays), np.int32), names, "images")


def encode(
    model: LoadedModel, images: np.ndarray | Sequence[np.ndarray], batch_size: int = 64
) -> np.ndarray:
    """Binary codes (N, bits) int8 in {-1, +1} of uint8 RGB images (N, H, W, 3) or a list of
    (H, W[, 3]) arrays of any size, prepared and encoded by the encoder of ``eval.py``
    (:class:`csce_jax.retrieval.encoder.Encoder`): shorter side to ``resize``, centre crop."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be at least 1")
    source = _as_source(images)
    if len(source) == 0:
        return np.zeros((0, model.bits), np.int8)
    encoder, weights = model.encoder(min(batch_size, len(source)))
    return encoder.encode(weights, source)["codes"]


def export_run(workdir: str | os.PathLike, dst: str | os.PathLike, step: int | None = None) -> str:
    """A run's best (or ``step``) checkpoint written as ``dst``: ours (.safetensors/.npz, what
    :func:`load_model` and ``eval.py --weights`` read) or the release's layout (.pt/.pth).
    Returns a one-line summary."""
    dst = str(dst)
    convert._check_suffix(dst, (*convert.OUR_SUFFIXES, *convert.TORCH_SUFFIXES))
    if not Path(workdir).is_dir():
        raise ConversionError(f"--src {workdir}: export reads a run folder")
    loaded = load_model(workdir, step)
    if Path(dst).suffix.lower() in convert.TORCH_SUFFIXES:
        convert.write_torch_file(convert.release_state_dict(loaded.model), dst)
    else:
        convert.write_state_file(convert.flat_arrays(loaded.model), dst)
    return f"exported {workdir} step {loaded.step} -> {dst}"
