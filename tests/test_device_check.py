"""benchmarks/device_check.sh runs end to end (a tiny CPU smoke run of the GPU script)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# Two of the script's three kinds of check (the other step checks differ only in batch,
# dtype, kernels or PyTorch layout, options of bench_train_step's): JAX against channels_last
# PyTorch, and end to end. The third trains the demo through train.py, as most of this suite
# does.
CHECKS = [("step_b4_bf16_xla", "xla", "channels_last")]


@pytest.mark.slow
def test_device_check_script_smoke_run(tmp_path):
    pytest.importorskip("torch")
    env = dict(
        os.environ,
        PRESET="demo",
        BATCH="2",
        BIG_BATCH="4",
        REPEATS="1",
        E2E_IMAGES="48",
        E2E_STEPS="4",
        DEMO_STEPS="6",
        CHECKS=" ".join([c[0] for c in CHECKS] + ["e2e_b4_bf16"]),
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
        timeout=1800,  # a loaded machine: a slow pass, not a failure
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    lines = (tmp_path / "device_check.jsonl").read_text().splitlines()
    rows = {r["check"]: r for r in map(json.loads, lines)}
    assert list(rows) == [c[0] for c in CHECKS] + ["e2e_b4_bf16"]
    for name, kernels, layout in CHECKS:
        r = rows[name]
        assert (r["preset"], r["size"]) == ("demo", 112) and r["model_gflops_per_image"] > 0
        if kernels:
            assert r["kernels"] == kernels and r["jax_train_images_per_sec"] > 0
            assert r["xla_gflops_per_image"] > 0  # the CPU counts every convolution
            assert r["jax_mfu"] is None  # no peak FLOP/s known for a CPU: no invented MFU
        else:
            assert "jax_train_images_per_sec" not in r
        if layout:
            assert r["torch_layout"] == layout and r["torch_train_images_per_sec"] > 0
        else:
            assert "torch_train_images_per_sec" not in r
        assert ("train_ratio_vs_torch" in r) == bool(kernels and layout)
    e2e = rows["e2e_b4_bf16"]
    assert e2e["batch"] == 4 and e2e["dtype"] == "bfloat16" and e2e["worker_processes"]
    assert e2e["e2e_images_per_sec"] > 0 and e2e["step_images_per_sec"] > 0
    assert e2e["e2e_vs_step"] > 0 and e2e["input_images_per_sec_2_processes"] > 0
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["seconds"] == sum(r["seconds"] for r in rows.values())
    assert (
        summary["step_b4_bf16_xla.train_ratio_vs_torch"]
        == rows["step_b4_bf16_xla"]["train_ratio_vs_torch"]
    )
