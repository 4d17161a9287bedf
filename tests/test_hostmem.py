"""csce_jax.runtime.hostmem: glibc keeps freed blocks, so a second step's buffers do not fault again."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from csce_jax.runtime import hostmem

ROOT = Path(__file__).resolve().parents[1]

# In a fresh process: set the allocator, then allocate, touch and free 256 MiB twice and count
# the page faults of the second round (what every training step after the first one pays).
PROBE = """
import json, resource, sys
from csce_jax.runtime import hostmem
tuned = hostmem.keep_freed_memory(sys.argv[1])
import numpy as np
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def one_round():
    a = np.ones(64 * 2**20, np.float32)
    a += 1.0
    del a
one_round()
before = faults()
one_round()
print(json.dumps({"tuned": tuned, "faults": faults() - before}))
"""
PAGES = 256 * 2**20 // 4096


def probe(setting: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, setting],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        # XLA's buffers are plain pages; numpy would ask for huge pages and fault 512x less often.
        env={**os.environ, "NUMPY_MADVISE_HUGEPAGE": "0"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_tuned_allocator_reuses_freed_memory():
    default = probe("default")
    tuned = probe("tuned")
    assert default["tuned"] is False and tuned["tuned"] is True
    # glibc's default maps a 256 MiB block afresh each time: every page faults again.
    assert default["faults"] > 0.5 * PAGES, default
    # Tuned: the freed block is reused; almost nothing faults.
    assert tuned["faults"] < 0.05 * PAGES, tuned


def test_bad_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv(hostmem.ENV, "fast")
    with pytest.raises(ValueError, match="CSCE_JAX_HOST_ALLOCATOR='fast'"):
        hostmem.keep_freed_memory()


def test_auto_leaves_accelerator_hosts_alone(monkeypatch):
    monkeypatch.setattr(hostmem, "accelerator_present", lambda: True)
    assert hostmem.keep_freed_memory("auto") is False
    assert hostmem.keep_freed_memory("default") is False


def test_an_absent_tpu_is_not_probed_where_libtpu_is_installed(monkeypatch):
    import importlib.util

    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(hostmem, "accelerator_present", lambda: False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    assert hostmem.skip_absent_tpu() and os.environ["JAX_PLATFORMS"] == "cpu"
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")  # the user's choice stands
    assert not hostmem.skip_absent_tpu() and os.environ["JAX_PLATFORMS"] == "tpu"
    monkeypatch.delenv("JAX_PLATFORMS")
    monkeypatch.setattr(hostmem, "accelerator_present", lambda: True)  # a TPU VM
    assert not hostmem.skip_absent_tpu() and "JAX_PLATFORMS" not in os.environ
