"""Encoding splits into binary codes (sharded, padded + masked) and scoring them.

Used by the trainer's periodic evaluation, by ``eval.py`` and by ``csce_jax.search``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from csce_jax import metrics
from csce_jax.builders import balance, compute_dtype
from csce_jax.data.images import normalize
from csce_jax.data.pipeline import EvalLoader, ViewConfig
from csce_jax.data.sources import Source
from csce_jax.hashing import encode
from csce_jax.sharding import data_sharded, gather, global_batch, replicated


class Encoder:
    """Jitted image -> code step for one model structure; state passed per call."""

    def __init__(self, graphdef: Any, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
        self.mesh = mesh
        self.config = config
        raw = config.release_compat.raw_eval_band
        bal = balance(config)
        dtype = compute_dtype(config)

        def step(state, images):
            model = nnx.merge(graphdef, *state, copy=True)
            out = model(normalize(images, dtype))
            codes = encode(out.codes, out.threshold, raw_eval_band=raw, balance=bal)
            return codes.astype(jnp.int8), out.codes

        self._step = jax.jit(
            step,
            in_shardings=(replicated(mesh), data_sharded(mesh)),
            out_shardings=data_sharded(mesh),
        )

    def encode(
        self, state: Any, source: Source, *, with_continuous: bool = False
    ) -> dict[str, np.ndarray]:
        """Codes of every record of ``source`` in source order: {"codes", "labels"[, "v"]}."""
        c = self.config
        loader = EvalLoader(
            source,
            global_batch=c.eval_batch_size,
            view=ViewConfig(c.data.resize, c.data.crop, False),
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            num_threads=c.data.num_threads,
            skip_corrupt=c.data.skip_corrupt,
        )
        codes, cont, index = [], [], []
        for host in loader.batches():
            batch = global_batch(self.mesh, {"image": host["image"], "index": host["index"]})
            b, v = self._step(state, batch["image"])
            idx = gather(batch["index"])
            keep = idx >= 0
            codes.append(gather(b)[keep])
            index.append(idx[keep])
            if with_continuous:
                cont.append(gather(v)[keep])
        index = np.concatenate(index)
        order = np.argsort(index, kind="stable")
        index = index[order]
        out = {
            "codes": np.concatenate(codes)[order],
            "index": index,
            "labels": source.labels[index],
        }
        if with_continuous:
            out["v"] = np.concatenate(cont)[order]
        if loader.corrupt.count:
            out["skipped"] = loader.corrupt.names
        return out


def retrieval_map(
    query: dict[str, np.ndarray], database: dict[str, np.ndarray], topk: int | None
) -> float:
    """mAP@topk of encoded query vs database (ties by database index)."""
    return metrics.mean_average_precision(
        query["codes"], database["codes"], query["labels"], database["labels"], topk
    )


# --- Scoring a checkpoint (eval.py) -----------------------------------------------------------

PR_CURVE_SIZE = (600, 450)  # pixels of pr_curve.png
GRID_CELL = 96  # pixels per image in retrieval_grid.png (plus a 4-pixel frame)
GRID_TOPK = 10


def score_codes(
    query: dict[str, np.ndarray], database: dict[str, np.ndarray], topk: int | None, bits: int
) -> dict[str, Any]:
    """Every figure eval.py reports for encoded query / database sets."""
    ks = sorted({topk, None}, key=lambda k: k or 1 << 62)
    args = (query["codes"], database["codes"], query["labels"], database["labels"])
    maps = metrics.map_at_ks(*args, ks)
    n_db = len(database["codes"])
    pk = metrics.precision_recall_at_k(
        *args, [k for k in (1, 10, 50, 100, 500, 1000, 5000) if k <= n_db] or [n_db]
    )
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


def plot_pr_curve(curve: dict[str, list[float]], path: str, title: str) -> None:
    """Precision-recall over Hamming radius as a PNG of PR_CURVE_SIZE pixels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w, h = PR_CURVE_SIZE
    fig, ax = plt.subplots(figsize=(w / 100, h / 100), dpi=100)
    ax.plot(curve["recall"], curve["precision"], marker=".")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def retrieval_grid(
    query_src: Source,
    db_src: Source,
    query: dict[str, np.ndarray],
    database: dict[str, np.ndarray],
    rows: list[int],
    path: str,
    view: ViewConfig,
) -> tuple[int, int]:
    """Each row: a query, then its top GRID_TOPK results framed green (relevant) or red.

    Returns the (width, height) of the PNG written.
    """
    from PIL import Image, ImageDraw

    from csce_jax.data.images import load_rgb
    from csce_jax.data.pipeline import eval_view

    cell = GRID_CELL + 8
    width, height = cell * (GRID_TOPK + 1) + 12, cell * len(rows)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    q_idx = np.searchsorted(query["index"], rows)
    dist = metrics.hamming_distances(query["codes"][q_idx], database["codes"])
    rel = metrics._relevance_fn(query["labels"][q_idx], database["labels"])(slice(None))

    def tile(src: Source, i: int) -> Image.Image:
        rec = src[int(i)]
        arr = eval_view(
            load_rgb(rec["image"], view.resize, rec["where"]), resize=view.resize, crop=view.crop
        )
        return Image.fromarray(arr).resize((GRID_CELL, GRID_CELL))

    for r, qi in enumerate(q_idx):
        y = r * cell
        canvas.paste(tile(query_src, query["index"][qi]), (4, y + 4))
        draw.rectangle([0, y, cell - 1, y + cell - 1], outline="black", width=4)
        order = np.argsort(dist[r], kind="stable")[:GRID_TOPK]
        for c, j in enumerate(order, 1):
            x = c * cell + 12
            canvas.paste(tile(db_src, database["index"][j]), (x + 4, y + 4))
            color = (30, 160, 60) if rel[r, j] else (210, 40, 40)
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], outline=color, width=4)
    canvas.save(path)
    return width, height


def load_run_config(
    workdir: str, config: ml_collections.ConfigDict | None
) -> ml_collections.ConfigDict:
    """The config given, else the one the run saved in ``<workdir>/config.json``."""
    if config is not None:
        return config
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass --config, or point --workdir at a run")
    c = ml_collections.ConfigDict(json.loads(path.read_text()))
    c.model.depths = tuple(c.model.depths)
    c.model.window_sizes = tuple(c.model.window_sizes)
    return c


def restore_weights(
    config: ml_collections.ConfigDict, workdir: str, num_classes: int, step: int | None = None
) -> tuple[Any, Any, int]:
    """(eval graphdef, (params, rest), step) of the best checkpoint, or of ``step``."""
    from csce_jax.checkpointing import CheckpointError, Checkpoints
    from csce_jax.train_lib import create_train_state

    setup = create_train_state(config, num_classes)
    ckpts = Checkpoints(workdir, keep=config.keep_checkpoints)
    try:
        found = (
            ckpts.restore_latest(setup.state, step)
            if step is not None
            else ckpts.restore_best(setup.state) or ckpts.restore_latest(setup.state)
        )
    finally:
        ckpts.close()
    if found is None:
        raise CheckpointError(f"no checkpoint in {Path(workdir) / 'checkpoints'}")
    got_step, state, meta = found
    if meta.get("centers") != setup.fingerprint:
        raise CheckpointError(
            f"checkpoint step {got_step} in {workdir} was made with other hash "
            "centres than this config gives (bits, classes or centers_seed)"
        )
    return setup.eval_graphdef, (state["params"], state["rest"]), got_step


def save_codes(out_dir: Path, name: str, enc: dict[str, np.ndarray]) -> None:
    """``<name>_codes.npy`` (packed uint8 bits), ``<name>_labels.npy``, ``<name>_index.npy``."""
    np.save(out_dir / f"{name}_codes.npy", metrics.pack_codes(enc["codes"]))
    np.save(out_dir / f"{name}_labels.npy", enc["labels"])
    np.save(out_dir / f"{name}_index.npy", enc["index"])


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
    PyTorch checkpoint) and write ``<workdir>/eval/``."""
    from csce_jax.data import load_data
    from csce_jax.sharding import make_mesh

    data = load_data(config.data)
    if weights_file:
        from csce_jax.train_lib import create_train_state

        setup = create_train_state(config, data.num_classes, init_from=weights_file)
        graphdef, weights = setup.eval_graphdef, (setup.state["params"], setup.state["rest"])
        got_step = f"weights file {weights_file}"
    else:
        graphdef, weights, got_step = restore_weights(config, workdir, data.num_classes, step)
    encoder = Encoder(graphdef, config, make_mesh())
    query = encoder.encode(weights, data.query)
    database = encoder.encode(weights, data.database)
    out_dir = Path(workdir) / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    save_codes(out_dir, "query", query)
    save_codes(out_dir, "database", database)
    result: dict[str, Any] = {
        "checkpoint_step": got_step,
        "bits": config.bits,
        "data": config.data.name,
    }
    if not export_only:
        result.update(score_codes(query, database, data.topk, config.bits))
        plot_pr_curve(
            result["pr_curve"],
            str(out_dir / "pr_curve.png"),
            f"{config.data.name}, {config.bits} bits, step {got_step}",
        )
        rows = list(
            np.linspace(
                0, len(query["index"]) - 1, min(grid_queries, len(query["index"])), dtype=int
            )
        )
        retrieval_grid(
            data.query,
            data.database,
            query,
            database,
            [int(query["index"][r]) for r in rows],
            str(out_dir / "retrieval_grid.png"),
            ViewConfig(config.data.resize, config.data.crop, False),
        )
        _write_json(out_dir / "metrics.json", result)
    return result


def score_npy(
    query_codes: str,
    db_codes: str,
    query_labels: str,
    db_labels: str,
    topk: int | None,
    bits: int | None = None,
) -> dict[str, Any]:
    """Score codes produced elsewhere (e.g. the PyTorch release) with the same metric."""
    q, d = np.load(query_codes), np.load(db_codes)
    if q.dtype == np.uint8 and bits is None:
        raise ValueError(f"{query_codes} holds packed uint8 codes: pass --bits")
    k = bits or q.shape[1]
    enc_q = {"codes": q, "labels": np.load(query_labels)}
    enc_d = {"codes": d, "labels": np.load(db_labels)}
    if len(enc_q["codes"]) != len(enc_q["labels"]):
        raise ValueError(
            f"{query_codes} has {len(q)} codes but {query_labels} {len(enc_q['labels'])} labels"
        )
    if len(enc_d["codes"]) != len(enc_d["labels"]):
        raise ValueError(
            f"{db_codes} has {len(d)} codes but {db_labels} {len(enc_d['labels'])} labels"
        )
    if q.dtype == np.uint8:
        enc_q["codes"] = metrics.unpack_codes(q, k)
        enc_d["codes"] = metrics.unpack_codes(d, k)
    return score_codes(enc_q, enc_d, topk, k)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)
