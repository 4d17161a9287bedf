"""benchmarks/device_check.sh runs end to end (a tiny CPU smoke run of the GPU script)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_device_check_script_smoke_run(tmp_path):
    pytest.importorskip("torch")
    env = dict(
        os.environ,
        BATCH="2",
        SIZE="112",
        WIDTH="0.0625",
        REPEATS="1",
        DTYPES="float32",  # bf16 training is checked by test_train; one run keeps this short
        OUT=str(tmp_path),
        PYTHON=sys.executable,
    )
    env.pop("XLA_FLAGS", None)  # one device, as on the GPU machine
    out = subprocess.run(
        ["bash", "benchmarks/device_check.sh", "--allow-cpu"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "device_check.jsonl").read_text().splitlines()]
    assert [r["dtype"] for r in rows] == ["float32"]
    for r in rows:
        assert (r["batch"], r["size"]) == (2, 112)
        assert r["jax_train_images_per_sec"] > 0 and r["torch_train_images_per_sec"] > 0
        assert r["train_ratio_vs_torch"] > 0 and r["train_step_gflops"] > 0
        assert r["model_gflops_per_image"] > 0 and r["xla_gflops_per_image"] > 0
        assert r["jax_mfu"] is None  # no peak FLOP/s known for a CPU: no invented MFU
    assert out.stdout.strip().splitlines()[-1] == json.dumps(rows[-1], sort_keys=True)
