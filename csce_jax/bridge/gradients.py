"""A port verdict from one batch: every gradient tensor against exact arithmetic.

  csce-compare --gradients --config configs/default.py --workdir runs/g

Trajectories part after the first RMSprop step whatever the port does (each step is about
lr * sign(g), and the elements whose gradient is below float32's noise step either way), so
this mode judges one step instead. From one set of weights and one batch (the training
loader's first, with its flips and elastic margins), three sides compute the release recipe's
loss and its gradient: ours in float32 (:func:`csce_jax.train.step.forward_loss`, the training
step's own loss), PyTorch in float32 and PyTorch in float64 (``csce_jax.bridge.reference`` or,
with ``--release_dir``, the release's own network). Each float32 side is measured against
float64, tensor by tensor (relative Frobenius error), for:

- ``gradient``: every trainable parameter tensor;
- ``update``: the change one optimiser step (a fresh state) makes, every side given the same
  gradient (float64's, rounded to float32), so that the optimiser's rule (rate, decay, eps
  placement, frozen tensors) is judged apart from the gradients' noise;
- ``statistic``: every BatchNorm's batch mean and variance (recovered from the running
  statistics the forward updated: (new - (1 - momentum) * old) / momentum);
- ``output``: the loss, its two terms, logits, the continuous code v and the threshold t.

Tensors are grouped (stem, stage1..stage4, local branch, global branch, heads). A group passes
when the median of our errors is at most ``GROUP_FACTOR`` times the median of PyTorch float32's
(never judged below ``FLOAT32_FLOOR``): PyTorch's own float32 error is the floor a correct
port reaches. A gradient present on one side and absent (exactly zero) on the other fails at
once. Single tensors where one side is many times worse than the other (``excursions``) are
listed with the share of that side's error in its worst output channel: a pre-activation within
float32 rounding of zero takes the other sign at one ReLU on one side, and through the residual
chain that moves one channel of every lower layer's gradient; which elements flip depends on
summation order, so it is luck, not a rule. ``gradient_sign_flips`` counts the elements whose
float32 gradient has the other sign than float64's: each moves a full RMSprop step the wrong
way at the first update, which is why trajectories cannot judge a port. ``--points 2`` (the
default) repeats everything at a second common point, the float64 side's weights after its
first step rounded to float32, on the next batch: an excursion that does not come back there
was luck.

Written to ``--workdir``: ``gradients.json`` (every tensor's errors, the groups, the verdict)
and ``gradients.png`` (per group, our median error beside PyTorch float32's); the last stdout
line is the summary as JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from csce_jax import convert
from csce_jax.bridge.sides import TorchSide, comparison_setup, step_margins
from csce_jax.data.pipeline import apply_flips
from csce_jax.runs import builders
from csce_jax.runs.state import model_of
from csce_jax.train import loop
from csce_jax.train.step import forward_loss
from csce_jax.utils.atomic import write_text_atomically

GROUP_FACTOR = 2.0  # our group median error may be this many times PyTorch float32's
FLOAT32_FLOOR = 1e-6  # relative errors below this are float32 rounding of a few operations
EXCURSION = 3.0  # a tensor where one float32 side is this many times worse than the other
VANISHING = 1e-6  # an exact tensor this small beside its kind's median norm counts as zero
KINDS = ("gradient", "update", "statistic", "output")
GROUPS = (
    "stem",
    "stage1",
    "stage2",
    "stage3",
    "stage4",
    "local branch",
    "global branch",
    "heads",
    "loss and codes",
)
EXPLANATION = (
    "A single tensor far worse on one side, its error in one output channel: a pre-activation "
    "within float32 rounding of zero took the other sign at a ReLU on that side, and through "
    "the residual chain that moved one channel of the lower layers' gradient. Which elements "
    "flip depends on summation order (luck); a porting error shows in a group's median."
)


@dataclasses.dataclass
class SidePoint:
    """What one side computes at one point; every array float64, PyTorch layout and names."""

    gradient: dict[str, np.ndarray]
    update: dict[str, np.ndarray]
    statistic: dict[str, np.ndarray]
    output: dict[str, np.ndarray]


def group_of(name: str) -> str:
    """The part of the network a PyTorch-named tensor belongs to."""
    head = name.split(".")[0]
    if head in ("conv1", "bn1"):
        return "stem"
    if head.startswith("layer"):
        return "stage" + head[len("layer") :]
    if head == "localmodel":
        return "local branch"
    if head in ("conv_f4_s1", "conv_f4_s2", "conv_last"):
        return "global branch"
    if head in ("fc", "fc_t", "ce_fc"):
        return "heads"
    return "loss and codes"  # the outputs: loss terms, logits, v, t


def canonical(name: str) -> str:
    """The release registers the stem, layer1 and layer2 twice (``input.N``): one name each."""
    return convert.release_name(name)


def rel_error(x: np.ndarray, ref: np.ndarray) -> float:
    """||x - ref|| / ||ref||; where ``ref`` is exactly zero, 0 if ``x`` is too, else inf."""
    scale = float(np.linalg.norm(ref))
    diff = float(np.linalg.norm(x - ref))
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / scale


def worst_channel(x: np.ndarray, ref: np.ndarray) -> tuple[int, float]:
    """The output channel (axis 0) holding most of the squared error, and its share."""
    err = np.square(np.asarray(x - ref, np.float64)).reshape(x.shape[0] if x.ndim else 1, -1)
    per = err.sum(axis=1)
    total = float(per.sum())
    c = int(np.argmax(per))
    return c, (float(per[c]) / total if total else 0.0)


def _batch_stats(
    before: dict[str, np.ndarray], after: dict[str, np.ndarray], momenta: dict[str, float]
) -> dict[str, np.ndarray]:
    """Each BatchNorm's batch mean and variance from its running statistics' update."""
    out = {}
    for bn, m in momenta.items():
        for stat in ("mean", "var"):
            key = f"{bn}.running_{stat}"
            out[f"{bn}.batch_{stat}"] = (after[key] - (1.0 - m) * before[key]) / m
    return out


def _f64(arrays: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, np.float64) for k, v in arrays.items()}


def _torch_names(setup, params, rest) -> dict[str, np.ndarray]:
    """Our parameters and statistics under PyTorch's names and layout, in float64."""
    return _f64(convert.export_torch_state_dict(nnx.merge(setup.graphdef, params, rest)))


def our_point(setup, config, multilabel: bool, batch: dict[str, np.ndarray], momenta) -> SidePoint:
    """Our float32 side: the training step's own loss (:func:`csce_jax.train.step.forward_loss`), its
    gradient, the outputs and batch statistics of its forward."""
    loss = builders.loss_options(config, multilabel)
    params, rest = setup.state["params"], setup.state["rest"]

    @jax.jit
    def forward_backward(params, rest, images, labels, margins):
        grad_fn = jax.grad(forward_loss, has_aux=True)
        return grad_fn(params, setup.graphdef, rest, images, labels, margins, loss)

    grads, (losses, out, new_rest) = jax.device_get(
        forward_backward(params, rest, batch["image"], batch["label"], batch["margins"])
    )
    gradient = _torch_names(setup, grads, rest)
    names = [convert.torch_name(path) for path, _ in nnx.to_flat_state(params)]
    output = {k: losses[k] for k in ("loss", "ce", "quant")}
    output.update(logits=out.logits, v=out.codes, t=out.threshold)
    before = _torch_names(setup, params, rest)
    return SidePoint(
        gradient={n: gradient[n] for n in names},
        update={},
        statistic=_batch_stats(before, _torch_names(setup, params, new_rest), momenta),
        output=_f64(output),
    )


def our_update(setup, common: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The change our optimiser (a fresh state) makes given the gradient ``common``."""
    params, rest = setup.state["params"], setup.state["rest"]
    model = nnx.merge(setup.graphdef, params, rest, copy=True)
    state_dict = convert.export_torch_state_dict(model)
    state_dict.update({n: g.astype(np.float32) for n, g in common.items()})
    convert.load_torch_state_dict(model, state_dict, source="the common gradient")
    _, grads, _ = nnx.split(model, nnx.Param, ...)
    updates, _ = setup.tx.update(grads, setup.tx.init(params), params)
    before = _torch_names(setup, params, rest)
    after = _torch_names(setup, optax.apply_updates(params, updates), rest)
    return {n: after[n] - before[n] for n in common}


def _torch_state(side) -> dict[str, np.ndarray]:
    sd = side.net.state_dict()
    return {canonical(k): v.detach().double().numpy().copy() for k, v in sd.items()}


def torch_point(side, batch: dict[str, np.ndarray], momenta) -> SidePoint:
    """One PyTorch side (float32 or float64): the release loss, its gradient, the outputs and
    batch statistics of the forward."""
    before = _torch_state(side)
    out, loss, ce, quant = side.forward_backward(batch["image"], batch["label"], batch["margins"])
    trainable = {canonical(n): p for n, p in side.net.named_parameters() if p.requires_grad}
    gradient = {
        n: (np.zeros(p.shape) if p.grad is None else p.grad.double().numpy().copy())
        for n, p in trainable.items()
    }
    # PyTorch's optimisers skip a tensor the loss never reached (no weight decay either).
    side.without_gradient = {n for n, p in trainable.items() if p.grad is None}
    output = {"loss": loss, "ce": ce, "quant": quant}
    output.update(logits=out["logits"], v=out["v"], t=out["t"])
    return SidePoint(
        gradient=gradient,
        update={},
        statistic=_batch_stats(before, _torch_state(side), momenta),
        output={k: v.detach().double().numpy() for k, v in output.items()},
    )


def torch_update(side, common: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The change one RMSprop step (a fresh state) makes given the gradient ``common``."""
    torch = side.torch
    trainable = {canonical(n): p for n, p in side.net.named_parameters() if p.requires_grad}
    for n, p in trainable.items():
        reached = n not in side.without_gradient
        p.grad = torch.from_numpy(np.array(common[n])).to(side.dtype) if reached else None
    before = _torch_state(side)
    side.opt.step()
    after = _torch_state(side)
    return {n: after[n] - before[n] for n in trainable}


def sign_flips(side: dict[str, np.ndarray], exact: dict[str, np.ndarray]) -> int:
    """Gradient elements whose sign differs from float64's: each moves a full RMSprop step
    the wrong way on that side at the first update."""
    return int(sum(np.sum(np.sign(side[n]) != np.sign(exact[n])) for n in exact if n in side))


def _tensor_row(kind: str, name: str, mine, theirs, exact, typical: float) -> dict[str, Any]:
    """One tensor's errors against float64. A tensor whose exact value vanishes next to the
    typical one of its kind (the bias of a convolution that a BatchNorm follows has a
    gradient of zero in exact arithmetic) is measured against that typical norm instead."""
    vanishing = float(np.linalg.norm(exact)) < VANISHING * typical
    if vanishing:
        e_ours = float(np.linalg.norm(mine - exact)) / typical
        e_torch = float(np.linalg.norm(theirs - exact)) / typical
    else:
        e_ours, e_torch = rel_error(mine, exact), rel_error(theirs, exact)
    row = {"kind": kind, "name": name, "group": group_of(name), "shape": list(exact.shape)}
    row.update(ours=e_ours, torch32=e_torch, ratio=e_ours / max(e_torch, FLOAT32_FLOOR))
    row["vanishing"] = vanishing
    loud = max(float(np.linalg.norm(mine)), float(np.linalg.norm(exact))) >= VANISHING * typical
    row["flow_mismatch"] = kind == "gradient" and loud and bool(np.any(mine) != np.any(exact))
    if exact.ndim and max(e_ours, e_torch) > EXCURSION * max(min(e_ours, e_torch), FLOAT32_FLOOR):
        worse = "ours" if e_ours > e_torch else "torch32"
        channel, share = worst_channel(mine if worse == "ours" else theirs, exact)
        row["excursion"] = {"worse": worse, "channel": channel, "share": share}
    return row


def compare_point(ours: SidePoint, torch32: SidePoint, torch64: SidePoint) -> dict[str, Any]:
    """Every tensor's errors against float64, the groups' medians and their verdicts."""
    rows, unmatched = [], []
    for kind in KINDS:
        mine, theirs, exact = (getattr(s, kind) for s in (ours, torch32, torch64))
        unmatched += [f"{kind} {n}" for n in sorted(set(exact) ^ set(mine))]
        names = sorted(set(exact) & set(mine))
        typical = statistics.median([float(np.linalg.norm(exact[n])) for n in names] or [1.0])
        typical = typical or 1.0
        for name in names:
            rows.append(_tensor_row(kind, name, mine[name], theirs[name], exact[name], typical))
    groups = {}
    for kind in KINDS:
        for group in GROUPS:
            members = [r for r in rows if r["kind"] == kind and r["group"] == group]
            if not members:
                continue
            med_ours = statistics.median(r["ours"] for r in members)
            med_torch = statistics.median(r["torch32"] for r in members)
            ratio = med_ours / max(med_torch, FLOAT32_FLOOR)
            groups[f"{kind}/{group}"] = {
                "tensors": len(members),
                "median_ours": med_ours,
                "median_torch32": med_torch,
                "ratio": ratio,
                "ok": ratio <= GROUP_FACTOR,
            }
    flow = [r["name"] for r in rows if r["flow_mismatch"]]
    failed = [g for g, v in groups.items() if not v["ok"]]
    return {
        "ok": not failed and not flow and not unmatched,
        "failed_groups": failed,
        "gradient_flow_mismatch": flow,
        "unmatched": unmatched,
        "whole_gradient": {
            "ours": _whole(ours.gradient, torch64.gradient),
            "torch32": _whole(torch32.gradient, torch64.gradient),
        },
        "gradient_sign_flips": {
            "ours": sign_flips(ours.gradient, torch64.gradient),
            "torch32": sign_flips(torch32.gradient, torch64.gradient),
            "elements": int(sum(g.size for g in torch64.gradient.values())),
        },
        "code_bits_differing": {
            "ours": _bits(ours.output, torch64.output),
            "torch32": _bits(torch32.output, torch64.output),
        },
        "groups": groups,
        "excursions": [r for r in rows if "excursion" in r],
        "tensors": rows,
    }


def _whole(side: dict[str, np.ndarray], exact: dict[str, np.ndarray]) -> float:
    """The relative error of the whole gradient (every tensor as one vector)."""
    names = sorted(set(side) & set(exact))
    diff = sum(float(np.sum(np.square(side[n] - exact[n]))) for n in names)
    scale = sum(float(np.sum(np.square(exact[n]))) for n in names)
    return float(np.sqrt(diff / scale)) if scale else 0.0


def _bits(side: dict[str, np.ndarray], exact: dict[str, np.ndarray]) -> int:
    """Sign bits of v (outside the threshold band) that differ from the float64 side's."""

    def code(o):
        return np.where(np.abs(o["v"]) < np.abs(o["t"]), 0, np.sign(o["v"]))

    return int(np.sum(code(side) != code(exact)))


def bn_momenta(net) -> dict[str, float]:
    """PyTorch's momentum of every BatchNorm of ``net``, by canonical name."""
    from torch import nn

    return {
        canonical(n): float(m.momentum)
        for n, m in net.named_modules()
        if isinstance(m, nn.BatchNorm2d)
    }


def loader_batches(config, data, count: int) -> list[dict[str, np.ndarray]]:
    """The training loader's first ``count`` batches, flipped on the host, with the step's
    elastic margins (the training step's own draw, from (seed, step))."""
    out = []
    # Closed when left early: its decoding workers stop and their shared batches are freed.
    with contextlib.closing(loop.make_loader(config, data).batches(0)) as batches:
        hosts = [host for _, host in zip(range(count), batches, strict=False)]
    for step, host in enumerate(hosts):
        margins = step_margins(config, step, len(host["label"]), multilabel=data.multilabel)
        images = np.ascontiguousarray(apply_flips(host["image"], host["flip"]))
        out.append({"image": images, "label": host["label"], "margins": margins})
    return out


def compare_gradients(
    config: ml_collections.ConfigDict,
    workdir: str,
    init: str = "",
    release_dir: str | None = None,
    points: int = 2,
) -> dict[str, Any]:
    """Run the gradient comparison; returns the summary (also written to ``workdir``)."""
    config, data, setup, model = comparison_setup(config, points, init, release_dir)
    torch32 = TorchSide(model, config, release_dir, "float32", data.multilabel)
    torch64 = TorchSide(model, config, release_dir, "float64", data.multilabel)
    momenta = bn_momenta(torch32.net)
    results = []
    for index, batch in enumerate(loader_batches(config, data, points)):
        if index:  # the float64 side's step-1 weights, rounded to float32, on every side
            rounded = {
                k: (v.float() if v.is_floating_point() else v).numpy()
                for k, v in torch64.net.state_dict().items()
            }
            for side in (torch32, torch64):
                side.load(rounded)
            model = model_of(setup)
            convert.load_torch_state_dict(model, rounded, source="the float64 side's weights")
            _, setup.state["params"], setup.state["rest"] = nnx.split(model, nnx.Param, ...)
        sides = [torch_point(s, batch, momenta) for s in (torch32, torch64)]
        sides.insert(0, our_point(setup, config, data.multilabel, batch, momenta))
        # The optimisers are compared on one gradient (float64's, rounded to float32), so
        # that their rule shows apart from the gradients' noise.
        common = {n: g.astype(np.float32).astype(np.float64) for n, g in sides[2].gradient.items()}
        sides[0].update = our_update(setup, common)
        for point_side, side in zip(sides[1:], (torch32, torch64), strict=True):
            point_side.update = torch_update(side, common)
        point = compare_point(*sides)
        point["name"] = "initial weights" if index == 0 else "float64 step-1 weights"
        results.append(point)
        logging.info(
            "point %d (%s): whole gradient %.3g (ours) vs %.3g (PyTorch float32) from float64; %s",
            index + 1,
            point["name"],
            point["whole_gradient"]["ours"],
            point["whole_gradient"]["torch32"],
            "groups agree" if point["ok"] else f"failing: {point['failed_groups']}",
        )
    summary = summarize(config, results, release_dir)
    out = Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    report = {"summary": summary, "explanation": EXPLANATION, "points": results}
    write_text_atomically(out / "gradients.json", json.dumps(report, indent=2))
    from csce_jax.retrieval.pictures import plot_group_errors

    plot_group_errors(
        [(p["name"], p["groups"]) for p in results],
        str(out / "gradients.png"),
        f"{config.data.name}: float32 error against PyTorch float64, per group",
    )
    return summary


def summarize(config, results: list[dict[str, Any]], release_dir: str | None) -> dict[str, Any]:
    """The verdict and the figures that carry it, for the last stdout line."""
    worst = max(
        ((g, v["ratio"]) for p in results for g, v in p["groups"].items()), key=lambda x: x[1]
    )
    return {
        "mode": "gradients",
        "data": config.data.name,
        "points": len(results),
        "torch_side": "release ResNet_DOLG" if release_dir else "csce_jax.bridge.reference",
        "port_ok": all(p["ok"] for p in results),
        "failed": sorted({f"{p['name']}: {g}" for p in results for g in p["failed_groups"]}),
        "gradient_flow_mismatch": sorted({n for p in results for n in p["gradient_flow_mismatch"]}),
        "worst_group": worst[0],
        "worst_group_ratio": worst[1],
        "whole_gradient_error_ours": [p["whole_gradient"]["ours"] for p in results],
        "whole_gradient_error_torch32": [p["whole_gradient"]["torch32"] for p in results],
        "whole_gradient_ratio": [
            p["whole_gradient"]["ours"] / max(p["whole_gradient"]["torch32"], FLOAT32_FLOOR)
            for p in results
        ],
        "excursions": [len(p["excursions"]) for p in results],
    }
