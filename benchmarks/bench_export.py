"""Encoding speed of the exported ONNX encoder in onnxruntime against our jitted encoder, on
the same prepared images (uint8, crop x crop), batch 1 and 64, side by side in one run.

  python benchmarks/bench_export.py --src runs/demo [--repeats 7]

Exports ``--src`` (a run folder or weights file) to a temporary ONNX file first (checked
against the model by the export). Figures: images/s, the median of ``--repeats`` timed calls
after a warm-up; ``jax_over_onnxruntime_ratio_batchB`` is ours (JAX) over onnxruntime's.
Last line: JSON of the figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median_time, report

import csce_jax
from csce_jax.convert import artifact


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--src", required=True, help="a run folder or a weights file")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    import jax
    import onnxruntime

    loaded = csce_jax.load_model(args.src)
    fig: dict[str, object] = {
        "bits": loaded.bits,
        "crop": loaded.crop,
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "model.onnx")
        artifact.export_onnx(loaded, args.src, path)
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for batch in (1, 64):
        images = rng.integers(0, 256, (batch, loaded.crop, loaded.crop, 3), dtype=np.uint8)
        assert np.array_equal(
            session.run(["codes"], {"images": images})[0], loaded.encode_batch(images)
        )
        t_onnx = median_time(
            lambda x=images: session.run(["codes"], {"images": x}), repeats=args.repeats
        )
        t_jax = median_time(lambda x=images: loaded.encode_batch(x), repeats=args.repeats)
        fig[f"onnxruntime_images_per_s_batch{batch}"] = round(batch / t_onnx, 1)
        fig[f"jax_images_per_s_batch{batch}"] = round(batch / t_jax, 1)
        fig[f"jax_over_onnxruntime_ratio_batch{batch}"] = round(t_onnx / t_jax, 3)
    report(fig)


if __name__ == "__main__":
    main()
