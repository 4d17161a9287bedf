"""Train the PyTorch reference of the release and our model side by side, on the same batches.

  python -m csce_jax.compare_torch --config configs/default.py --steps 50 --workdir runs/cmp

With ``--gradients`` the command judges the port from one batch instead, tensor by tensor
against float64 (:mod:`csce_jax.compare_gradients`): after the first RMSprop update the
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

The PyTorch side is ``csce_jax.torch_reference.ReleaseNet`` (needs torch, not torchvision);
``--release_dir`` uses the release's own ``ResNet_DOLG`` from a checkout of its code instead
(needs torchvision and the release's network size: ResNet-50 at 224 px, no ASPP). Its
constructor's ImageNet download is skipped (the weights are overwritten by ours anyway), so it
runs offline.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging

from csce_jax import builders, cli, convert, retrieval, sharding, state, train_lib
from csce_jax.atomic import write_text_atomically
from csce_jax.config import check_config, release_training, resolve_epochs
from csce_jax.data import EvalLoader, load_data
from csce_jax.data.pipeline import apply_flips
from csce_jax.errors import ConfigError
from csce_jax.losses import elastic_margins
from csce_jax.models.csce import normalize_images
from csce_jax.run_reader import RunReader
from csce_jax.viz import plot_curves

SERIES = ("loss", "ce", "quant", "grad_norm")
FLOOR_FACTOR = 3.0
FLOAT32_TOLERANCE = 1e-5
RELEASE_SIZE = {
    "model.width": 1.0,
    "model.depths": (3, 4, 6, 3),
    "model.window_sizes": (2, 4),
    "model.use_aspp": False,
    "model.learn_centers": False,
    "data.crop": 224,
}


def _normalized_nchw(images: np.ndarray) -> np.ndarray:
    """The model's own input normalisation, laid out NCHW for PyTorch."""
    return np.ascontiguousarray(np.asarray(normalize_images(images)).transpose(0, 3, 1, 2))


def check_release_size(config: ml_collections.ConfigDict) -> None:
    """The release's ResNet_DOLG exists in one size only; refuse any other config in one line."""
    wrong = []
    for key, want in RELEASE_SIZE.items():
        node = config
        for part in key.split("."):
            node = node[part]
        got = tuple(node) if isinstance(node, list | tuple) else node
        if got != want:
            wrong.append(f"--config.{key}={want!r}".replace(" ", ""))
    if wrong:
        raise ConfigError(
            "--release_dir builds the release's full-size network (ResNet-50, 224 px, 52 "
            f"windows); this config differs. Add {' '.join(wrong)}, or drop --release_dir to "
            "compare with csce_jax.torch_reference at any size"
        )


class TorchSide:
    """The release network in PyTorch, trained with the release's loss and optimiser."""

    def __init__(
        self,
        model,
        config,
        release_dir: str | None,
        dtype: str = "float32",
        multilabel: bool = False,
        nudge_seed: int | None = None,
    ):
        import torch

        from csce_jax import torch_reference as ref

        self.torch, self.ref = torch, ref
        self.dtype = getattr(torch, dtype)
        self.multilabel = multilabel
        self.margin = float(config.loss.margin)
        centers = torch.from_numpy(np.array(model.centers[...], np.float32))
        if release_dir:
            self.net, self.release = self._release_net(release_dir, config, centers), True
        else:
            windows = model.window_fusion.kernel.shape[0]
            self.net = ref.ReleaseNet(
                centers,
                width=config.model.width,
                depths=tuple(config.model.depths),
                num_windows=windows,
                signt=config.model.signt,
            )
            self.release = False
        self.load(convert.release_state_dict(model))
        if nudge_seed is not None:
            self._nudge(nudge_seed)

    def _nudge(self, seed: int) -> None:
        """Move every trainable weight by one unit in the last place, up or down at random:
        the same start as the other float32 side but for rounding."""
        torch = self.torch
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.net.parameters():
                if p.requires_grad:
                    up = torch.rand(p.shape, generator=gen) < 0.5
                    away = torch.where(up, torch.inf, -torch.inf).to(p.dtype)
                    p.copy_(torch.nextafter(p, away))

    @staticmethod
    def _release_net(release_dir: str, config, centers):
        """The release's ResNet_DOLG, built without its ImageNet download (offline)."""
        check_release_size(config)
        folder = Path(release_dir).absolute()
        if not (folder / "network_patch_global.py").is_file():
            raise ConfigError(
                f"--release_dir={release_dir}: no network_patch_global.py there (a checkout "
                "of NetEase-Media/CSCE-Net is expected)"
            )
        sys.path.insert(0, str(folder))
        try:
            import network_patch_global as release  # the release's own module
        except ImportError as e:
            raise ConfigError(
                f"--release_dir: the release's network needs {e.name} (pip install torchvision "
                "matching your torch)"
            ) from e

        def offline(builder):
            return lambda *a, pretrained=False, **kw: builder(weights=None)

        release.resnet_dict = {k: offline(v) for k, v in release.resnet_dict.items()}
        cfg = {"S3_DIM": 1024, "S4_DIM": 2048, "n_class": centers.shape[0]}
        cfg.update(signt=config.model.signt, learn_cent=False)
        return release.ResNet_DOLG(centers.shape[1], cfg, centers)

    def forward(self, images: np.ndarray) -> dict[str, Any]:
        x = self.torch.from_numpy(_normalized_nchw(images)).to(self.dtype)
        if self.release:
            logits, v, _, t = self.net(x, None)
            return {"logits": logits, "v": v, "t": t}
        return self.net(x)

    def load(self, state_dict: dict[str, np.ndarray]) -> None:
        """Take these weights and statistics (any float dtype) and a fresh optimiser state."""
        torch = self.torch
        self.net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()})
        self.net.to(self.dtype)
        trainable = [p for p in self.net.parameters() if p.requires_grad]
        self.opt = torch.optim.RMSprop(trainable, lr=1e-5, alpha=0.99, eps=1e-8, weight_decay=1e-5)

    def step(self, images, labels, margins) -> dict[str, float]:
        out, loss, ce, quant = self.forward_backward(images, labels, margins)
        del out
        grads = [p.grad for p in self.net.parameters() if p.grad is not None]
        norm = float(self.torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
        self.opt.step()
        return {"loss": loss.item(), "ce": ce.item(), "quant": quant.item(), "grad_norm": norm}

    def forward_backward(self, images, labels, margins) -> tuple[dict[str, Any], Any, Any, Any]:
        """The training forward of one batch and the backward of its release loss: (outputs,
        loss, ce, quant); the gradients are left in the parameters' ``.grad``."""
        self.net.train()
        out = self.forward(images)
        if self.multilabel:
            loss, ce, quant = self.ref.release_multilabel_loss(
                out["logits"],
                out["v"],
                self.torch.from_numpy(labels.astype(np.float64)),
                out["t"],
                self.margin,
            )
        else:
            loss, ce, quant = self.ref.release_loss(
                out["logits"],
                out["v"],
                self.torch.from_numpy(labels.astype(np.int64)),
                out["t"],
                self.torch.from_numpy(margins).to(self.dtype),
            )
        self.opt.zero_grad()
        loss.backward()
        return out, loss, ce, quant

    def encode(self, loader: EvalLoader) -> dict[str, np.ndarray]:
        self.net.eval()
        codes, index = [], []
        with self.torch.no_grad():
            for batch in loader.batches():
                out = self.forward(batch["image"])
                b = self.ref.release_dsf(out["v"], out["t"]).numpy().astype(np.int8)
                keep = batch["index"] >= 0
                codes.append(b[keep])
                index.append(batch["index"][keep])
        order = np.argsort(np.concatenate(index), kind="stable")
        return {"codes": np.concatenate(codes)[order], "index": np.concatenate(index)[order]}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def initial_state(config, num_classes: int, init: str) -> state.TrainSetup:
    """Our seeded initialisation, or ``init``: a weights file, or a run folder (its best
    checkpoint's weights, read through the run reader)."""
    if not init or not Path(init).is_dir():
        return state.create_train_state(config, num_classes, init_from=init)
    setup = state.create_train_state(config, num_classes)
    with RunReader(init) as run:
        restored = run.weights(config)
    setup.state["params"], setup.state["rest"] = jax.device_get(restored.pair)
    return setup


def train_both(
    config, data, setup, torch_sides: dict[str, TorchSide], steps: int
) -> list[dict[str, Any]]:
    """``steps`` steps on every side from the same batches and margins; a row per step with
    each side's figures and, per series, ``rel_diff`` (JAX vs PyTorch float32) and, with a
    float64 side, ``floor`` (PyTorch float32 vs float64) and ``jax_vs_torch64``."""
    mesh = sharding.make_mesh()
    step_fn = train_lib.make_train_step(
        setup.graphdef, setup.tx, setup.schedule, config, data.multilabel, mesh
    )
    jax_state = jax.device_put(setup.state, sharding.replicated(mesh))
    loader = train_lib.make_loader(config, data)
    rows = []
    # Closed when left early: the decoding workers stop and their shared batches are freed.
    with contextlib.closing(loader.batches(0)) as batches:
        for step, host in enumerate(batches):
            if step == steps:
                break
            key = builders.fold_key(config.seed, step)
            margins = np.array(  # writable: torch.from_numpy warns on a read-only view
                elastic_margins(key, len(host["label"]), config.loss.margin, config.loss.margin_std)
            )
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
    weights = (setup.state["params"], setup.state["rest"])
    view = builders.view_config(config, train=False)
    codes: dict[str, dict[str, np.ndarray]] = {n: {} for n in ("jax", *torch_sides)}
    labels = {}
    for split, src in (("query", data.query), ("database", data.database)):
        ours = encoder.encode(weights, src)
        codes["jax"][split], labels[split] = ours["codes"], ours["labels"]
        for name, side in torch_sides.items():
            loader = EvalLoader(src, global_batch=config.eval_batch_size, view=view)
            codes[name][split] = side.encode(loader)["codes"]
    out: dict[str, Any] = {}
    for name, c in codes.items():
        query = {"codes": c["query"], "labels": labels["query"]}
        database = {"codes": c["database"], "labels": labels["database"]}
        out[f"map_{name}"] = retrieval.score(query, database, data.topk)["map"]

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
    config = release_training(ml_collections.ConfigDict(config.to_dict()))
    config.total_steps = max(steps, 1)
    check_config(config, jax.device_count(), jax.process_count())
    if release_dir:
        check_release_size(config)
    data = load_data(config.data)
    resolve_epochs(config, len(data.fit))
    setup = initial_state(config, data.num_classes, init)
    model = state.model_of(setup)
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
        "torch_side": "release ResNet_DOLG" if release_dir else "csce_jax.torch_reference",
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


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.INFO)
    cli.quiet_library_logs()
    f = flags.FLAGS
    if f.gradients:
        from csce_jax.compare_gradients import compare_gradients

        summary = cli.error_boundary(
            compare_gradients, f.config, f.workdir, f.init, f.release_dir, f.points
        )
    else:
        summary = cli.error_boundary(
            compare, f.config, f.steps, f.workdir, f.init, f.release_dir, f.floor
        )
    print(json.dumps(summary, sort_keys=True))


def run() -> None:
    """The command line (console script and ``python -m``)."""
    flags.DEFINE_integer("steps", 50, "training steps on both sides")
    flags.DEFINE_string("workdir", None, "output folder (comparison.json, loss_curves.png)")
    flags.DEFINE_string(
        "init", "", "start from a release .pt/.pth, a converted file, or a run folder"
    )
    flags.DEFINE_string("release_dir", None, "a checkout of the release's code (torchvision)")
    flags.DEFINE_enum(
        "floor",
        "both",
        ["both", "float64", "nudged", "none"],
        "the rounding floor: PyTorch trained again in float64, and/or in float32 from weights "
        "one unit in the last place away (nudged); none: skip",
    )
    flags.DEFINE_boolean(
        "gradients",
        False,
        "judge one batch instead of a trajectory: every gradient tensor, one optimiser step, "
        "the batch statistics and outputs of ours and PyTorch float32 against PyTorch float64 "
        "(gradients.json, gradients.png; see csce_jax.compare_gradients)",
    )
    flags.DEFINE_integer(
        "points",
        2,
        "with --gradients: 1, or 2 to repeat at the float64 side's step-1 weights on the next "
        "batch",
        lower_bound=1,
        upper_bound=2,
    )
    flags.mark_flags_as_required(["workdir"])
    app.run(main, flags_parser=cli.flags_parser(config_required=True, module=__name__))


if __name__ == "__main__":
    run()
