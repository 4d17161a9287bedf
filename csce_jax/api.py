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

from csce_jax import builders, convert, sharding
from csce_jax.data.images import eval_view, load_rgb
from csce_jax.encoding import make_encode_step
from csce_jax.errors import ConversionError
from csce_jax.models import CSCENet
from csce_jax.run_reader import RunReader

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
    _encoder: Any = dataclasses.field(default=None, repr=False)

    def __call__(self, images: jax.Array) -> Any:
        return self.model(images)

    def encode_batch(self, images: np.ndarray) -> np.ndarray:
        """int8 {-1,+1} codes of a batch of prepared uint8 images, on this host's devices
        (the encoding step of ``eval.py`` and training's evaluation)."""
        if self._encoder is None or self._encoder[0] != (self.raw_eval_band, self.balance):
            mesh = sharding.make_mesh(local=True)
            graphdef, params, rest = nnx.split(self.model, nnx.Param, ...)
            step = make_encode_step(
                graphdef, mesh, raw_eval_band=self.raw_eval_band, bal=self.balance
            )
            weights = jax.device_put((params, rest), sharding.replicated(mesh))
            self._encoder = ((self.raw_eval_band, self.balance), step, weights, mesh.size)
        _, step, weights, devices = self._encoder
        pad = -len(images) % devices
        padded = np.concatenate([images, np.zeros((pad, *images.shape[1:]), np.uint8)])
        codes, _, _ = step(weights, padded, np.arange(len(padded), dtype=np.int32))
        return np.asarray(codes)[: len(images)]


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


def _prepare(images: Any, resize: int, crop: int) -> np.ndarray:
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    out = []
    for i, img in enumerate(images):
        arr = np.asarray(img)
        if arr.dtype != np.uint8:
            raise ValueError(f"image {i}: expected uint8 RGB pixels, got {arr.dtype}")
        out.append(eval_view(load_rgb(arr), resize=resize, crop=crop))
    return np.stack(out)


def encode(
    model: LoadedModel, images: np.ndarray | Sequence[np.ndarray], batch_size: int = 64
) -> np.ndarray:
    """Binary codes (N, bits) int8 in {-1, +1} of uint8 RGB images (N, H, W, 3) or a list of
    (H, W[, 3]) arrays of any size, preprocessed as ``eval.py`` does."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be at least 1")
    pixels = _prepare(images, model.resize, model.crop)
    codes = []
    for start in range(0, len(pixels), batch_size):
        chunk = pixels[start : start + batch_size]
        pad = batch_size - len(chunk) if len(pixels) > batch_size else 0
        padded = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.uint8)])
        codes.append(model.encode_batch(padded)[: len(chunk)])
    return np.concatenate(codes) if codes else np.zeros((0, model.bits), np.int8)


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
