"""Scoring: every figure ``eval.py`` reports, for a run's checkpoint, a weights file, or codes
made elsewhere (``.npy``), with the metric of ``csce_jax.metrics``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from csce_jax import metrics, runtime, state, viz
from csce_jax.builders import view_config
from csce_jax.data import load_data
from csce_jax.encoding import Encoder
from csce_jax.errors import CodesError, ConfigError
from csce_jax.sharding import make_mesh, replicated
from csce_jax.writers import write_file_atomically, write_text_atomically

PRECISION_KS = (1, 10, 50, 100, 500, 1000, 5000)


def retrieval_map(
    query: dict[str, np.ndarray], database: dict[str, np.ndarray], topk: int | None
) -> float:
    """mAP@topk of encoded query vs database (ties by database index)."""
    return metrics.mean_average_precision(
        query["codes"], database["codes"], query["labels"], database["labels"], topk
    )


def score_codes(
    query: dict[str, np.ndarray], database: dict[str, np.ndarray], topk: int | None, bits: int
) -> dict[str, Any]:
    """Every figure eval.py reports for encoded query / database sets."""
    ks = sorted({topk, None}, key=lambda k: k or 1 << 62)
    args = (query["codes"], database["codes"], query["labels"], database["labels"])
    maps = metrics.map_at_ks(*args, ks)
    n_db = len(database["codes"])
    pk = metrics.precision_recall_at_k(*args, [k for k in PRECISION_KS if k <= n_db] or [n_db])
    radius = metrics.hamming_radius_curve(*args)
    return {
        "map": maps["map@all" if topk is None else f"map@{topk}"],
        "topk": topk if topk is not None else "all",
        **maps,
        "precision_at_k": dict(zip(map(str, pk["k"]), pk["precision"], strict=True)),
        "recall_at_k": dict(zip(map(str, pk["k"]), pk["recall"], strict=True)),
        "precision_within_radius_2": radius["precision"][min(2, bits)],
        "pr_curve": {
            "radius": radius["radius"],
            "precision": radius["precision"],
            "recall": radius["recall"],
        },
        "bits": bits,
        "num_query": len(query["codes"]),
        "num_database": n_db,
    }


def load_run_config(
    workdir: str | os.PathLike, config: ml_collections.ConfigDict | None
) -> ml_collections.ConfigDict:
    """The config given, else the one the run saved in ``<workdir>/config.json``."""
    if config is not None:
        return config
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path} not found: pass --config, or point --workdir at a run")
    try:
        c = ml_collections.ConfigDict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    c.model.depths = tuple(c.model.depths)
    c.model.window_sizes = tuple(c.model.window_sizes)
    return c


def save_codes(out_dir: Path, name: str, enc: dict[str, np.ndarray]) -> None:
    """``<name>_codes.npy`` (packed uint8 bits), ``<name>_labels.npy``, ``<name>_index.npy``."""
    arrays = {
        "codes": metrics.pack_codes(enc["codes"]),
        "labels": enc["labels"],
        "index": enc["index"],
    }
    for kind, array in arrays.items():
        write_file_atomically(out_dir / f"{name}_{kind}.npy", lambda f, a=array: np.save(f, a))


def run_eval(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    step: int | None = None,
    export_only: bool = False,
    grid_queries: int = 5,
    weights_file: str | None = None,
) -> dict[str, Any]:
    """Encode the query and database sets with a checkpoint (or a weights file, e.g. a converted
    PyTorch checkpoint) and write ``<workdir>/eval/``. The checkpoints are only read."""
    runtime.prepare_jax(config)
    data = load_data(config.data)
    mesh = make_mesh()
    if weights_file:
        graphdef, weights = state.weights_from_file(config, data.num_classes, weights_file)
        weights = jax.device_put(weights, replicated(mesh))
        got_step: Any = f"weights file {weights_file}"
    else:
        graphdef, weights, got_step = state.restore_weights(
            config, workdir, data.num_classes, step, mesh=mesh
        )
    encoder = Encoder(graphdef, config, mesh)
    pair = (weights["params"], weights["rest"])
    query = encoder.encode(pair, data.query)
    database = encoder.encode(pair, data.database)
    out_dir = Path(workdir) / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    save_codes(out_dir, "query", query)
    save_codes(out_dir, "database", database)
    result: dict[str, Any] = {
        "checkpoint_step": got_step,
        "bits": config.bits,
        "data": config.data.name,
    }
    if export_only:
        return {**result, "written_to": str(out_dir.absolute())}
    result.update(score_codes(query, database, data.topk, config.bits))
    title = f"{config.data.name}, {config.bits} bits, step {got_step}"
    viz.plot_pr_curve(result["pr_curve"], str(out_dir / "pr_curve.png"), title)
    n = len(query["index"])
    rows = np.linspace(0, n - 1, min(grid_queries, n), dtype=int)
    viz.retrieval_grid(
        data.query,
        data.database,
        query,
        database,
        [int(query["index"][r]) for r in rows],
        str(out_dir / "retrieval_grid.png"),
        view_config(config, train=False),
    )
    write_json(out_dir / "metrics.json", result)
    return {**result, "written_to": str(out_dir.absolute())}


# --- Codes made elsewhere ----------------------------------------------------------------------


def _load_npy(path: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise CodesError(f"{path}: file not found") from None
    except (OSError, ValueError) as e:
        raise CodesError(f"{path}: not a .npy array: {e}") from None


def read_codes(path: str, bits: int | None) -> np.ndarray:
    """{-1,+1} codes (N, K) from a ``.npy`` of {-1,+1} values or of packed uint8 bytes."""
    codes = _load_npy(path)
    if codes.ndim != 2:
        raise CodesError(f"{path}: codes must be a 2-D array (N, bits), got shape {codes.shape}")
    if codes.size == 0:
        raise CodesError(f"{path}: no codes (an array of shape {codes.shape})")
    if codes.dtype == np.uint8:
        if bits is None:
            raise CodesError(f"{path} holds packed uint8 codes: pass --bits")
        if codes.shape[1] != -(-bits // 8):
            raise CodesError(
                f"{path}: {codes.shape[1]} bytes per code, but --bits {bits} packs into "
                f"{-(-bits // 8)}"
            )
        return metrics.unpack_codes(codes, bits)
    if not (np.issubdtype(codes.dtype, np.number) or codes.dtype == np.bool_):
        raise CodesError(f"{path}: codes of dtype {codes.dtype} (expected numbers)")
    values = codes.astype(np.float64)
    if not np.isfinite(values).all():
        raise CodesError(f"{path}: {int((~np.isfinite(values)).sum())} non-finite code values")
    if not np.isin(values, (-1.0, 1.0)).all():
        bad = values[~np.isin(values, (-1.0, 1.0))][:5]
        raise CodesError(
            f"{path}: codes must be -1 or +1 (or packed uint8 with --bits), found {bad.tolist()}"
        )
    if bits is not None and bits != codes.shape[1]:
        raise CodesError(f"{path}: {codes.shape[1]}-bit codes, but --bits {bits}")
    return values.astype(np.int8)


def read_labels(path: str, count: int, codes_path: str) -> np.ndarray:
    """Class indices (N,) or 0/1 multi-hot vectors (N, C), checked against ``count`` codes."""
    labels = _load_npy(path)
    if labels.ndim not in (1, 2):
        raise CodesError(f"{path}: labels must be 1-D or 2-D, got shape {labels.shape}")
    if len(labels) != count:
        raise CodesError(f"{codes_path} has {count} codes but {path} {len(labels)} labels")
    if not (np.issubdtype(labels.dtype, np.number) or labels.dtype == np.bool_):
        raise CodesError(f"{path}: labels of dtype {labels.dtype} (expected integers)")
    values = labels.astype(np.float64)
    if not np.isfinite(values).all() or (values != np.round(values)).any():
        raise CodesError(f"{path}: labels must be whole numbers (class indices or 0/1 vectors)")
    if labels.ndim == 2 and not np.isin(values, (0.0, 1.0)).all():
        raise CodesError(f"{path}: 2-D labels must be 0/1 (one- or multi-hot)")
    if labels.ndim == 1 and (values < 0).any():
        raise CodesError(f"{path}: class indices must be >= 0")
    return values.astype(np.int64) if labels.ndim == 1 else values.astype(np.int8)


def score_npy(
    query_codes: str,
    db_codes: str,
    query_labels: str,
    db_labels: str,
    topk: int | None,
    bits: int | None = None,
) -> dict[str, Any]:
    """Score codes produced elsewhere (e.g. the PyTorch release) with the same metric.

    Malformed input is refused with :class:`CodesError`: codes of other widths, non-finite or
    non-binary values, packed codes that do not fit ``bits``, fractional labels.
    """
    q, d = read_codes(query_codes, bits), read_codes(db_codes, bits)
    if q.shape[1] != d.shape[1]:
        raise CodesError(
            f"{query_codes} holds {q.shape[1]}-bit codes but {db_codes} {d.shape[1]}-bit codes"
        )
    ql = read_labels(query_labels, len(q), query_codes)
    dl = read_labels(db_labels, len(d), db_codes)
    if ql.ndim == 2 and dl.ndim == 2 and ql.shape[1] != dl.shape[1]:
        raise CodesError(
            f"{query_labels} has {ql.shape[1]} classes per vector but {db_labels} {dl.shape[1]}"
        )
    if topk is not None and topk <= 0:
        raise CodesError(f"--topk {topk}: must be positive (or -1 for the whole database)")
    return score_codes({"codes": q, "labels": ql}, {"codes": d, "labels": dl}, topk, q.shape[1])


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """Write ``obj`` as JSON atomically (temporary file, then rename)."""
    write_text_atomically(path, json.dumps(obj, indent=2, sort_keys=True))
