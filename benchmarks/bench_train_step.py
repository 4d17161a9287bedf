"""Training-step and encoding throughput: our JAX model vs the PyTorch reference (tests/).

Same machine, batch, resolution and work: the release's network, loss (arc margin, cs
quantisation with the release DSF) and one RMSprop step; encoding = evaluation-mode forward +
binary codes. Medians of ``--repeats`` runs after warm-up (compilation excluded, and reported
separately as ``jax_first_step_seconds``).

  python benchmarks/bench_train_step.py [--batch 8 --size 224 --width 1.0 --repeats 3]

Last line: JSON with images/s and ``train_ratio_vs_torch`` / ``encode_ratio_vs_torch`` (ours over
the reference's; above 1 means we are faster).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median_time, report  # noqa: E402


def jax_side(args, images, labels):
    import jax

    from configs.default import apply_release, get_config
    from csce_jax import eval_lib, sharding, train_lib

    c = get_config()
    apply_release(c)
    c.model.width, c.model.depths = args.width, (3, 4, 6, 3)
    c.data.crop = args.size
    c.batch_size = c.eval_batch_size = args.batch
    c.optimizer.name, c.optimizer.lr, c.optimizer.weight_decay = "rmsprop", 1e-5, 1e-5
    c.optimizer.schedule, c.optimizer.warmup_steps = "constant", 0
    c.model.dtype = args.dtype
    mesh = sharding.make_mesh()
    setup = train_lib.create_train_state(c, 100)
    step = train_lib.make_train_step(setup.graphdef, setup.tx, setup.schedule, c, False, mesh)
    state = jax.device_put(setup.state, sharding.replicated(mesh))
    batch = sharding.global_batch(mesh, {"image": images, "label": labels})
    holder = {"state": state}

    def train():
        holder["state"], m = step(holder["state"], batch)
        jax.block_until_ready(m["loss"])

    start = time.perf_counter()
    train()
    first = time.perf_counter() - start
    t_train = median_time(train, repeats=args.repeats, warmup=1)
    enc = eval_lib.Encoder(setup.eval_graphdef, c, mesh)
    weights = (holder["state"]["params"], holder["state"]["rest"])

    def encode():
        jax.block_until_ready(enc._step(weights, batch["image"]))

    t_enc = median_time(encode, repeats=args.repeats, warmup=1)
    return first, t_train, t_enc


def torch_side(args, images, labels):
    import torch
    from torch_reference import ReleaseNet, release_dsf, release_loss

    from csce_jax.hashing import hash_centers

    torch.manual_seed(0)
    net = ReleaseNet(torch.tensor(hash_centers(100, 64), dtype=torch.float32), width=args.width)
    f4 = -(-args.size // 32)
    net.conv_last = torch.nn.Conv1d((f4 - 1) ** 2 + (f4 - 3) ** 2, 1, 1)
    opt = torch.optim.RMSprop(
        [p for p in net.parameters() if p.requires_grad], lr=1e-5, weight_decay=1e-5
    )
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x_uint8 = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(labels.astype(np.int64))

    def train():
        net.train()
        x = (x_uint8.float() / 255 - mean) / std
        out = net(x)
        margins = 0.15 + 0.125 * torch.randn(len(y))
        loss = release_loss(out["logits"], out["v"], y, out["t"], margins)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()

    def encode():
        net.eval()
        with torch.no_grad():
            out = net((x_uint8.float() / 255 - mean) / std)
            release_dsf(out["v"], out["t"])

    return (
        median_time(train, repeats=args.repeats, warmup=1),
        median_time(encode, repeats=args.repeats, warmup=1),
        torch.get_num_threads(),
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (args.batch, args.size, args.size, 3), dtype=np.uint8)
    labels = rng.integers(0, 100, args.batch).astype(np.int32)
    first, jt, je = jax_side(args, images, labels)
    tt, te, threads = torch_side(args, images, labels)
    import jax

    report(
        {
            "device": str(jax.devices()[0].device_kind),
            "cpu_count": os.cpu_count(),
            "torch_threads": threads,
            "batch": args.batch,
            "size": args.size,
            "width": args.width,
            "dtype": args.dtype,
            "jax_first_step_seconds": round(first, 2),
            "jax_train_images_per_sec": round(args.batch / jt, 2),
            "torch_train_images_per_sec": round(args.batch / tt, 2),
            "train_ratio_vs_torch": round(tt / jt, 3),
            "jax_encode_images_per_sec": round(args.batch / je, 2),
            "torch_encode_images_per_sec": round(args.batch / te, 2),
            "encode_ratio_vs_torch": round(te / je, 3),
        }
    )


if __name__ == "__main__":
    main()
