"""Image decoding and augmentation on the host (PIL + numpy), uint8 in and out.

The release's torchvision transforms, pixel for pixel: ``Resize(resize)`` (shorter side to
``resize``, the long side ``int(resize * long / short)``, truncated; PIL bilinear with its
antialiasing), then for training ``RandomHorizontalFlip`` and ``RandomCrop(crop)`` (flip the
resized image, then crop), for evaluation ``CenterCrop(crop)``. The first part (decode, banner
trim, RGB, resize) is deterministic: :func:`resized_rgb` computes it, and a prepared record set
stores its output (``csce_jax.data.prepare``). ImageNet normalisation happens inside the model
on the device, so host batches stay uint8 (4x less to copy).

``draft=True`` (``data.jpeg_draft``) lets PIL decode a JPEG at a reduced DCT scale when it is at
least twice the target size: faster, but the pixels differ from a full decode, so it is off by
default.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image, ImageFile

from csce_jax.errors import DataError

__all__ = [
    "DataError",
    "center_crop",
    "eval_view",
    "load_rgb",
    "random_crop",
    "random_window",
    "resize_shorter",
    "resized_rgb",
    "resized_size",
]


# Decompression bombs: PIL refuses images over Image.MAX_IMAGE_PIXELS (about 179M pixels) itself;
# a thin strip (1 x 20000 pixels: 165 bytes as a PNG) is tiny but would resize to gigabytes.
MAX_RESIZED_PIXELS = 16_000_000
# Without a resize the image is decoded whole (and made RGB): at most this many pixels
# (a 100-megapixel photograph; about 0.3 GB as RGB), checked from the header before decoding.
MAX_DECODED_PIXELS = 100_000_000


def load_rgb(
    image: Any,
    resize: int | None = None,
    where: str = "",
    *,
    trim_bottom: int = 0,
    draft: bool = False,
) -> Image.Image:
    """An RGB PIL image from a path, encoded bytes or a uint8 array (H, W[, C]).

    Grayscale and CMYK are converted; an alpha channel is composited over white; 16-bit and
    32-bit images are scaled to 8 bits (PIL's own conversion would clip them at 255).
    With ``draft``, a JPEG decodes at reduced scale down to about ``2 * resize`` (PIL draft
    mode; changes pixels against a full decode). ``trim_bottom`` removes that
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
        if resize:
            _check_resized_size(img.width, img.height, resize, where or str(image)[:200])
        elif img.width * img.height > MAX_DECODED_PIXELS:
            raise DataError(
                f"{where or str(image)[:200]}: an image of {img.width} x {img.height} pixels, "
                f"over {MAX_DECODED_PIXELS:,} pixels to decode whole: refused"
            )
        if draft and resize and img.format == "JPEG":
            img.draft("RGB", (2 * resize, 2 * resize))
        img.load()
    except FileNotFoundError as e:
        raise DataError(f"{where or image}: file not found") from e
    except DataError:
        raise
    except Exception as e:  # truncated, corrupt, not an image
        raise DataError(f"{where or image}: cannot decode image: {e}") from e
    if img.mode.startswith("I") or img.mode == "F":
        img = _to_8bit(img)
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return _trim(img.convert("RGB"), trim_bottom, full_height)


def _check_resized_size(width: int, height: int, resize: int, where: str) -> None:
    rw, rh = resized_size(width, height, resize)
    if rw * rh > MAX_RESIZED_PIXELS:
        raise DataError(
            f"{where}: an image of {width} x {height} pixels would resize to {rw} x {rh} "
            f"(shorter side {resize}), over {MAX_RESIZED_PIXELS:,} pixels: refused"
        )


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


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after torchvision ``Resize(size)``: the shorter side becomes ``size``,
    the longer ``int(size * long / short)`` (truncated, as torchvision computes it)."""
    if width <= height:
        return size, max(1, int(size * height / width))
    return max(1, int(size * width / height)), size


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """torchvision ``Resize(size)`` on a PIL image: :func:`resized_size`, PIL bilinear (which
    antialiases when shrinking)."""
    new = resized_size(img.width, img.height, size)
    if new == img.size:
        return img
    return img.resize(new, Image.BILINEAR)


def resized_rgb(
    image: Any, resize: int, where: str = "", *, trim_bottom: int = 0, draft: bool = False
) -> np.ndarray:
    """The deterministic part of every view: decode, trim, RGB, resize -> uint8 (H, W, 3)."""
    img = load_rgb(image, resize, where, trim_bottom=trim_bottom, draft=draft)
    return np.asarray(resize_shorter(img, resize))


def random_window(
    height: int, width: int, rng: np.random.Generator, *, crop: int, flip: bool
) -> tuple[int, int, bool]:
    """``RandomHorizontalFlip`` then ``RandomCrop(crop)``, in the release's order (flip drawn
    first, then the top and left corner of the crop in the flipped image), as (top, left,
    flipped) of the same pixels in the unflipped image: crop there, then mirror if flipped."""
    if height < crop or width < crop:
        raise DataError(f"crop {crop} larger than the resized image {height}x{width}")
    flipped = bool(flip and rng.random() < 0.5)
    top = int(rng.integers(0, height - crop + 1))
    left = int(rng.integers(0, width - crop + 1))
    return top, (width - crop - left if flipped else left), flipped


def random_crop(arr: np.ndarray, rng: np.random.Generator, *, crop: int, flip: bool) -> np.ndarray:
    """The release's random flip and crop of a resized uint8 array (a view, not a copy)."""
    top, left, flipped = random_window(*arr.shape[:2], rng, crop=crop, flip=flip)
    out = arr[top : top + crop, left : left + crop]
    return out[:, ::-1] if flipped else out


def center_crop(arr: np.ndarray, crop: int) -> np.ndarray:
    """torchvision ``CenterCrop(crop)`` of a resized uint8 array (its rounding); a view."""
    h, w = arr.shape[:2]
    if h < crop or w < crop:
        raise DataError(f"crop {crop} larger than the resized image {h}x{w}")
    top = round((h - crop) / 2.0)
    left = round((w - crop) / 2.0)
    return arr[top : top + crop, left : left + crop]


def eval_view(img: Image.Image, *, resize: int, crop: int) -> np.ndarray:
    """Resize, centre crop -> uint8 (crop, crop, 3)."""
    return np.ascontiguousarray(center_crop(np.asarray(resize_shorter(img, resize)), crop))
