"""Image decoding and augmentation on the host (PIL + numpy), uint8 in and out.

Training: resize the shorter side to ``resize``, random ``crop`` x ``crop`` crop, optional
horizontal flip. Evaluation: resize, centre crop. ImageNet normalisation happens on the device
(:func:`normalize`), so host batches stay uint8 (4x less to copy). JPEGs are decoded with PIL's
``draft`` mode when they are at least twice the target size: the DCT downscales while decoding,
the main reason the pipeline beats a plain PIL loop.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image, ImageFile

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(ValueError):
    """An input (file, list line, split) cannot be used; the message names it."""


def load_rgb(image: Any, resize: int | None = None, where: str = "") -> Image.Image:
    """An RGB PIL image from a path, encoded bytes or a uint8 array (H, W[, C]).

    Grayscale and CMYK are converted; an alpha channel is composited over white. ``resize`` lets
    JPEG decoding downscale early (draft mode). Errors name ``where`` (file and list line).
    """
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    if isinstance(image, np.ndarray):
        arr = image if image.ndim == 3 else image[..., None]
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        return Image.fromarray(np.ascontiguousarray(arr[..., :3]).astype(np.uint8))
    try:
        if isinstance(image, bytes | bytearray):
            img = Image.open(io.BytesIO(image))
        else:
            img = Image.open(os.fspath(image))
        if resize and img.format == "JPEG":
            img.draft("RGB", (2 * resize, 2 * resize))
        img.load()
    except FileNotFoundError as e:
        raise DataError(f"{where or image}: file not found") from e
    except Exception as e:  # truncated, corrupt, not an image
        raise DataError(f"{where or image}: cannot decode image: {e}") from e
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


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


def normalize(images: Any, dtype: Any = None) -> Any:
    """uint8 NHWC -> ImageNet-normalised float (on device; jax.numpy)."""
    import jax.numpy as jnp

    x = images.astype(jnp.float32) / 255.0
    x = (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
    return x.astype(dtype) if dtype is not None else x
