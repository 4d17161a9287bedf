"""End-to-end training speed through ``train.py``'s own loop, against the step alone and the
input pipeline alone, on a generated JPEG folder of CUB-like sizes (about 500 x 375).

  python benchmarks/bench_e2e.py                   # ResNet-50 CSCE-Net, 224 px, batch 50
  python benchmarks/bench_e2e.py --preset demo     # the digits demo's model: width 1/16, 112 px

- end-to-end: ``train_lib.train_and_evaluate`` on the folder; images/s from its logged rows
  (median over the logging intervals after the first, which holds the compilation);
- step only: the same jitted step on one batch already on the device (median of steps);
- input only: the training loader's batches with 1 and 2 decode threads (no model).

Last line: JSON with ``e2e_images_per_sec``, ``step_images_per_sec``,
``input_images_per_sec_1_thread``, ``input_images_per_sec_2_threads`` and ``e2e_vs_step``
(end-to-end over step-only; 1.0 means the input costs the loop nothing).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from csce_jax import hostmem  # noqa: E402

hostmem.apply_environment()

import numpy as np  # noqa: E402
from common import median_time, report  # noqa: E402
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


def make_config(args, image_root: Path):
    from configs.common import base_config, data_config

    c = base_config()
    c.data = data_config("folder")
    c.data.image_root = str(image_root)
    c.data.query_fraction, c.data.val_fraction = 0.1, 0.0
    c.data.num_threads = args.threads
    c.batch_size, c.eval_batch_size = args.batch, args.batch
    c.total_steps = args.steps
    c.log_every_steps = args.log_every
    c.eval_every_steps = c.checkpoint_every_steps = args.steps
    c.compilation_cache = ""
    if args.preset == "demo":
        c.model.width, c.model.depths = 1 / 16, (1, 1, 1, 1)
        c.data.resize, c.data.crop = 128, 112
    return c


def end_to_end(config, workdir: Path) -> float:
    from csce_jax import train_lib
    from csce_jax.writers import MetricsLog

    train_lib.train_and_evaluate(config, workdir)
    rates = [r["images_per_sec"] for r in MetricsLog(workdir).rows() if "images_per_sec" in r]
    return statistics.median(rates[1:])


def step_only(config, repeats: int) -> float:
    import jax

    from csce_jax import sharding, train_lib
    from csce_jax import state as train_state
    from csce_jax.data import load_data

    data = load_data(config.data)
    mesh = sharding.make_mesh()
    setup = train_state.create_train_state(config, data.num_classes)
    step = train_lib.make_train_step(setup.graphdef, setup.tx, setup.schedule, config, False, mesh)
    host = next(train_lib.make_loader(config, data).batches(0))
    batch = sharding.global_batch(mesh, {"image": host["image"], "label": host["label"]})
    holder = {"state": jax.device_put(setup.state, sharding.replicated(mesh))}

    def run():
        holder["state"], m = step(holder["state"], batch)
        jax.block_until_ready(m["loss"])

    return config.batch_size / median_time(run, repeats=repeats, warmup=2)


def input_only(config, threads: int, batches: int) -> float:
    from csce_jax import train_lib
    from csce_jax.data import load_data

    config = config.copy_and_resolve_references()
    config.data.num_threads = threads
    data = load_data(config.data)
    it = train_lib.make_loader(config, data).batches(0)
    next(it)  # threads started, first batch out
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * config.batch_size / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", choices=["full", "demo"], default="full")
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--batch", type=int, default=None, help="default 50 (full), 64 (demo)")
    p.add_argument("--steps", type=int, default=None, help="default 16 (full), 200 (demo)")
    p.add_argument("--threads", type=int, default=4, help="data.num_threads of the e2e run")
    args = p.parse_args()
    full = args.preset == "full"
    args.batch = args.batch or (50 if full else 64)
    args.steps = args.steps or (16 if full else 200)
    args.log_every = max(1, args.steps // 8)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        make_folder(root, args.images)
        config = make_config(args, root)
        e2e = end_to_end(config, Path(tmp) / "run")
        step = step_only(config, repeats=max(3, args.log_every))
        inputs = {n: input_only(config, n, batches=max(4, args.steps // 4)) for n in (1, 2)}
    import jax

    report(
        {
            "device": str(jax.devices()[0].device_kind),
            "preset": args.preset,
            "batch": args.batch,
            "threads": args.threads,
            "e2e_images_per_sec": round(e2e, 2),
            "step_images_per_sec": round(step, 2),
            "input_images_per_sec_1_thread": round(inputs[1], 2),
            "input_images_per_sec_2_threads": round(inputs[2], 2),
            "e2e_vs_step": round(e2e / step, 3),
        }
    )


if __name__ == "__main__":
    main()
