"""Train the PyTorch reference of the release and our model side by side, on the same batches.

  csce-compare --config configs/default.py --steps 50 --workdir runs/cmp

With ``--gradients`` the command judges the port from one batch instead, tensor by tensor
against float64 (:mod:`csce_jax.bridge.gradients`): after the first RMSprop update the
trajectories of any two float32 runs part, so they show how training behaves, not whether the
port is right.

From one initialisation (our seeded init exported to PyTorch, ``--init release.pt``, or a run
folder's best checkpoint, ``--init runs/x``) both sides run N steps of the release's recipe
(every release-compat switch on: the release's DSF and loss, RMSprop with PyTorch semantics,
lr 1e-5, weight decay 1e-5) on the batches of our pipeline, with the same elastic margins, on
any data config (list files, Flowers-102, folders; multi-label data with the release's
multi-label loss). Each step's loss, its two terms and the gradient norm are recorded on each
side.

The first RMSprop steps are chaotic (each is about lr * sign(g)), so one trajectory cannot tell
a porting error from rounding. Beside the JAX-vs-PyTorch gap the report therefore shows the
floor that rounding alone gives on the same run (``--floor``, default ``both``): the PyTorch
side trained again in float64 (``floor`` = |PyTorch32 - PyTorch64|, ``jax_vs_torch64`` =
|JAX - PyTorch64|, relative to PyTorch64: how far each float32 run is from exact arithmetic),
and again in float32 from weights nudged by one unit in the last place (``nudged_floor`` =
|PyTorch32 nudged - PyTorch32|: how far rounding alone carries two float32 runs apart), per
step and series. Verdict (:func:`floor_verdict`): JAX stays within the floor when, for every
series, its median gap to PyTorch float32 over the steps is at most ``FLOOR_FACTOR`` (3) times
the larger median floor (and never held below float32's 1e-5 relative tolerance). At the end every side encodes the query and database sets, and the report gives
each side's mAP and the code bits that differ between each pair.

Written to ``--workdir``: ``comparison.json`` (every figure) and ``loss_curves.png``; the last
stdout line is JSON with ``steps``, ``max_loss_rel_diff``, ``map_jax``, ``map_torch``,
``map_torch64``, ``map_torch_nudged``, ``code_bits_differing``, ``code_bits_differing_floor``,
``code_bits_differing_nudged_floor``, ``within_floor``.

The PyTorch side is ``csce_jax.bridge.reference.ReleaseNet`` (needs torch, not torchvision);
``--release_dir`` uses the release's own ``ResNet_DOLG`` from a checkout of its code instead
(needs torchvision and the release's network size: ResNet-50 at 224 px, no ASPP). Its
constructor's ImageNet download is skipped (the weights are overwritten by ours anyway), so it
runs offline.
"""

from __future__ import annotations

import contextlib
import json
import statistics
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from csce_jax.bridge.sides import TorchSide, comparison_setup, step_margins
from csce_jax.data import EvalLoader
from csce_jax.data.pipeline import apply_flips
from csce_jax.retrieval.evaluator import RetrievalEvaluator
from csce_jax.retrieval.pictures import plot_curves
from csce_jax.runs import builders
from csce_jax.runtime import sharding
from csce_jax.train import loop
from csce_jax.train.step import make_train_step
from csce_jax.utils.atomic import write_text_atomically

SERIES = ("loss", "ce", "quant", "grad_norm")
FLOOR_FACTOR = 3.0
FLOAT32_TOLERANCE = 1e-5


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def train_both(
    config, data, setup, torch_sides: dict[str, TorchSide], steps: int
) -> list[dict[str, Any]]:
    """``steps`` steps on every side from the same batches and margins; a row per step with
    each side's figures and, per series, ``rel_diff`` (JAX vs PyTorch float32) and, with a
    float64 side, ``floor`` (PyTorch float32 vs float64) and ``jax_vs_torch64``."""
    mesh = sharding.make_mesh()
    options = builders.step_options(config, data.multilabel)
    step_fn = make_train_step(setup.graphdef, setup.tx, setup.schedule, options, mesh)
    jax_state = jax.device_put(setup.state, sharding.replicated(mesh))
    loader = loop.make_loader(config, data)
    rows = []
    # Closed when left early: the decoding workers stop and their shared batches are freed.
    with contextlib.closing(loader.batches(0)) as batches:
        for step, host in enumerate(batches):
            if step == steps:
                break
            margins = step_margins(config, step, len(host["label"]), multilabel=False)
            batch = {k: host[k] for k in ("image", "flip", "label")}
            jax_state, m = step_fn(jax_state, sharding.global_batch(mesh, batch))
            sides = {"jax": {k: float(v) for k, v in jax.device_get(m).items() if k in SERIES}}
            images = apply_flips(host["image"], host["flip"])
            for name, side in torch_sides.items():
                sides[name] = side.step(images, host["label"], margins)
            row: dict[str, Any] = {"step": step + 1}
            for k in SERIES:
                for name, figures in sides.items():
                    row[f"{k}_{name}"] = figures[k]
                row[f"{k}_rel_diff"] = _rel(sides["jax"][k], sides["torch"][k])
                if "torch64" in sides:
                    exact = sides["torch64"][k]
                    row[f"{k}_floor"] = _rel(sides["torch"][k], exact)
                    row[f"{k}_jax_vs_torch64"] = _rel(sides["jax"][k], exact)
                if "torch_nudged" in sides:
                    row[f"{k}_nudged_floor"] = _rel(sides["torch_nudged"][k], sides["torch"][k])
            rows.append(row)
            logging.info(
                "step %d: loss %s",
                step + 1,
                " vs ".join(f"{n} {f['loss']:.6f}" for n, f in sides.items()),
            )
    setup.state = jax_state
    return rows


def floor_verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether JAX stays within the rounding floor, series by series, on median distances.

    The gap (JAX against PyTorch float32) is held to ``FLOOR_FACTOR`` times the floor: the
    larger of the measured floors (PyTorch float32 against its float64 run, and against its
    nudged float32 run), and never less than ``FLOAT32_TOLERANCE`` (a relative difference that
    float32 rounding through a deep network reaches by itself in the first steps, before the
    runs part). Medians over the steps, not single steps: one step is one sample of the
    rounding noise, and the quantisation term jumps whenever one value crosses the DSF band's
    edge in one run and not in the other."""
    kinds = [n for n in ("floor", "nudged_floor") if f"{SERIES[0]}_{n}" in rows[0]]
    ratios = {}
    for k in SERIES:
        gap = statistics.median(r[f"{k}_rel_diff"] for r in rows)
        floor = max(statistics.median(r[f"{k}_{n}"] for r in rows) for n in kinds)
        ratios[k] = gap / max(floor, FLOAT32_TOLERANCE)
    worst = max(ratios, key=ratios.get)
    return {
        "within_floor": ratios[worst] <= FLOOR_FACTOR,
        "median_gap_over_floor": ratios,
        "worst_series": worst,
    }


def score_sides(config, data, setup, torch_sides: dict[str, TorchSide]) -> dict[str, Any]:
    """Encode query and database on every side, score each with our metric, count the code
    bits that differ between JAX and PyTorch float32 (and between PyTorch float32 and 64)."""
    mesh = sharding.make_mesh()
    encoder = builders.make_encoder(config, setup.eval_graphdef, mesh)
    scoring = RetrievalEvaluator(encoder, data.query, data.database, data.topk)
    ours = scoring.encode((setup.state["params"], setup.state["rest"]))
    view = builders.view_config(config, train=False)
    codes: dict[str, dict[str, np.ndarray]] = {n: {} for n in ("jax", *torch_sides)}
    labels = {}
    for split, src, mine in zip(
        ("query", "database"), (data.query, data.database), ours, strict=True
    ):
        codes["jax"][split], labels[split] = mine["codes"], mine["labels"]
        for name, side in torch_sides.items():
            loader = EvalLoader(src, global_batch=config.eval_batch_size, view=view)
            codes[name][split] = side.encode(loader)["codes"]
    out: dict[str, Any] = {}
    for name, c in codes.items():
        query = {"codes": c["query"], "labels": labels["query"]}
        database = {"codes": c["database"], "labels": labels["database"]}
        out[f"map_{name}"] = scoring.score(query, database)["map"]

    def differing(a: str, b: str) -> int:
        return int(sum(np.sum(codes[a][s] != codes[b][s]) for s in ("query", "database")))

    out["code_bits_differing"] = differing("jax", "torch")
    if "torch64" in codes:
        out["code_bits_differing_floor"] = differing("torch", "torch64")
        out["code_bits_differing_jax_vs_torch64"] = differing("jax", "torch64")
    if "torch_nudged" in codes:
        out["code_bits_differing_nudged_floor"] = differing("torch", "torch_nudged")
    out["code_bits_total"] = int(sum(codes["jax"][s].size for s in ("query", "database")))
    return out


def compare(
    config: ml_collections.ConfigDict,
    steps: int,
    workdir: str,
    init: str = "",
    release_dir: str | None = None,
    floor: str = "both",
) -> dict[str, Any]:
    """Run the comparison; returns the summary (also written to ``workdir``)."""
    config, data, setup, model = comparison_setup(config, steps, init, release_dir)
    torch_sides = {"torch": TorchSide(model, config, release_dir, "float32", data.multilabel)}
    if floor in ("float64", "both"):
        torch_sides["torch64"] = TorchSide(model, config, release_dir, "float64", data.multilabel)
    if floor in ("nudged", "both"):
        torch_sides["torch_nudged"] = TorchSide(
            model, config, release_dir, "float32", data.multilabel, nudge_seed=config.seed
        )
    rows = train_both(config, data, setup, torch_sides, steps)
    scores = score_sides(config, data, setup, torch_sides)
    summary = {
        "steps": len(rows),
        "data": config.data.name,
        **{
            f"max_{k}_rel_diff": max((r[f"{k}_rel_diff"] for r in rows), default=0.0)
            for k in SERIES
        },
        **scores,
        "torch_side": "release ResNet_DOLG" if release_dir else "csce_jax.bridge.reference",
        "floor": floor,
    }
    if floor != "none" and rows:
        for k in SERIES:
            for name in ("floor", "nudged_floor"):
                if f"{k}_{name}" in rows[0]:
                    summary[f"max_{k}_{name}"] = max(r[f"{k}_{name}"] for r in rows)
        summary.update(floor_verdict(rows))
    out = Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(
        out / "comparison.json", json.dumps({"summary": summary, "steps": rows}, indent=2)
    )
    sides = ("jax", *torch_sides)
    plot_curves(
        {
            f"{k} ({side})": [r[f"{k}_{side}"] for r in rows]
            for k in ("loss", "ce", "quant")
            for side in sides
        },
        str(out / "loss_curves.png"),
        f"{config.data.name}: JAX vs PyTorch, release recipe",
    )
    return summary
