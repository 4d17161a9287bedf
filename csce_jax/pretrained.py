"""``model.init_from``: initialise a CSCE-Net from a file or from torchvision's ImageNet weights.

Accepted: a converted ``.safetensors``/``.npz`` (our keys: the whole model when it fits, else the
backbone), a PyTorch ``.pth``/``.safetensors`` state dict (a release checkpoint loads the whole
model; a torchvision ResNet-50 the backbone), or ``torchvision:IMAGENET1K_V1`` / ``IMAGENET1K_V2``.
The torchvision files are downloaded once into the cache (``$CSCE_JAX_CACHE`` or
``~/.cache/csce_jax``) when the network is there; their SHA-256 must start with the 8 hex digits
torchvision publishes in the file name (as torch.hub checks). Without network the error says
where to put the file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.request
from pathlib import Path

from absl import logging
from flax import nnx

from csce_jax.convert import (
    ConversionError,
    load_flat_arrays,
    load_torch_state_dict,
    normalize_release_keys,
    read_state_file,
)

TORCHVISION_WEIGHTS = {
    "IMAGENET1K_V1": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "IMAGENET1K_V2": "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
}


def cache_dir() -> Path:
    return Path(os.environ.get("CSCE_JAX_CACHE", Path.home() / ".cache" / "csce_jax"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def torchvision_file(name: str, *, download: bool = True) -> Path:
    """The cached torchvision ResNet-50 file for ``name``, downloaded if needed and possible."""
    if name not in TORCHVISION_WEIGHTS:
        raise ConversionError(
            f"unknown torchvision weights {name!r}; known: {', '.join(TORCHVISION_WEIGHTS)}"
        )
    url = TORCHVISION_WEIGHTS[name]
    fname = url.rsplit("/", 1)[1]
    prefix = fname.split("-")[1].split(".")[0]
    path = cache_dir() / fname
    if not path.is_file() and download:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        try:
            logging.info("downloading %s to %s", url, path)
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
                shutil.copyfileobj(response, f)
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise ConversionError(
                f"cannot download {url} ({e}); download it elsewhere and put it at {path}"
            ) from e
    if not path.is_file():
        raise ConversionError(f"{path} not found: download {url} and put it there")
    digest = _sha256(path)
    if not digest.startswith(prefix):
        raise ConversionError(
            f"{path}: SHA-256 {digest[:16]}... does not start with the "
            f"published {prefix}; the file is corrupt, delete it and retry"
        )
    return path


def initialize_from(model: nnx.Module, spec: str) -> str:
    """Load ``spec`` into ``model``; returns what was loaded ("model" or "backbone")."""
    if spec.startswith("torchvision:"):
        path = torchvision_file(spec.split(":", 1)[1])
    else:
        path = Path(spec)
    arrays = read_state_file(path)
    if any("/" in k for k in arrays):  # our converted layout
        try:
            load_flat_arrays(model, arrays, str(path))
            what = "model"
        except ConversionError:
            load_flat_arrays(model, arrays, str(path), only="backbone")
            what = "backbone"
    elif "ce_fc.centroids" in normalize_release_keys(arrays):
        load_torch_state_dict(model, arrays)
        what = "model"
    else:
        load_torch_state_dict(model, arrays, only="backbone")
        what = "backbone"
    logging.info("initialised the %s from %s", what, path)
    return what
