"""Train the PyTorch reference of the release and our model side by side, on the same batches.

  python -m csce_jax.compare_torch --config configs/default.py --steps 50 --workdir runs/cmp

From one initialisation (our seeded init exported to PyTorch, or ``--init release.pt``) both
sides run N steps of the release's recipe (every release-compat switch on: the release's DSF
and loss, RMSprop with PyTorch semantics, lr 1e-5, weight decay 1e-5) on the batches of our
pipeline, with the same elastic margins. Each step's loss, its two terms and the gradient norm
are recorded on both sides with their relative differences; then both encode the query and
database sets and both are scored with our metric. Written to ``--workdir``:
``comparison.json`` (every figure) and ``loss_curves.png``; the last stdout line is JSON with
``steps``, ``max_loss_rel_diff``, ``map_jax``, ``map_torch``, ``code_bits_differing``.

The PyTorch side is ``csce_jax.torch_reference.ReleaseNet`` (needs torch, not torchvision);
``--release_dir`` uses the release's own ``ResNet_DOLG`` from a checkout of its code instead
(needs torchvision and a full-size ResNet-50 config).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from csce_jax import builders, cli, convert, metrics, sharding, state, train_lib
from csce_jax.data import EvalLoader, load_data
from csce_jax.encoding import Encoder
from csce_jax.losses import elastic_margins
from csce_jax.models.csce import normalize_images
from csce_jax.viz import plot_curves

SERIES = ("loss", "ce", "quant", "grad_norm")


def release_recipe(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with the release's optimiser and every release-compat switch on."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.dsf.estimator = "release"
    for key in c.release_compat:
        c.release_compat[key] = True
    c.optimizer.name, c.optimizer.lr, c.optimizer.weight_decay = "rmsprop", 1e-5, 1e-5
    c.optimizer.schedule, c.optimizer.warmup_steps = "constant", 0
    c.model.dtype = "float32"
    return c


def _normalized_nchw(images: np.ndarray) -> np.ndarray:
    """The model's own input normalisation, laid out NCHW for PyTorch."""
    return np.ascontiguousarray(np.asarray(normalize_images(images)).transpose(0, 3, 1, 2))


class TorchSide:
    """The release network in PyTorch, trained with the release's loss and optimiser."""

    def __init__(self, model, config, release_dir: str | None, dtype: str = "float32"):
        import torch

        from csce_jax import torch_reference as ref

        self.torch, self.ref = torch, ref
        self.dtype = getattr(torch, dtype)
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
        sd = convert.release_state_dict(model)
        self.net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()})
        self.net.to(self.dtype)
        trainable = [p for p in self.net.parameters() if p.requires_grad]
        self.opt = torch.optim.RMSprop(trainable, lr=1e-5, alpha=0.99, eps=1e-8, weight_decay=1e-5)

    @staticmethod
    def _release_net(release_dir: str, config, centers):
        sys.path.insert(0, str(Path(release_dir).absolute()))
        from network_patch_global import ResNet_DOLG  # the release's own module

        cfg = {"S3_DIM": 1024, "S4_DIM": 2048, "n_class": centers.shape[0]}
        cfg.update(signt=config.model.signt, learn_cent=False)
        return ResNet_DOLG(centers.shape[1], cfg, centers)

    def forward(self, images: np.ndarray) -> dict[str, Any]:
        x = self.torch.from_numpy(_normalized_nchw(images)).to(self.dtype)
        if self.release:
            logits, v, _, t = self.net(x, None)
            return {"logits": logits, "v": v, "t": t}
        return self.net(x)

    def step(self, images, labels, margins) -> dict[str, float]:
        self.net.train()
        out = self.forward(images)
        loss, ce, quant = self.ref.release_loss(
            out["logits"],
            out["v"],
            self.torch.from_numpy(labels.astype(np.int64)),
            out["t"],
            self.torch.from_numpy(margins).to(self.dtype),
        )
        self.opt.zero_grad()
        loss.backward()
        grads = [p.grad for p in self.net.parameters() if p.grad is not None]
        norm = float(self.torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
        self.opt.step()
        return {"loss": loss.item(), "ce": ce.item(), "quant": quant.item(), "grad_norm": norm}

    def encode(self, loader: EvalLoader) -> dict[str, np.ndarray]:
        self.net.eval()
        codes, index = [], []
        with self.torch.no_grad():
            for batch in loader.batches():
                out = self.forward(batch["image"])
                b = self.ref.release_dsf(out["v"], out["t"]).float().numpy().astype(np.int8)
                keep = batch["index"] >= 0
                codes.append(b[keep])
                index.append(batch["index"][keep])
        order = np.argsort(np.concatenate(index), kind="stable")
        return {"codes": np.concatenate(codes)[order], "index": np.concatenate(index)[order]}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def train_both(config, data, setup, torch_side: TorchSide, steps: int) -> list[dict[str, Any]]:
    """``steps`` steps on both sides from the same batches and margins; a row per step."""
    mesh = sharding.make_mesh()
    step_fn = train_lib.make_train_step(
        setup.graphdef, setup.tx, setup.schedule, config, data.multilabel, mesh
    )
    jax_state = jax.device_put(setup.state, sharding.replicated(mesh))
    loader = train_lib.make_loader(config, data)
    rows = []
    for step, host in enumerate(loader.batches(0)):
        if step == steps:
            break
        key = builders.fold_key(config.seed, step)
        margins = np.asarray(
            elastic_margins(key, len(host["label"]), config.loss.margin, config.loss.margin_std)
        )
        batch = sharding.global_batch(mesh, {"image": host["image"], "label": host["label"]})
        jax_state, m = step_fn(jax_state, batch)
        ours = {k: float(v) for k, v in jax.device_get(m).items() if k in SERIES}
        theirs = torch_side.step(host["image"], host["label"], margins)
        row = {"step": step + 1}
        for k in SERIES:
            row[f"{k}_jax"], row[f"{k}_torch"] = ours[k], theirs[k]
            row[f"{k}_rel_diff"] = _rel(ours[k], theirs[k])
        rows.append(row)
        logging.info("step %d: loss %.6f vs %.6f", step + 1, ours["loss"], theirs["loss"])
    setup.state = jax_state
    return rows


def score_both(config, data, setup, torch_side: TorchSide) -> dict[str, Any]:
    """Encode query and database on both sides and score both with our metric."""
    mesh = sharding.make_mesh()
    encoder = Encoder(setup.eval_graphdef, config, mesh)
    weights = (setup.state["params"], setup.state["rest"])
    view = builders.view_config(config, train=False)
    out: dict[str, Any] = {}
    codes = {}
    for name, src in (("query", data.query), ("database", data.database)):
        ours = encoder.encode(weights, src)
        loader = EvalLoader(src, global_batch=config.eval_batch_size, view=view)
        codes[name] = (ours["codes"], torch_side.encode(loader)["codes"], ours["labels"])
    for side, i in (("jax", 0), ("torch", 1)):
        out[f"map_{side}"] = metrics.mean_average_precision(
            codes["query"][i],
            codes["database"][i],
            codes["query"][2],
            codes["database"][2],
            data.topk,
        )
    out["code_bits_differing"] = int(
        sum(np.sum(codes[n][0] != codes[n][1]) for n in ("query", "database"))
    )
    out["code_bits_total"] = int(sum(codes[n][0].size for n in ("query", "database")))
    return out


def compare(
    config: ml_collections.ConfigDict,
    steps: int,
    workdir: str,
    init: str = "",
    release_dir: str | None = None,
    torch_dtype: str = "float32",
) -> dict[str, Any]:
    """Run the comparison; returns the summary (also written to ``workdir``)."""
    config = release_recipe(config)
    config.total_steps = max(steps, 1)
    builders.check_config(config, jax.device_count(), jax.process_count())
    data = load_data(config.data)
    setup = state.create_train_state(config, data.num_classes, init_from=init)
    model = state.model_of(setup)
    torch_side = TorchSide(model, config, release_dir, torch_dtype)
    rows = train_both(config, data, setup, torch_side, steps)
    scores = score_both(config, data, setup, torch_side)
    summary = {
        "steps": len(rows),
        "max_loss_rel_diff": max((r["loss_rel_diff"] for r in rows), default=0.0),
        **{
            f"max_{k}_rel_diff": max((r[f"{k}_rel_diff"] for r in rows), default=0.0)
            for k in SERIES[1:]
        },
        **scores,
        "torch_side": "release ResNet_DOLG" if release_dir else "csce_jax.torch_reference",
        "torch_dtype": torch_dtype,
    }
    out = Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps({"summary": summary, "steps": rows}, indent=2))
    plot_curves(
        {
            f"{k} ({side})": [r[f"{k}_{side}"] for r in rows]
            for k in ("loss", "ce", "quant")
            for side in ("jax", "torch")
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
    summary = cli.error_boundary(
        compare, f.config, f.steps, f.workdir, f.init, f.release_dir, f.torch_dtype
    )
    print(json.dumps(summary, sort_keys=True))


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "config file (configs/*.py[:args])")
    flags.DEFINE_integer("steps", 50, "training steps on both sides")
    flags.DEFINE_string("workdir", None, "output folder (comparison.json, loss_curves.png)")
    flags.DEFINE_string("init", "", "start from this release .pt/.pth or converted file")
    flags.DEFINE_string("release_dir", None, "a checkout of the release's code (torchvision)")
    flags.DEFINE_enum(
        "torch_dtype",
        "float32",
        ["float32", "float64"],
        "PyTorch side's precision (float64: a reference free of float32 rounding)",
    )
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=cli.parse_flags)
