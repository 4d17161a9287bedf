"""The trained encoder as a deployable artifact: ONNX (through jax2onnx) or serialized StableHLO
(through ``jax.export``), computing what :func:`csce_jax.encode` computes.

Input ``images``: uint8 (N, crop, crop, 3) RGB, N any, already prepared by the preprocessing
contract (shorter side resized to ``resize`` with PIL bilinear, torchvision's rounding, then a
centre crop of ``crop``: ``examples/onnx_encode.py`` holds it in numpy and Pillow). Outputs:
``codes`` int8 (N, bits) in {-1, +1} (the DSF binarisation with the run's settings),
``packed`` uint8 (N, ceil(bits / 8)) (bit k is bit k % 8 of byte k // 8: the layout of our
indexes and of the Milvus collection), and with ``logits`` the cosine logits (N, classes).

The metadata (:func:`artifact_metadata`) travels inside the ONNX file (``metadata_props``,
key ``csce_jax``) and beside a StableHLO file (``<file>.json``). Every export is checked before
it is kept: the artifact is run on a few images and must give the JAX function's codes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from csce_jax.errors import ConversionError
from csce_jax.hashing import binarize, centers_fingerprint
from csce_jax.utils.atomic import write_file_atomically, write_json_atomically
from csce_jax.utils.encoder_artifact import FORMAT, FORMAT_VERSION, METADATA_KEY, parse_metadata

ONNX_OPSET = 23
EXPORT_INSTALL = "pip install --no-deps jax2onnx==0.17.1 && pip install -r requirements-export.txt"
STABLEHLO_PLATFORMS = ("cpu", "cuda", "tpu")
BIT_WEIGHTS = np.array([1, 2, 4, 8, 16, 32, 64, 128], np.int32)
CHECK_IMAGES = 3


def pack_bits(codes: jax.Array) -> jax.Array:
    """{-1, +1} codes (N, bits) -> uint8 (N, ceil(bits / 8)), little-endian bits in each byte,
    in operations every ONNX runtime has (no uint8 ranges or shifts)."""
    n, bits = codes.shape
    on = (codes > 0).astype(jnp.int32)
    pad = -bits % 8
    if pad:
        on = jnp.concatenate([on, jnp.zeros((n, pad), jnp.int32)], axis=1)
    on = on.reshape(n, (bits + pad) // 8, 8)
    return jnp.sum(on * jnp.asarray(BIT_WEIGHTS), axis=-1).astype(jnp.uint8)


def encoder_function(
    model: nnx.Module, *, raw_eval_band: bool, balance: float | None, logits: bool
):
    """images uint8 (N, crop, crop, 3) -> (codes, packed[, logits]) of the evaluation-mode
    ``model`` with its weights as constants."""
    graphdef, state = nnx.split(model)

    def encode(images: jax.Array):
        out = nnx.merge(graphdef, state)(images)
        codes = binarize(out.codes, out.threshold, raw_eval_band=raw_eval_band, balance=balance)
        codes = codes.astype(jnp.int8)
        return (codes, pack_bits(codes), out.logits) if logits else (codes, pack_bits(codes))

    return encode


def _encoder_of(loaded: Any, logits: bool):
    """:func:`encoder_function` of a :class:`csce_jax.api.LoadedModel`, with its settings."""
    return encoder_function(
        loaded.model, raw_eval_band=loaded.raw_eval_band, balance=loaded.balance, logits=logits
    )


def centers_digest(centers: np.ndarray) -> str:
    """sha256 of the hash centres as int8 (classes, bits): which codebook the codes live in."""
    return hashlib.sha256(np.ascontiguousarray(centers, np.int8).tobytes()).hexdigest()


def artifact_metadata(loaded: Any, source: str, kind: str, logits: bool) -> dict[str, Any]:
    """What a service must know to use the artifact, and where it came from."""
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "artifact": kind,
        "bits": int(loaded.bits),
        "classes": int(loaded.centers.shape[0]),
        "crop": int(loaded.crop),
        "resize": int(loaded.resize),
        "input": {"name": "images", "dtype": "uint8", "shape": ["N", loaded.crop, loaded.crop, 3]},
        "outputs": ["codes", "packed", "logits"] if logits else ["codes", "packed"],
        "preprocessing": (
            f"RGB; shorter side resized to {loaded.resize} (PIL bilinear; the longer side "
            f"int({loaded.resize} * long / short)); centre crop {loaded.crop} x {loaded.crop} "
            "(top and left round((side - crop) / 2)); uint8 HWC; no normalisation (inside)"
        ),
        "packed_layout": "bit k of a code is bit k % 8 (least significant first) of byte k // 8",
        "centers": centers_fingerprint(loaded.centers),  # as an index records them
        "centers_sha256": centers_digest(loaded.centers),
        "raw_eval_band": bool(loaded.raw_eval_band),
        "balance": loaded.balance,
        "source": str(Path(source).absolute()),
        "step": loaded.step,
        "jax": jax.__version__,
    }


def _check_images(crop: int, n: int = CHECK_IMAGES) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, crop, crop, 3), dtype=np.uint8)


def _check_same(kind: str, want: tuple, got: tuple) -> None:
    """The artifact must give the JAX function's codes bit for bit, and its logits closely."""
    if not (np.array_equal(np.asarray(want[0]), got[0]) and np.array_equal(want[1], got[1])):
        raise ConversionError(f"the {kind} artifact's codes differ from the model's: not written")
    if len(want) > 2 and not np.allclose(got[2], want[2], atol=1e-4 * float(np.abs(want[2]).max())):
        raise ConversionError(f"the {kind} artifact's logits differ from the model's: not written")


@contextlib.contextmanager
def _quiet(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def export_onnx(loaded: Any, source: str, dst: str, *, logits: bool = False) -> dict[str, Any]:
    """``loaded`` (a :class:`csce_jax.api.LoadedModel`) as an ONNX file ``dst``, opset
    ``ONNX_OPSET``, batch dimension symbolic, checked with onnxruntime before it is kept."""
    try:
        import onnx
        import onnxruntime
        from jax2onnx import to_onnx
    except ImportError as e:
        raise ConversionError(
            f"ONNX export needs jax2onnx and onnxruntime ({e.name}): {EXPORT_INSTALL}"
        ) from None
    fn = _encoder_of(loaded, logits)
    meta = artifact_metadata(loaded, source, "onnx", logits)
    meta["opset"] = ONNX_OPSET
    spec = jax.ShapeDtypeStruct(("N", loaded.crop, loaded.crop, 3), jnp.uint8)
    with _quiet("onnx_ir"):  # notes on constants whose shape it does not serialise
        proto = to_onnx(
            fn,
            [spec],
            model_name="csce_encoder",
            opset=ONNX_OPSET,
            input_names=["images"],
            output_names=meta["outputs"],
        )
    onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(meta, sort_keys=True)})
    data = proto.SerializeToString()
    images = _check_images(loaded.crop)
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    _check_same("ONNX", jax.jit(fn)(images), tuple(session.run(None, {"images": images})))
    write_file_atomically(Path(dst), lambda f: f.write(data))
    return meta


def export_stablehlo(loaded: Any, source: str, dst: str, *, logits: bool = False) -> dict[str, Any]:
    """``loaded`` as serialized StableHLO (``jax.export``) for CPU, CUDA and TPU (those it
    lowers for), the batch dimension symbolic; the metadata in ``<dst>.json``."""
    fn = _encoder_of(loaded, logits)
    (n,) = jax.export.symbolic_shape("N")
    spec = jax.ShapeDtypeStruct((n, loaded.crop, loaded.crop, 3), jnp.uint8)
    exported, platforms = None, list(STABLEHLO_PLATFORMS)
    while exported is None:
        try:
            exported = jax.export.export(jax.jit(fn), platforms=platforms)(spec)
        except Exception as e:  # a platform this JAX cannot lower for: leave it out
            dropped = next((p for p in platforms[1:] if p in str(e).lower()), None)
            if dropped is None:
                raise ConversionError(
                    f"cannot export StableHLO: {' '.join(str(e).split())[:300]}"
                ) from None
            platforms.remove(dropped)
    data = bytes(exported.serialize())
    images = _check_images(loaded.crop)
    again = jax.export.deserialize(bytearray(data))
    _check_same("StableHLO", jax.jit(fn)(images), tuple(np.asarray(x) for x in again.call(images)))
    meta = {**artifact_metadata(loaded, source, "stablehlo", logits), "platforms": platforms}
    write_file_atomically(Path(dst), lambda f: f.write(data))
    write_json_atomically(Path(f"{dst}.json"), meta)
    return meta


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of an exported ONNX file; one clear line for a file that is not one."""
    try:
        import onnx
    except ImportError:
        raise ConversionError(f"reading {path} needs onnx: {EXPORT_INSTALL}") from None
    try:
        proto = onnx.load(os.fspath(path), load_external_data=False)
    except Exception:
        raise ConversionError(
            f"cannot read {path}: not a whole ONNX file (truncated or damaged)"
        ) from None
    props = {p.key: p.value for p in proto.metadata_props}
    return parse_metadata(props.get(METADATA_KEY), str(path))
