"""The PyTorch side of the comparisons with the release (:mod:`csce_jax.bridge.compare` trains
it beside ours, :mod:`csce_jax.bridge.gradients` takes one step of it): the reference network or the release's own, its
loss and optimiser, and the common setup both comparisons start from.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from csce_jax import convert
from csce_jax.config import check_config, release_training, resolve_epochs
from csce_jax.data import EvalLoader, RetrievalData, load_data
from csce_jax.errors import ConfigError
from csce_jax.hashing.loss import elastic_margins
from csce_jax.models.csce import normalize_images
from csce_jax.runs import builders, state
from csce_jax.runs.reader import RunReader
from csce_jax.train.step import fold_key

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
            "compare with csce_jax.bridge.reference at any size"
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

        from csce_jax.bridge import reference as ref

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


def initial_state(config, num_classes: int, init: str) -> state.TrainSetup:
    """Our seeded initialisation, or ``init``: a weights file, or a run folder (its best
    checkpoint's weights, read through the run reader)."""
    from_run = bool(init) and Path(init).is_dir()
    parts = builders.run_parts(config, num_classes, init_from="" if from_run else init)
    setup = state.create_train_state(parts.model, parts.tx, parts.schedule)
    if not from_run:
        return setup
    with RunReader(init) as run:
        restored = run.weights(config)
    setup.state["params"], setup.state["rest"] = jax.device_get(restored.pair)
    return setup


def comparison_setup(
    config: ml_collections.ConfigDict, steps: int, init: str, release_dir: str | None
) -> tuple[ml_collections.ConfigDict, RetrievalData, state.TrainSetup, Any]:
    """``config`` under the release's training recipe for ``steps`` steps, checked; its data;
    the common starting state (see :func:`initial_state`) and its model."""
    config = release_training(ml_collections.ConfigDict(config.to_dict()))
    config.total_steps = max(steps, 1)
    check_config(config, jax.device_count(), jax.process_count())
    if release_dir:
        check_release_size(config)
    data = load_data(config.data)
    resolve_epochs(config, len(data.fit))
    setup = initial_state(config, data.num_classes, init)
    return config, data, setup, state.model_of(setup)


def step_margins(
    config: ml_collections.ConfigDict, step: int, batch: int, *, multilabel: bool
) -> np.ndarray:
    """The margins the training step draws at ``step`` (elastic, from (seed, step)), or the
    fixed multi-label margin; a writable array (``torch.from_numpy`` warns on read-only)."""
    lc = config.loss
    if multilabel:
        return np.asarray(lc.margin, np.float32)
    key = fold_key(config.seed, step)
    return np.array(elastic_margins(key, batch, lc.margin, lc.margin_std))
