"""``model.init_from``: initialise a CSCE-Net from a file or from torchvision's ImageNet weights.

Accepted: a converted ``.safetensors``/``.npz`` (our keys), a PyTorch ``.pth``/``.pt``/
``.safetensors`` state dict (a release checkpoint or a torchvision ResNet-50), or
``torchvision:IMAGENET1K_V1`` / ``IMAGENET1K_V2``.

Loading is all or nothing. ``scope`` says what is loaded: ``"model"`` (every key of the model
must be in the file, and the file may hold nothing else), ``"backbone"`` (only the ResNet trunk;
the file's other keys are ignored) or ``"auto"``: the backbone for torchvision's ImageNet
weights, the whole model for anything else. A file that does not fit is an error listing every
missing, unknown and mis-shaped key; nothing is loaded half-way.

The torchvision files are downloaded once into the cache (``$CSCE_JAX_CACHE`` or
``~/.cache/csce_jax``) when the network is there; the download's SHA-256 must start with the 8
hex digits torchvision publishes in the file name (as torch.hub checks) before it is renamed
into the cache, so a bad download never stays there. Without network the error says where to
put the file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.request
from pathlib import Path

from absl import logging
from flax import nnx

from csce_jax.config.schema import choices
from csce_jax.convert import load_flat_arrays, load_torch_state_dict, read_state_file
from csce_jax.errors import ConfigError, ConversionError
from csce_jax.runtime.startup import cache_dir

TORCHVISION_WEIGHTS = {
    "IMAGENET1K_V1": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "IMAGENET1K_V2": "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
}


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
        tmp = path.with_name(path.name + ".part")
        try:
            logging.info("downloading %s to %s", url, path)
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
                shutil.copyfileobj(response, f)
            _check_digest(tmp, prefix, url)
            os.replace(tmp, path)
        except OSError as e:
            raise ConversionError(
                f"cannot download {url} ({e}); download it elsewhere and put it at {path}"
            ) from e
        finally:
            tmp.unlink(missing_ok=True)
    if not path.is_file():
        raise ConversionError(f"{path} not found: download {url} and put it there")
    _check_digest(path, prefix, url)
    return path


def _check_digest(path: Path, prefix: str, url: str) -> None:
    digest = _sha256(path)
    if not digest.startswith(prefix):
        raise ConversionError(
            f"{path}: SHA-256 {digest[:16]}... does not start with the {prefix} published "
            f"for {url}; the file is corrupt or not that file: delete it and retry"
        )


SCOPES = choices("model.init_scope")


def initialize_from(model: nnx.Module, spec: str, scope: str = "auto") -> str:
    """Load ``spec`` into ``model``, all or nothing; returns what was loaded (the scope)."""
    if scope not in SCOPES:
        raise ConfigError(f"config.model.init_scope={scope!r}: must be one of {SCOPES}")
    torchvision = spec.startswith("torchvision:")
    if scope == "auto":
        scope = "backbone" if torchvision else "model"
    path = torchvision_file(spec.split(":", 1)[1]) if torchvision else Path(spec)
    arrays = read_state_file(path)
    only = None if scope == "model" else "backbone"
    try:
        if any("/" in k for k in arrays):  # our converted layout
            load_flat_arrays(model, arrays, str(path), only=only)
        else:
            load_torch_state_dict(model, arrays, only=only, source=str(path))
    except ConversionError as e:
        if scope == "model":
            raise ConversionError(
                f"{e}\n(to load only the ResNet backbone from this file, set "
                "model.init_scope=backbone)"
            ) from None
        raise
    logging.info("initialised the %s from %s", scope, path)
    return scope
