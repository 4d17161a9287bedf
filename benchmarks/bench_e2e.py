"""End-to-end training speed through ``train.py``'s own loop, against the step alone and the
input pipeline alone, on a generated JPEG folder of CUB-like sizes (about 500 x 375).

  python benchmarks/bench_e2e.py                   # ResNet-50 CSCE-Net, 224 px, batch 50
  python benchmarks/bench_e2e.py --preset demo     # the digits demo's model: width 1/16, 112 px
  python benchmarks/bench_e2e.py --threads         # decode in threads, not worker processes
  python benchmarks/bench_e2e.py --preset demo --threads --records   # also from a record set

Each measurement runs in a fresh process (they share one compilation cache), so none inherits
another's memory or threads:

- end to end: ``loop.train_and_evaluate`` on the folder; images/s of each logging interval
  from its ``metrics.jsonl`` (every ``steps // 8`` steps); median over the intervals after the
  first, which holds the compilation;
- step only: the same jitted step on one batch already on the devices, timed over intervals of
  the same length, each ended by reading the loss as the loop does at a logging step; median;
- input only: the training loader's batches (no model) with 1 and 2 decode workers, threads
  and processes.

With ``--records`` the folder is also written as a record set (``csce_jax.data.prepare``) and
the end-to-end and input-only measurements are repeated reading it (``data.prepared``).

Last line: JSON with ``e2e_images_per_sec``, ``step_images_per_sec``,
``input_images_per_sec_{1,2}_{threads,processes}`` and ``e2e_vs_step`` (end to end over step
only; 1.0 means the input costs the loop nothing); with ``--records`` also the same keys with
``records`` in them (``e2e_records_vs_step``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from csce_jax.runtime import hostmem  # noqa: E402

hostmem.apply_environment()

import numpy as np  # noqa: E402
from common import report  # noqa: E402
from PIL import Image  # noqa: E402


def make_folder(root: Path, images: int, classes: int = 10, seed: int = 0) -> None:
    """``root/<class>/<i>.jpg``: smooth random pictures, 500 x 375 or 375 x 500, quality 90."""
    rng = np.random.default_rng(seed)
    for i in range(images):
        w, h = (500, 375) if i % 3 else (375, 500)
        small = rng.integers(0, 255, (h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
        folder = root / f"class_{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{i:05d}.jpg", quality=90)


def make_config(args: argparse.Namespace):
    from csce_jax.config import base_config, data_config

    c = base_config()
    c.data = data_config("folder")
    c.data.image_root = str(Path(args.tmp) / "images")
    c.data.query_fraction, c.data.val_fraction = 0.1, 0.0
    c.data.prepared = args.prepared or ""
    c.data.num_workers, c.data.worker_processes = args.workers, not args.threads
    c.batch_size, c.eval_batch_size = args.batch, args.batch
    c.total_steps = args.steps
    c.log_every_steps = args.log_every
    c.eval_every_steps = c.checkpoint_every_steps = args.steps
    c.compilation_cache = str(Path(args.tmp) / "jax_cache")
    c.model.dtype, c.model.kernels = args.dtype, args.kernels
    if args.preset == "demo":
        c.model.width, c.model.depths = 1 / 16, (1, 1, 1, 1)
        c.data.resize, c.data.crop = 128, 112
    return c


def end_to_end(config, workdir: Path) -> dict[str, float]:
    from csce_jax.train import loop
    from csce_jax.train.writers import MetricsLog

    loop.train_and_evaluate(config, workdir)
    rates = [r["images_per_sec"] for r in MetricsLog(workdir).rows() if "images_per_sec" in r]
    return {"e2e_images_per_sec": statistics.median(rates[1:])}


def step_only(config, intervals: int) -> dict[str, float]:
    import jax

    from csce_jax.data import load_data
    from csce_jax.runs import state as train_state
    from csce_jax.runs.builders import run_parts
    from csce_jax.runtime import sharding, startup
    from csce_jax.train import loop
    from csce_jax.train.step import make_train_step

    startup.prepare_jax(config)
    data = load_data(config.data)
    mesh = sharding.make_mesh()
    parts = run_parts(config, data.num_classes)
    setup = train_state.create_train_state(parts.model, parts.tx, parts.schedule)
    options = parts.step
    step = make_train_step(setup.graphdef, setup.tx, setup.schedule, options, mesh)
    host = next(loop.make_loader(config, data).batches(0))
    batch = sharding.global_batch(mesh, {k: host[k] for k in ("image", "flip", "label")})
    state = jax.device_put(setup.state, sharding.replicated(mesh))
    rates = []
    for _ in range(intervals + 1):  # the first holds the compilation
        start = time.perf_counter()
        for _ in range(config.log_every_steps):
            state, metrics = step(state, batch)
        float(metrics["loss"])
        rates.append(config.log_every_steps * config.batch_size / (time.perf_counter() - start))
    return {"step_images_per_sec": statistics.median(rates[1:])}


def input_only(config, batches: int) -> dict[str, float]:
    from csce_jax.data import load_data
    from csce_jax.train import loop

    out = {}
    for processes in (False, True):
        for count in (1, 2):
            c = config.copy_and_resolve_references()
            c.data.num_workers, c.data.worker_processes = count, processes
            c.total_steps = batches + 1  # the loader's length
            it = loop.make_loader(c, load_data(c.data)).batches(0)
            next(it)  # workers started, first batch out
            start = time.perf_counter()
            for _ in range(batches):
                next(it)
            rate = batches * c.batch_size / (time.perf_counter() - start)
            out[f"input_images_per_sec_{count}_{'processes' if processes else 'threads'}"] = rate
            del it
    return out


def run_phase(args: argparse.Namespace) -> None:
    """One measurement, in this process; its figures as the last line (progress on stderr)."""
    from absl import logging

    logging.set_verbosity(logging.INFO)
    config = make_config(args)
    if args.phase == "e2e":
        out = end_to_end(config, Path(args.tmp) / ("run_records" if args.prepared else "run"))
    elif args.phase == "step":
        out = step_only(config, intervals=args.steps // args.log_every - 1)
    else:
        out = input_only(config, batches=max(4, args.steps // 2))
    print(json.dumps(out))


def in_fresh_process(args: argparse.Namespace, phase: str, prepared: str = "") -> dict[str, float]:
    argv = [sys.executable, __file__, "--phase", phase, "--tmp", args.tmp]
    argv += ["--prepared", prepared] if prepared else []
    argv += ["--preset", args.preset, "--batch", str(args.batch), "--steps", str(args.steps)]
    argv += ["--dtype", args.dtype, "--kernels", args.kernels, "--workers", str(args.workers)]
    argv += ["--threads"] if args.threads else []
    done = subprocess.run(argv, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", choices=["full", "demo"], default="full")
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--batch", type=int, default=None, help="default 50 (full), 64 (demo)")
    p.add_argument("--steps", type=int, default=None, help="default 16 (full), 200 (demo)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--kernels", default="auto", choices=["auto", "xla", "cpu"])
    p.add_argument("--workers", type=int, default=4, help="data.num_workers of the e2e run")
    p.add_argument("--threads", action="store_true", help="data.worker_processes=False")
    p.add_argument("--records", action="store_true", help="also train from a record set")
    p.add_argument("--phase", choices=["e2e", "step", "input"], help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    p.add_argument("--prepared", help=argparse.SUPPRESS)
    args = p.parse_args()
    full = args.preset == "full"
    args.batch = args.batch or (50 if full else 64)
    args.steps = args.steps or (16 if full else 200)
    args.log_every = max(1, args.steps // 8)
    if args.phase:
        return run_phase(args)
    figures: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        make_folder(Path(tmp) / "images", args.images)
        for phase in ("e2e", "step", "input"):
            figures.update(in_fresh_process(args, phase))
        if args.records:
            from csce_jax.data.prepare import prepare

            records = str(Path(tmp) / "records")
            prepare(make_config(args), records, workers=2)
            for phase in ("e2e", "input"):
                for key, value in in_fresh_process(args, phase, records).items():
                    figures[key.replace("_images", "_records_images")] = value
    import jax

    ratio = figures["e2e_images_per_sec"] / figures["step_images_per_sec"]
    if args.records:
        figures["e2e_records_vs_step"] = (
            figures["e2e_records_images_per_sec"] / figures["step_images_per_sec"]
        )
    figures = {k: round(v, 3 if "_vs_" in k else 2) for k, v in figures.items()}
    report(
        {
            "device": str(jax.devices()[0].device_kind),
            "preset": args.preset,
            "batch": args.batch,
            "dtype": args.dtype,
            "kernels": args.kernels,
            "workers": args.workers,
            "worker_processes": not args.threads,
            **figures,
            "e2e_vs_step": round(ratio, 3),
        }
    )


if __name__ == "__main__":
    main()
