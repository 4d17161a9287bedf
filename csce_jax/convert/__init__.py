"""Convert between PyTorch state dicts (torchvision ResNet-50, the release's ResNet_DOLG) and ours.

The mapping is a name table plus layout changes: conv weights OIHW -> HWIO, Linear (out, in) ->
(in, out), the release's window-fusion Conv1d (1, W, 1) -> (W, 1), BatchNorm weight/bias/
running_mean/running_var -> scale/bias/mean/var. Release checkpoints hold the stem, layer1 and
layer2 twice (also as ``input.0``, ``input.1``, ``input.4``, ``input.5``); both spellings are
accepted and must agree. Unknown, missing and mis-shaped keys are all reported by name before
anything is written into the model.

Converted files are ``.safetensors`` keyed by our own state paths (``backbone/layer1/0/conv1/
kernel``), NHWC, loadable without torch. Exports to PyTorch hold the release's full
``ResNet_DOLG`` state-dict layout (the ``input.*`` copies and BatchNorm counters included):
``.pt``/``.pth`` via ``torch.save`` (what the release's ``torch.load`` + ``load_state_dict``
reads), or ``.safetensors``. Command line::

  csce-convert torch-to-jax --src release.pth --dst model.safetensors
  csce-convert jax-to-torch --src model.safetensors --dst model.pt
  csce-convert export --src runs/x [--step N] --dst model.safetensors  # or .pt

``export`` (``csce_jax.api.export_run``) writes a trained run's best (or ``--step``) checkpoint as a file. Weights that are
not finite are refused on reading and on writing, naming the key; ``--dst`` may not be
``--src``.
"""

from __future__ import annotations

import collections
import os
import re
from collections.abc import Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from csce_jax.errors import ConversionError
from csce_jax.models import CSCENet
from csce_jax.models.csce import num_windows
from csce_jax.models.resnet import downsampled_size
from csce_jax.utils.atomic import write_file_atomically

# Our top-level names -> the release's (the backbone's names are torchvision's, unprefixed).
_TOP_LEVEL = {
    "local": "localmodel",
    "window_proj.0": "conv_f4_s1",
    "window_proj.1": "conv_f4_s2",
    "window_fusion": "conv_last",
    "hash_fc": "fc",
    "threshold_fc": "fc_t",
    "centers": "ce_fc.centroids",
}
_LEAF = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
}
# The release's ``input`` Sequential re-registers these modules under other names.
_RELEASE_ALIASES = {
    "input.0.": "conv1.",
    "input.1.": "bn1.",
    "input.4.": "layer1.",
    "input.5.": "layer2.",
}
_IGNORED = re.compile(r"(^|\.)num_batches_tracked$")


def _our_key(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def torch_name(path: tuple) -> str:
    """The PyTorch state-dict key of one of our state paths."""
    parts = [str(p) for p in path]
    if parts[0] == "backbone":
        return ".".join([*parts[1:-1], _LEAF[parts[-1]]])
    if parts[0] == "centers":
        return _TOP_LEVEL["centers"]
    dotted = ".".join(parts[:-1])
    for ours, theirs in _TOP_LEVEL.items():
        if dotted == ours or dotted.startswith(ours + "."):
            dotted = theirs + dotted[len(ours) :]
            break
    return dotted + "." + _LEAF[parts[-1]]


def _to_ours(name: str, value: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    if value.ndim == 4:  # conv OIHW -> HWIO
        value = value.transpose(2, 3, 1, 0)
    elif value.ndim == 3 and name.endswith("weight"):  # Conv1d (1, W, 1) -> (W, 1)
        value = value[:, :, 0].T
    elif value.ndim == 2 and len(target_shape) == 2 and not name.endswith("centroids"):
        value = value.T  # Linear (out, in) -> (in, out)
    return value


def _torch_shape(name: str, shape: tuple[int, ...], is_fusion: bool) -> tuple[int, ...]:
    """The PyTorch-layout shape of one of our arrays of ``shape``."""
    return _to_torch(name, np.broadcast_to(np.zeros((), np.int8), shape), is_fusion).shape


def _to_torch(name: str, value: np.ndarray, is_fusion: bool) -> np.ndarray:
    if value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    if is_fusion and name.endswith("weight"):
        return value.T[:, :, None]
    if value.ndim == 2 and not name.endswith("centroids"):
        return value.T
    return value


def release_name(key: str) -> str:
    """A release state-dict key under one name: no ``module.`` prefix (DataParallel), the
    ``input.*`` aliases of the stem, layer1 and layer2 folded into their own names."""
    key = key.removeprefix("module.")
    for alias, original in _RELEASE_ALIASES.items():
        if key.startswith(alias):
            return original + key[len(alias) :]
    return key


def normalize_release_keys(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Strip ``module.`` prefixes, fold the release's ``input.*`` aliases, drop BN counters.

    Raises :class:`ConversionError` if an alias and its original disagree.
    """
    out: dict[str, np.ndarray] = {}
    disagree = []
    for key, value in state_dict.items():
        key = release_name(key)
        if _IGNORED.search(key):
            continue
        value = np.asarray(value)
        if key in out:
            if out[key].shape != value.shape or not np.array_equal(out[key], value):
                disagree.append(key)
            continue
        out[key] = value
    if disagree:
        raise ConversionError(
            "the checkpoint's `input.*` copies disagree with the named modules for: "
            + ", ".join(sorted(disagree))
        )
    return out


def load_torch_state_dict(
    model: nnx.Module,
    state_dict: Mapping[str, np.ndarray],
    *,
    only: str | None = None,
    ignore: tuple[str, ...] = (),
    source: str = "the state dict",
) -> None:
    """Load a PyTorch-layout state dict into ``model`` (a CSCENet), all or nothing.

    ``only="backbone"`` loads just the trunk (a torchvision ResNet-50 file: its ``fc.*`` is the
    ImageNet classifier and is ignored). ``ignore`` lists torch keys (prefixes) to skip.
    """
    sd = normalize_release_keys(state_dict)
    if only == "backbone":
        ignore = (*ignore, "fc.")
    state = nnx.state(model)
    flat = nnx.to_flat_state(state)
    expected: dict[str, tuple] = {}
    for path, var in flat:
        if only is not None and path[0] != only:
            continue
        expected[torch_name(path)] = (path, var)
    unknown = sorted(k for k in sd if k not in expected and not k.startswith(ignore))
    missing = sorted(k for k in expected if k not in sd)
    updates: dict[tuple, np.ndarray] = {}
    misshaped = []
    for key, (path, var) in expected.items():
        if key not in sd:
            continue
        value = _to_ours(key, sd[key], var.shape)
        if tuple(value.shape) != tuple(var.shape):
            wanted = _torch_shape(key, tuple(var.shape), path[0] == "window_fusion")
            misshaped.append(
                f"{key}: checkpoint {tuple(sd[key].shape)}, model wants {tuple(wanted)} "
                f"(PyTorch layout; {_our_key(path)} here)"
            )
            continue
        updates[path] = jnp.asarray(value, jnp.float32)
    problems = []
    if missing:
        problems.append("missing keys: " + ", ".join(missing))
    if unknown:
        problems.append("unknown keys: " + ", ".join(unknown))
    if misshaped:
        problems.append("mis-shaped keys: " + "; ".join(misshaped))
    if problems:
        raise ConversionError(f"{source} does not fit the model:\n  " + "\n  ".join(problems))
    new_state = nnx.from_flat_state(
        [(p, v.replace(updates[p]) if p in updates else v) for p, v in flat]
    )
    nnx.update(model, new_state)


def export_torch_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """Our model as a release-layout PyTorch state dict (numpy arrays; ``input.*`` not duplicated)."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        name = torch_name(path)
        out[name] = np.ascontiguousarray(
            _to_torch(name, np.asarray(var[...]), path[0] == "window_fusion")
        )
    return out


def release_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """The release's full ``ResNet_DOLG.state_dict()`` layout: every key of
    :func:`export_torch_state_dict`, the ``input.0/1/4/5`` copies of the stem, layer1 and
    layer2, and a ``num_batches_tracked`` counter (0) for every BatchNorm, so that
    ``load_state_dict(..., strict=True)`` accepts it."""
    base = export_torch_state_dict(model)
    out: dict[str, np.ndarray] = {}
    for key, value in base.items():
        out[key] = value
        if key.endswith(".running_var"):
            out[key[: -len("running_var")] + "num_batches_tracked"] = np.zeros((), np.int64)
    for alias, original in _RELEASE_ALIASES.items():
        for key in [k for k in out if k.startswith(original)]:
            out[alias + key[len(original) :]] = out[key]
    return out


def write_torch_file(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """``torch.save`` a state dict of tensors atomically (temporary file, then rename)."""
    check_finite(state_dict, str(path))
    try:
        import torch
    except ImportError as e:
        raise ConversionError(
            f"writing {path} needs torch (pip install torch==2.13.0); or write .safetensors"
        ) from e
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = collections.OrderedDict(
        (k, torch.from_numpy(np.array(v, copy=True))) for k, v in state_dict.items()
    )
    write_file_atomically(path, lambda f: torch.save(tensors, f))


IMAGE_SIZE_KEY = "image_size"  # a converted file's record of the input size (not a weight)


def flat_arrays(model: nnx.Module) -> dict[str, np.ndarray]:
    """Our model's whole state as {our key: array}, plus its input size: a converted file."""
    out = {_our_key(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))}
    out[IMAGE_SIZE_KEY] = np.asarray(model.image_size, np.int32)
    return out


def load_flat_arrays(
    model: nnx.Module, arrays: Mapping[str, np.ndarray], source: str, *, only: str | None = None
) -> None:
    """Load {our key: array} (a converted file) into ``model``, all or nothing.

    ``only="backbone"`` loads just the trunk's keys and ignores the file's other keys.
    """
    arrays = {k: v for k, v in arrays.items() if k != IMAGE_SIZE_KEY}
    flat = nnx.to_flat_state(nnx.state(model))
    if only is not None:
        arrays = {k: v for k, v in arrays.items() if k.split("/")[0] == only}
    expected = {_our_key(p): (p, v) for p, v in flat if only is None or p[0] == only}
    missing = sorted(set(expected) - set(arrays))
    unknown = sorted(set(arrays) - set(expected))
    misshaped = [
        f"{k}: file {tuple(arrays[k].shape)}, model {tuple(expected[k][1].shape)}"
        for k in sorted(set(arrays) & set(expected))
        if tuple(arrays[k].shape) != tuple(expected[k][1].shape)
    ]
    problems = [
        f"{label}: {', '.join(keys)}"
        for label, keys in (("missing", missing), ("unknown", unknown), ("mis-shaped", misshaped))
        if keys
    ]
    if problems:
        raise ConversionError(f"{source} does not fit the model:\n  " + "\n  ".join(problems))
    nnx.update(
        model,
        nnx.from_flat_state(
            [
                (p, v.replace(jnp.asarray(arrays[_our_key(p)])))
                for p, v in flat
                if _our_key(p) in expected
            ]
        ),
    )


def read_state_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read ``.pth``/``.pt`` (needs torch), ``.safetensors`` or ``.npz`` into numpy arrays."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.numpy import load_file

            return _finite(dict(load_file(str(path))), path)
        if suffix == ".npz":
            with np.load(path) as z:
                return _finite({k: z[k] for k in z.files}, path)
        if suffix in (".pth", ".pt", ".bin"):
            try:
                import torch
            except ImportError as e:
                raise ConversionError(
                    f"reading {path} needs torch (pip install torch==2.13.0), or convert it to "
                    ".safetensors where torch is installed"
                ) from e
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
            if (
                isinstance(obj, dict)
                and "state_dict" in obj
                and isinstance(obj["state_dict"], dict)
            ):
                obj = obj["state_dict"]
            if not isinstance(obj, dict):
                raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state dict")
            arrays = {k: v.detach().cpu().numpy() for k, v in obj.items() if hasattr(v, "detach")}
            if not arrays:
                raise ConversionError(f"{path} holds no tensors: {_describe(obj)}")
            return _finite(arrays, path)
    except ConversionError:
        raise
    except Exception as e:  # corrupt or truncated file: said in our words, not the library's
        kind = {".safetensors": "safetensors", ".npz": "numpy .npz"}.get(suffix, "PyTorch")
        if suffix in (".pth", ".pt", ".bin") and "Unsupported global" in str(e):
            raise ConversionError(
                f"cannot read {path}: it holds Python objects besides tensors, which a safe "
                "load refuses; save the model's state_dict() alone"
            ) from None
        raise ConversionError(
            f"cannot read {path}: not a whole {kind} file (truncated, damaged, or another "
            "format under that name)"
        ) from None
    raise ConversionError(
        f"{path}: unknown checkpoint format {suffix!r} (expected .pth, .pt, .safetensors or .npz)"
    )


def _describe(obj: dict) -> str:
    """What a loaded dict without tensors holds, in a few words: its keys and their types."""
    if not obj:
        return "an empty dict"
    items = [f"{k!r}: {type(v).__name__}" for k, v in list(obj.items())[:6]]
    more = f", ... ({len(obj)} keys)" if len(obj) > 6 else ""
    return "a dict of {" + ", ".join(items) + more + "}"


def check_finite(arrays: Mapping[str, np.ndarray], where: str) -> None:
    """Refuse weights with NaN or infinite values, naming the first such key."""
    for key, value in arrays.items():
        value = np.asarray(value)
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            bad = int((~np.isfinite(value)).sum())
            raise ConversionError(
                f"{where}: {key} holds {bad} non-finite value(s) (NaN or inf): a diverged or "
                "damaged model"
            )


def _finite(arrays: dict[str, np.ndarray], path: Path) -> dict[str, np.ndarray]:
    check_finite(arrays, str(path))
    return arrays


def write_state_file(arrays: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Write arrays atomically as ``.safetensors`` (or ``.npz``): temp file, then rename."""
    check_finite(arrays, str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    if path.suffix == ".npz":
        write_file_atomically(path, lambda f: np.savez(f, **arrays))
    else:
        from safetensors.numpy import save

        write_file_atomically(path, lambda f: f.write(save(arrays)))


def infer_architecture(state_dict: Mapping[str, np.ndarray]) -> dict:
    """Width, depths, bits and class count of a (normalised) release state dict."""
    sd = state_dict
    for key in ("conv1.weight", "fc.weight", "ce_fc.centroids", "conv_last.weight"):
        if key not in sd:
            held = ", ".join(sorted(sd)[:8]) + (", ..." if len(sd) > 8 else "")
            raise ConversionError(f"not a release checkpoint: no {key!r} (keys: {held or 'none'})")
    depths = []
    for stage in range(1, 5):
        blocks = {int(m.group(1)) for k in sd if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        depths.append(len(blocks))
    num_classes, bits = sd["ce_fc.centroids"].shape
    return {
        "width": sd["conv1.weight"].shape[0] / 64,
        "depths": tuple(depths),
        "bits": int(bits),
        "num_classes": int(num_classes),
        "num_windows": int(sd["conv_last.weight"].shape[1]),
        "use_aspp": False,
    }


def model_from_release(
    state_dict: Mapping[str, np.ndarray], *, image_size: int = 224, kernels: str = "auto"
) -> nnx.Module:
    """A complete CSCENet (centres included) from a release checkpoint's state dict."""

    sd = normalize_release_keys(state_dict)
    arch = infer_architecture(sd)
    f4 = downsampled_size(image_size, 5)
    if num_windows((f4, f4), (2, 4)) != arch["num_windows"]:
        raise ConversionError(
            f"the checkpoint fuses {arch['num_windows']} windows but image_size {image_size} "
            f"gives {num_windows((f4, f4), (2, 4))}: pass the image size it was trained at"
        )
    model = CSCENet(
        np.asarray(sd["ce_fc.centroids"]),
        image_size=image_size,
        width=arch["width"],
        depths=arch["depths"],
        kernels=kernels,
        rngs=nnx.Rngs(0),
    )
    load_torch_state_dict(model, sd)
    return model


TORCH_SUFFIXES = (".pt", ".pth")
OUR_SUFFIXES = (".safetensors", ".npz")


def _check_suffix(path: str, allowed: tuple[str, ...]) -> None:
    suffix = Path(path).suffix.lower()
    if suffix not in allowed:
        raise ConversionError(
            f"--dst {path}: unknown output format {suffix or '(none)'!r}; use one of "
            f"{', '.join(allowed)}"
        )


def check_distinct(src: str, dst: str) -> None:
    """Refuse a ``--dst`` that is the ``--src`` file (it would be overwritten)."""
    if Path(dst).absolute().resolve() == Path(src).absolute().resolve():
        raise ConversionError(
            f"--dst {dst} is --src: choose another file (it would be overwritten)"
        )


def convert_file(
    direction: str, src: str, dst: str, image_size: int = 224, *, step: int | None = None
) -> str:
    """Convert ``src`` to ``dst`` (``torch-to-jax`` or ``jax-to-torch``); returns a one-line
    summary."""
    check_distinct(src, dst)
    if step is not None:
        raise ConversionError("--step goes with export (a run folder)")
    if direction == "torch-to-jax":
        _check_suffix(dst, OUR_SUFFIXES)
        sd = read_state_file(src)
        model = model_from_release(sd, image_size=image_size)
        write_state_file(flat_arrays(model), dst)
        return f"converted {src} -> {dst}: {infer_architecture(normalize_release_keys(sd))}"
    _check_suffix(dst, (*TORCH_SUFFIXES, ".safetensors"))
    model = model_from_flat(read_state_file(src), src)
    state_dict = release_state_dict(model)
    if Path(dst).suffix.lower() in TORCH_SUFFIXES:
        write_torch_file(state_dict, dst)
    else:
        write_state_file(state_dict, dst)
    return f"exported {src} -> {dst} in the release's ResNet_DOLG layout ({len(state_dict)} keys)"


def model_from_flat(arrays: Mapping[str, np.ndarray], source: str) -> nnx.Module:
    """A complete CSCENet from a converted file's arrays (our keys), architecture inferred."""
    arch = _arch_from_flat(arrays, source)
    model = CSCENet(arrays["centers"], rngs=nnx.Rngs(0), **arch)
    load_flat_arrays(model, arrays, source)
    return model


def _arch_from_flat(arrays: Mapping[str, np.ndarray], source: str = "the file") -> dict:
    """Model arguments of a converted file (our keys)."""
    if "centers" not in arrays or "backbone/conv1/kernel" not in arrays:
        raise ConversionError(
            f"{source} is not a csce_jax converted file: no 'centers' / 'backbone/...' keys "
            "(a PyTorch state dict goes through torch-to-jax first)"
        )
    depths = tuple(
        len({k.split("/")[2] for k in arrays if k.startswith(f"backbone/layer{s}/")})
        for s in range(1, 5)
    )

    n_windows = arrays["window_fusion/kernel"].shape[0]
    if IMAGE_SIZE_KEY in arrays:
        size = tuple(int(x) for x in np.asarray(arrays[IMAGE_SIZE_KEY]).reshape(-1))
    else:  # an older file: the square size a multiple of 32 that gives that many windows
        f4 = next((f for f in range(4, 129) if num_windows((f, f), (2, 4)) == n_windows), None)
        if f4 is None:
            raise ConversionError(f"no square input size gives {n_windows} windows")
        size = (32 * f4, 32 * f4)
    return {
        "width": arrays["backbone/conv1/kernel"].shape[-1] / 64,
        "depths": depths,
        "image_size": size,
        "use_aspp": any(k.startswith("aspp/") for k in arrays),
    }
