"""Training-step and encoding throughput: our JAX model vs the PyTorch reference of the release
(``csce_jax/bridge/reference.py``).

Same device kind, batch, resolution and work: the release's network, loss (arc margin, cs
quantisation with the release DSF) and one RMSprop step; encoding = evaluation-mode forward +
binary codes. Medians of ``--repeats`` runs after warm-up (compilation excluded, and reported
separately as ``jax_first_step_seconds``). On a GPU both frameworks run there (PyTorch with
CUDA); ``--dtype bfloat16`` is our bf16 compute path against PyTorch's autocast (AMP) in bf16.
``--torch-layout`` is ``nchw`` (eager, as the release runs) or ``channels_last`` (PyTorch's
standard fast form on tensor cores); ``--no-jax`` / ``--no-torch`` time one side only.

  python benchmarks/bench_train_step.py [--batch 8 --size 224 --width 1.0 --repeats 5]
  python benchmarks/bench_train_step.py --preset demo     # the digits demo's model and batch

Both frameworks run in one process, under the same host allocator: ``train.py``'s setting
(``csce_jax.runtime.hostmem``: freed memory kept for reuse); ``CSCE_JAX_HOST_ALLOCATOR=default`` runs
both on glibc's default instead.

FLOPs are the analytic count of ``csce_jax.train.flops`` (forward + backward of the same network,
so they serve both frameworks; ``model_gflops_per_image``), beside XLA's own count of the
compiled step where the backend counts everything (the CPU; ``xla_gflops_per_image``, null on
GPU, whose count leaves out cuDNN's convolutions). MFU = FLOPs / step time / the device's
dense peak for the dtype (TF32 tensor-core peak for float32), where ``csce_jax.train.flops`` knows it.
Last line: JSON with images/s, peak memory and ``train_ratio_vs_torch`` /
``encode_ratio_vs_torch`` (ours over the reference's; above 1 means we are faster).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# First, as in train.py: one process-wide allocator setting, shared by both frameworks.
from csce_jax.runtime import hostmem  # noqa: E402

hostmem.apply_environment()

import numpy as np  # noqa: E402
from common import median_time, report  # noqa: E402


def _config(args):
    """The release recipe on the benchmark's model size, dtype and kernels."""
    from csce_jax.config import load_config_file, release_training

    c = load_config_file("default")
    c.model.width, c.model.depths = args.width, args.depths
    c.data.crop = args.size
    c.batch_size = c.eval_batch_size = args.batch
    release_training(c)
    c.model.dtype = args.dtype
    c.model.kernels = args.kernels
    return c


def jax_side(args, images, labels):
    import jax

    from csce_jax.runs import builders
    from csce_jax.runs import state as train_state
    from csce_jax.runs.builders import run_parts
    from csce_jax.runtime import sharding
    from csce_jax.train.step import make_train_step

    c = _config(args)
    mesh = sharding.make_mesh()
    parts = run_parts(c, 100)
    setup = train_state.create_train_state(parts.model, parts.tx, parts.schedule)
    options = parts.step
    step = make_train_step(setup.graphdef, setup.tx, setup.schedule, options, mesh)
    state = jax.device_put(setup.state, sharding.replicated(mesh))
    batch = sharding.global_batch(mesh, {"image": images, "label": labels})
    start = time.perf_counter()
    cost = step.lower(state, batch).compile().cost_analysis()  # the step's one compilation
    cost = cost[0] if isinstance(cost, list) else cost
    # XLA:GPU's cost analysis leaves out the convolutions it hands to cuDNN: only the CPU's
    # count covers the whole step.
    counted = jax.default_backend() == "cpu" and cost and cost.get("flops")
    xla_flops = float(cost["flops"]) / args.batch if counted else None
    holder = {"state": state}

    def train():
        holder["state"], m = step(holder["state"], batch)
        jax.block_until_ready(m["loss"])

    train()
    first = time.perf_counter() - start  # trace + compile + first run: the first-step latency
    t_train = median_time(train, repeats=args.repeats, warmup=1)
    enc = builders.make_encoder(c, setup.eval_graphdef, mesh)
    weights = (holder["state"]["params"], holder["state"]["rest"])

    index = sharding.global_batch(mesh, {"index": np.arange(args.batch, dtype=np.int32)})

    def encode():
        jax.block_until_ready(enc._step(weights, batch["image"], index["index"]))

    t_enc = median_time(encode, repeats=args.repeats, warmup=1)
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return first, t_train, t_enc, xla_flops, peak


def torch_side(args, images, labels):
    import contextlib

    import torch

    from csce_jax.bridge.reference import ReleaseNet, release_dsf, release_loss
    from csce_jax.hashing import hash_centers

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    centers = torch.tensor(hash_centers(100, 64), dtype=torch.float32)
    net = ReleaseNet(centers, width=args.width, depths=args.depths)
    f4 = -(-args.size // 32)
    net.conv_last = torch.nn.Conv1d((f4 - 1) ** 2 + (f4 - 3) ** 2, 1, 1)
    layout = (
        torch.channels_last if args.torch_layout == "channels_last" else torch.contiguous_format
    )
    net = net.to(dev, memory_format=layout)
    opt = torch.optim.RMSprop(
        [p for p in net.parameters() if p.requires_grad], lr=1e-5, weight_decay=1e-5
    )
    mean = torch.tensor([0.485, 0.456, 0.406], device=dev).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=dev).view(1, 3, 1, 1)
    x_uint8 = torch.from_numpy(images).permute(0, 3, 1, 2).to(dev).contiguous(memory_format=layout)
    y = torch.from_numpy(labels.astype(np.int64)).to(dev)

    def autocast():
        if args.dtype == "bfloat16":
            return torch.autocast(dev.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def train():
        net.train()
        with autocast():
            out = net((x_uint8.float() / 255 - mean) / std)
            margins = 0.15 + 0.125 * torch.randn(len(y), device=dev)
            loss = release_loss(
                out["logits"].float(), out["v"].float(), y, out["t"].float(), margins
            )[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        sync()

    def encode():
        net.eval()
        with torch.no_grad(), autocast():
            out = net((x_uint8.float() / 255 - mean) / std)
            release_dsf(out["v"].float(), out["t"].float())
        sync()

    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # JAX's default float32 GPU precision
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats()
    t_train = median_time(train, repeats=args.repeats, warmup=1)
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else None
    t_enc = median_time(encode, repeats=args.repeats, warmup=1)
    return t_train, t_enc, torch.get_num_threads(), str(dev), peak


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", choices=["full", "demo"], default="full")
    p.add_argument("--batch", type=int, default=None, help="default 8 (full), 64 (demo)")
    p.add_argument("--size", type=int, default=None, help="default 224 (full), 112 (demo)")
    p.add_argument("--width", type=float, default=None, help="default 1.0 (full), 1/16 (demo)")
    p.add_argument("--repeats", type=int, default=None, help="default 5 (full), 50 (demo)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument(
        "--kernels", default="auto", choices=["auto", "xla", "cpu"], help="model.kernels"
    )
    p.add_argument("--torch-layout", default="nchw", choices=["nchw", "channels_last"])
    p.add_argument("--no-torch", action="store_true", help="our side only")
    p.add_argument("--no-jax", action="store_true", help="the PyTorch side only")
    args = p.parse_args()
    if args.no_jax and args.no_torch:
        p.error("--no-jax and --no-torch leave nothing to time")
    full = args.preset == "full"
    args.batch = args.batch or (8 if full else 64)
    args.size = args.size or (224 if full else 112)
    args.width = args.width or (1.0 if full else 1 / 16)
    args.repeats = args.repeats or (5 if full else 50)
    args.depths = (3, 4, 6, 3) if full else (1, 1, 1, 1)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (args.batch, args.size, args.size, 3), dtype=np.uint8)
    labels = rng.integers(0, 100, args.batch).astype(np.int32)
    from csce_jax.runtime import startup

    startup.set_xla_flags(_config(args))  # before JAX starts its backends
    import jax

    from csce_jax.models.layers import resolve_kernels
    from csce_jax.train.flops import model_flops_per_image, peak_flops

    device = str(jax.devices()[0].device_kind)
    peak = peak_flops(jax.devices()[0], args.dtype)
    flops = model_flops_per_image(_config(args), 100)["train"] * args.batch  # per step
    figures = {
        "device": device,
        "cpu_count": os.cpu_count(),
        "preset": args.preset,
        "batch": args.batch,
        "size": args.size,
        "width": args.width,
        "dtype": args.dtype,
        "kernels": resolve_kernels(args.kernels),
        "host_allocator": "tuned" if hostmem.is_tuned() else "default",
        "train_step_gflops": round(flops / 1e9, 1),
        "model_gflops_per_image": round(flops / args.batch / 1e9, 2),
    }
    if not args.no_jax:
        first, jt, je, xla_flops, jax_peak = jax_side(args, images, labels)
        figures.update(
            {
                "xla_gflops_per_image": None if xla_flops is None else round(xla_flops / 1e9, 2),
                "jax_first_step_seconds": round(first, 2),
                "jax_train_images_per_sec": round(args.batch / jt, 2),
                "jax_encode_images_per_sec": round(args.batch / je, 2),
                "jax_peak_memory_gib": None if jax_peak is None else round(jax_peak / 2**30, 2),
                "jax_mfu": None if not (peak and flops) else round(flops / jt / peak, 4),
            }
        )
    if not args.no_torch:
        tt, te, threads, torch_dev, torch_peak = torch_side(args, images, labels)
        figures.update(
            {
                "torch_layout": args.torch_layout,
                "torch_device": torch_dev,
                "torch_threads": threads,
                "torch_train_images_per_sec": round(args.batch / tt, 2),
                "torch_encode_images_per_sec": round(args.batch / te, 2),
                "torch_peak_memory_gib": None
                if torch_peak is None
                else round(torch_peak / 2**30, 2),
                "torch_mfu": None if not (peak and flops) else round(flops / tt / peak, 4),
            }
        )
    if not (args.no_jax or args.no_torch):
        figures["train_ratio_vs_torch"] = round(tt / jt, 3)
        figures["encode_ratio_vs_torch"] = round(te / je, 3)
    report(figures)


if __name__ == "__main__":
    main()
