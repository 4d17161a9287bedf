"""Image decoding and augmentation on the host (PIL + numpy), uint8 in and out.

Training: resize the shorter side to ``resize``, random ``crop`` x ``crop`` crop, optional
horizontal flip. Evaluation: resize, centre crop. ImageNet normalisation happens inside the
model on the device, so host batches stay uint8 (4x less to copy). JPEGs are decoded with PIL's
``draft`` mode when they are at least twice the target size: the DCT downscales while decoding,
the main reason the pipeline beats a plain PIL loop.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image, ImageFile

from csce_jax.errors import DataError

__all__ = ["DataError", "eval_view", "load_rgb", "resize_shorter", "train_view"]


def load_rgb(
    image: Any, resize: int | None = None, where: str = "", *, trim_bottom: int = 0
) -> Image.Image:
    """An RGB PIL image from a path, encoded bytes or a uint8 array (H, W[, C]).

    Grayscale and CMYK are converted; an alpha channel is composited over white; 16-bit and
    32-bit images are scaled to 8 bits (PIL's own conversion would clip them at 255).
    ``resize`` lets JPEG decoding downscale early (draft mode). ``trim_bottom`` removes that
    many rows (at the file's full resolution) from the bottom, e.g. FGVC-Aircraft's copyright
    banner. Errors name ``where`` (file and list line).
    """
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    if isinstance(image, np.ndarray):
        arr = image if image.ndim == 3 else image[..., None]
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        img = Image.fromarray(np.ascontiguousarray(arr[..., :3]).astype(np.uint8))
        return _trim(img, trim_bottom, img.height)
    try:
        if isinstance(image, bytes | bytearray):
            img = Image.open(io.BytesIO(image))
        else:
            img = Image.open(os.fspath(image))
        full_height = img.height
        if resize and img.format == "JPEG":
            img.draft("RGB", (2 * resize, 2 * resize))
        img.load()
    except FileNotFoundError as e:
        raise DataError(f"{where or image}: file not found") from e
    except Exception as e:  # truncated, corrupt, not an image
        raise DataError(f"{where or image}: cannot decode image: {e}") from e
    if img.mode.startswith("I") or img.mode == "F":
        img = _to_8bit(img)
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return _trim(img.convert("RGB"), trim_bottom, full_height)


def _to_8bit(img: Image.Image) -> Image.Image:
    """A 16-bit ("I;16*"), 32-bit integer ("I") or float ("F") grey image scaled to 0..255.

    Integer images are taken as 16-bit (the PNG and TIFF case: 65535 is white) unless a value
    exceeds that; float images as 0..1 unless a value exceeds 1.
    """
    arr = np.asarray(img).astype(np.float64)
    top = arr.max(initial=0.0)
    if img.mode == "F":
        full = 1.0 if top <= 1.0 else top
    else:
        full = 65535.0 if top <= 65535 else top
    return Image.fromarray(np.clip(np.round(arr * (255.0 / full)), 0, 255).astype(np.uint8), "L")


def _trim(img: Image.Image, rows: int, full_height: int) -> Image.Image:
    """``img`` without its bottom ``rows`` rows of a ``full_height``-row original."""
    if rows <= 0:
        return img
    cut = round(rows * img.height / full_height)
    if cut >= img.height:
        raise DataError(f"cannot trim {rows} rows from an image {full_height} rows high")
    return img.crop((0, 0, img.width, img.height - cut))


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size`` (bilinear, antialiased, like torchvision Resize)."""
    w, h = img.size
    if min(w, h) == size:
        return img
    if w <= h:
        new = (size, max(1, round(h * size / w)))
    else:
        new = (max(1, round(w * size / h)), size)
    return img.resize(new, Image.BILINEAR, reducing_gap=None)


def train_view(
    img: Image.Image, rng: np.random.Generator, *, resize: int, crop: int, flip: bool
) -> np.ndarray:
    """Resize, random crop, random horizontal flip -> uint8 (crop, crop, 3)."""
    arr = np.asarray(resize_shorter(img, resize))
    h, w = arr.shape[:2]
    if h < crop or w < crop:
        raise DataError(f"crop {crop} larger than the resized image {h}x{w}")
    top = int(rng.integers(0, h - crop + 1))
    left = int(rng.integers(0, w - crop + 1))
    out = arr[top : top + crop, left : left + crop]
    if flip and rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def eval_view(img: Image.Image, *, resize: int, crop: int) -> np.ndarray:
    """Resize, centre crop -> uint8 (crop, crop, 3) (torchvision CenterCrop's rounding)."""
    arr = np.asarray(resize_shorter(img, resize))
    h, w = arr.shape[:2]
    top = round((h - crop) / 2.0)
    left = round((w - crop) / 2.0)
    return np.ascontiguousarray(arr[top : top + crop, left : left + crop])
