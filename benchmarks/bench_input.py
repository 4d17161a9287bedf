"""Training images per second per decoding worker: prepared records vs the JPEG files.

Every phase builds the training batches of the real pipeline (``TrainLoader``, one worker
thread, batch 64) for the same images and view (shorter side to 256, random 224 crop, flip):

- ``jpeg``: decode each JPEG and resize it every time (what ``train.py`` does without
  ``data.prepared``);
- ``records``: read the decoded, resized image from a record set (``python -m
  csce_jax.data.prepare``) and only crop it;
- ``records_jpeg``: the same from a record set stored with ``--format jpeg`` (smaller on
  disk, decoded at read time).

Each phase runs in a fresh process, under ``train.py``'s host allocator setting
(``csce_jax.runtime.hostmem``), so its peak resident memory is its own; the record sets are prepared
first (their writing speed is reported too). Images: generated photo-like JPEGs with
the shorter side 256-400 px, or ``--folder`` (e.g. a Flowers-102 ``jpg/`` folder).

  python benchmarks/bench_input.py [--images 4096] [--folder DIR] [--repeats 3]

Last line: JSON with ``<phase>_images_per_sec_per_worker``, ``<phase>_peak_rss_mb``,
``records_bytes_per_image``, ``records_jpeg_bytes_per_image``, ``ratio_records_vs_jpeg`` and
``ratio_records_jpeg_vs_jpeg`` (above 1: the records are faster).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median_time, report

BATCH = 64
RECORD_STEPS = 150
JPEG_STEPS = 30
PHASES = ("jpeg", "records", "records_jpeg")


def make_jpegs(folder: Path, n: int) -> None:
    """``n`` photo-like JPEGs (smooth content, shorter side 256-400 px) in 4 class folders."""
    rng = np.random.default_rng(0)
    for i in range(n):
        short = int(rng.integers(256, 401))
        w, h = (int(short * rng.uniform(1.0, 1.5)), short)
        base = rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.BICUBIC)
        path = folder / f"c{i % 4}" / f"img{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, quality=90)


def image_config(folder: Path, prepared: str = ""):
    from csce_jax.config import base_config, data_config

    c = base_config()
    c.data = data_config("folder")
    c.data.image_root = str(folder)
    c.data.query_fraction = c.data.val_fraction = 0.0
    c.data.prepared = prepared
    return c


def link_folder(src: Path, dst: Path, n: int) -> None:
    """The first ``n`` images of a flat folder ``src`` as a one-class image folder."""
    files = sorted(p for p in src.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))[:n]
    (dst / "all").mkdir(parents=True)
    for p in files:
        (dst / "all" / p.name).symlink_to(p.absolute())


def run_phase(images: Path, prepared: str, repeats: int) -> None:
    """In a fresh process: time the training batches of one source, print JSON."""
    from csce_jax.data import TrainLoader, ViewConfig, Workers, load_data

    data = load_data(image_config(images, prepared).data)
    src = data.train
    # Long enough to amortise start-up (epochs repeat); JPEG decoding is slow enough for fewer.
    steps = JPEG_STEPS if not prepared else RECORD_STEPS

    def epoch() -> int:
        loader = TrainLoader(
            src,
            global_batch=BATCH,
            num_steps=steps,
            seed=0,
            view=ViewConfig(256, 224, True),
            workers=Workers(1),
        )
        return sum(len(b["image"]) for b in loader.batches())

    seconds = median_time(epoch, repeats=repeats)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"images_per_sec": steps * BATCH / seconds, "peak_rss_mb": rss}))


def in_fresh_process(images: Path, prepared: str, repeats: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--phase-images", str(images), "--repeats", str(repeats)]
    if prepared:
        cmd += ["--phase-prepared", prepared]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    # grain's index shuffle costs about 35 ms / n per example: a few thousand images keep the
    # order's share as small as in a real data set
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--folder", help="a folder of JPEGs to use instead of generated ones")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--phase-images", help=argparse.SUPPRESS)
    p.add_argument("--phase-prepared", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phase_images:
        from csce_jax.runtime import hostmem

        hostmem.apply_environment()  # as train.py does, before the loader's threads start
        run_phase(Path(args.phase_images), args.phase_prepared, args.repeats)
        return
    import time

    from csce_jax.data.prepare import prepare

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = tmp / "images"
        if args.folder:
            link_folder(Path(args.folder), images, args.images)
        else:
            make_jpegs(images, args.images)
        figures: dict[str, object] = {"images": args.images, "batch": BATCH, "workers": 1}
        files = [f.resolve() for f in images.rglob("*") if f.is_file() or f.is_symlink()]
        figures["jpeg_bytes_per_image"] = round(sum(f.stat().st_size for f in files) / len(files))
        sets = {"records": ("raw", tmp / "raw"), "records_jpeg": ("jpeg", tmp / "jpg")}
        for phase, (fmt, out) in sets.items():
            t0 = time.perf_counter()
            workers = os.cpu_count() or 1
            summary = prepare(image_config(images), out, workers=workers, image_format=fmt)
            figures[f"{phase}_prepare_images_per_sec"] = round(
                summary["images"] / (time.perf_counter() - t0), 1
            )
            figures[f"{phase}_bytes_per_image"] = round(summary["bytes_per_image"])
        for phase in PHASES:
            prepared = str(sets[phase][1]) if phase in sets else ""
            res = in_fresh_process(images, prepared, args.repeats)
            figures[f"{phase}_images_per_sec_per_worker"] = round(res["images_per_sec"], 1)
            figures[f"{phase}_peak_rss_mb"] = round(res["peak_rss_mb"], 1)
    base = figures["jpeg_images_per_sec_per_worker"]
    figures["ratio_records_vs_jpeg"] = round(figures["records_images_per_sec_per_worker"] / base, 2)
    figures["ratio_records_jpeg_vs_jpeg"] = round(
        figures["records_jpeg_images_per_sec_per_worker"] / base, 2
    )
    figures["cpu_count"] = os.cpu_count()
    report(figures)


if __name__ == "__main__":
    main()
