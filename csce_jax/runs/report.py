"""Scoring: every figure ``eval.py`` reports, for a run's checkpoint, a weights file, or codes
made elsewhere (``.npy``), with the metric of ``csce_jax.retrieval.metrics``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from csce_jax.data import load_data
from csce_jax.errors import CodesError, ConfigError
from csce_jax.retrieval import evaluator, metrics, pictures
from csce_jax.retrieval.encoder import Encoder
from csce_jax.retrieval.evaluator import RetrievalEvaluator
from csce_jax.runs import builders, state
from csce_jax.runs.reader import RunReader
from csce_jax.runs.writer import layout
from csce_jax.runtime import startup
from csce_jax.runtime.sharding import make_mesh, replicated
from csce_jax.utils.atomic import write_file_atomically, write_json_atomically


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
    workdir: str,
    config: ml_collections.ConfigDict | None = None,
    *,
    step: int | None = None,
    prepared: str | None = None,
    export_only: bool = False,
    grid_queries: int = 5,
    weights_file: str | None = None,
) -> dict[str, Any]:
    """Encode the query and database sets with a run's checkpoint (or a weights file, e.g. a
    converted PyTorch checkpoint, with ``config``) and write ``<workdir>/eval/``; ``config``
    defaults to the run's own. The checkpoints are only read."""
    if weights_file and config is None:
        raise ConfigError("--weights needs --config (the architecture and data set)")
    reader = None if weights_file else RunReader(workdir)
    try:
        config = config if reader is None else reader.config(config)
        if prepared:
            config.data.prepared = prepared
        startup.prepare_jax(config)  # before JAX starts its backends
        run = None if reader is None else reader.encoding(config, step)
    finally:
        if reader is not None:
            reader.close()
    data = load_data(config.data)
    if run is None:
        encoder, pair = file_encoding(config, data.num_classes, weights_file)
        got_step: int | str = f"weights file {weights_file}"
    else:
        encoder, pair, got_step = run.encoder, run.weights, run.step
    scoring = RetrievalEvaluator(encoder, data.query, data.database, data.topk, curves=True)
    query, database = scoring.encode(pair)
    out_dir = layout(workdir).eval
    out_dir.mkdir(parents=True, exist_ok=True)
    save_codes(out_dir, "query", query)
    save_codes(out_dir, "database", database)
    result: dict[str, Any] = {"checkpoint_step": got_step, "data": config.data.name}
    if export_only:
        return {**result, "bits": config.bits, "written_to": str(out_dir)}
    result.update(scoring.score(query, database))
    write_figures(out_dir, result, data, query, database, config, grid_queries)
    return {**result, "written_to": str(out_dir)}


def file_encoding(
    config: ml_collections.ConfigDict, num_classes: int, weights_file: str
) -> tuple[Encoder, tuple[Any, Any]]:
    """The encoder of ``config``'s evaluation and the weights of ``weights_file`` (converted or
    PyTorch) on this host's devices."""
    mesh = make_mesh()
    graphdef, weights = state.weights_from_file(
        builders.create_model(config, num_classes), weights_file
    )
    pair = jax.device_put((weights["params"], weights["rest"]), replicated(mesh))
    return builders.make_encoder(config, graphdef, mesh), pair


def write_figures(out_dir: Path, result, data, query, database, config, grid_queries: int) -> None:
    """``pr_curve.png``, ``retrieval_grid.png`` (``grid_queries`` evenly spaced queries) and
    ``metrics.json``."""
    title = f"{config.data.name}, {config.bits} bits, step {result['checkpoint_step']}"
    pictures.plot_pr_curve(result["pr_curve"], str(out_dir / "pr_curve.png"), title)
    n = len(query["index"])
    rows = np.linspace(0, n - 1, min(grid_queries, n), dtype=int)
    pictures.retrieval_grid(
        data.query,
        data.database,
        query,
        database,
        [int(query["index"][r]) for r in rows],
        str(out_dir / "retrieval_grid.png"),
        builders.view_config(config, train=False),
    )
    write_json_atomically(out_dir / "metrics.json", result)


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
    if np.iscomplexobj(codes):
        raise CodesError(f"{path}: codes of dtype {codes.dtype} (complex; expected -1 or +1)")
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
    if np.iscomplexobj(labels) or not (
        np.issubdtype(labels.dtype, np.number) or labels.dtype == np.bool_
    ):
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
    if ql.ndim != dl.ndim:
        kinds = {1: "class indices (1-D)", 2: "0/1 label vectors (2-D)"}
        raise CodesError(
            f"{query_labels} holds {kinds[ql.ndim]} but {db_labels} {kinds[dl.ndim]}: give "
            "both in one form"
        )
    if ql.ndim == 2 and dl.ndim == 2 and ql.shape[1] != dl.shape[1]:
        raise CodesError(
            f"{query_labels} has {ql.shape[1]} classes per vector but {db_labels} {dl.shape[1]}"
        )
    if topk is not None and topk <= 0:
        raise CodesError(f"--topk {topk}: must be positive (or -1 for the whole database)")
    return evaluator.score(
        {"codes": q, "labels": ql}, {"codes": d, "labels": dl}, topk, curves=True
    )
