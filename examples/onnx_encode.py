"""Encode a folder of images with an exported csce_jax encoder, using onnxruntime, numpy and
Pillow only (no JAX, no csce_jax): what a search service beside Milvus or faiss runs.

  pip install onnxruntime numpy pillow
  python examples/onnx_encode.py --model model.onnx --images photos/ --out codes.npz

``codes.npz`` holds ``paths``, ``codes`` (int8 {-1, +1}) and ``packed`` (uint8, the layout of
csce_jax indexes and of a csce_jax Milvus collection). The model's metadata (bits, crop,
resize, the run it came from) is printed first. ``preprocess`` is the preprocessing contract
of the artifact: the same pixels as csce_jax's evaluation loader and torchvision's
``Resize(resize)`` + ``CenterCrop(crop)``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def preprocess(path: str | Path, resize: int, crop: int) -> np.ndarray:
    """An image file -> uint8 (crop, crop, 3): RGB (alpha over white, 16-bit scaled to 8),
    shorter side to ``resize`` (PIL bilinear, the longer side truncated), centre crop."""
    img = Image.open(path)
    img.load()
    if img.mode.startswith("I") or img.mode == "F":  # 16/32-bit grey: scaled, not clipped
        arr = np.asarray(img).astype(np.float64)
        top = arr.max(initial=0.0)
        full = (1.0 if top <= 1.0 else top) if img.mode == "F" else max(65535.0, top)
        img = Image.fromarray(np.clip(np.round(arr * (255.0 / full)), 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    img = img.convert("RGB")
    w, h = img.size
    size = (
        (resize, max(1, int(resize * h / w))) if w <= h else (max(1, int(resize * w / h)), resize)
    )
    if size != img.size:
        img = img.resize(size, Image.BILINEAR)
    arr = np.asarray(img)
    if arr.shape[0] < crop or arr.shape[1] < crop:
        raise ValueError(f"{path}: {arr.shape[1]} x {arr.shape[0]} after resizing, under {crop}")
    top, left = round((arr.shape[0] - crop) / 2.0), round((arr.shape[1] - crop) / 2.0)
    return np.ascontiguousarray(arr[top : top + crop, left : left + crop])


def load(model: str):
    """(onnxruntime session, metadata); one line for a file that is not an exported encoder."""
    import onnxruntime

    try:
        session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    except Exception:
        raise SystemExit(
            f"error: cannot load {model}: not a whole ONNX file (truncated?)"
        ) from None
    meta = session.get_modelmeta().custom_metadata_map.get("csce_jax")
    if meta is None:
        raise SystemExit(f"error: {model} is an ONNX file, but not a csce_jax encoder")
    return session, json.loads(meta)


def encode(session, meta: dict, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes, packed) of uint8 images (N, crop, crop, 3)."""
    want = (meta["crop"], meta["crop"], 3)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != want:
        raise ValueError(
            f"images {images.dtype} {images.shape}: the encoder takes uint8 (N, {want[0]}, "
            f"{want[1]}, 3) (preprocess() makes them)"
        )
    codes, packed = session.run(["codes", "packed"], {"images": images})
    return codes, packed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="an exported encoder (.onnx)")
    p.add_argument("--images", required=True, help="a folder of images (searched recursively)")
    p.add_argument("--out", default="codes.npz")
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    session, meta = load(args.model)
    print(json.dumps({k: meta[k] for k in ("bits", "crop", "resize", "source", "step")}))
    paths = sorted(str(x) for x in Path(args.images).rglob("*") if x.suffix.lower() in SUFFIXES)
    if not paths:
        raise SystemExit(f"error: no image under {args.images}")
    codes, packed = [], []
    for start in range(0, len(paths), args.batch):
        part = paths[start : start + args.batch]
        batch = np.stack([preprocess(x, meta["resize"], meta["crop"]) for x in part])
        c, b = encode(session, meta, batch)
        codes.append(c)
        packed.append(b)
    np.savez(
        args.out,
        paths=np.asarray(paths),
        codes=np.concatenate(codes),
        packed=np.concatenate(packed),
    )
    print(f"wrote {len(paths)} codes of {meta['bits']} bits to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
