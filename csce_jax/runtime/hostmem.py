"""Keep freed host memory for reuse, so CPU training steps stop page-faulting their temporaries.

Why: XLA:CPU allocates a step's temporaries (activations, gradients) when the step runs and
frees them when it ends. glibc serves blocks that large with fresh ``mmap`` calls (or from
per-thread arenas that hand them back to the kernel), so every step faults in, and the kernel
zeroes, every page of them again: about 0.8 GB per ResNet-50 batch-8 training step on the
project's 2-core CPU machine, 15-20 % of the step (``benchmarks/bench_train_step.py`` with
and without ``CSCE_JAX_HOST_ALLOCATOR=default``). One arena, no ``mmap`` and no trimming make
glibc keep what was freed and hand the same pages back next step. No computed number changes.

It must run before any other thread allocates (glibc fixes its arena limit the first time a
second thread needs an arena), so ``train.py``, ``eval.py`` and the benchmarks call it before
importing anything else. The price: the process keeps its peak host memory until it exits.

``CSCE_JAX_HOST_ALLOCATOR``: ``auto`` (default: tune unless a GPU or TPU device node exists,
where host memory is not on the step's path), ``tuned`` (always), ``default`` (never).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

ENV = "CSCE_JAX_HOST_ALLOCATOR"
CHOICES = ("auto", "tuned", "default")
# mallopt(3) parameters (glibc <malloc.h>).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
ACCELERATOR_NODES = ("/dev/nvidiactl", "/dev/accel0", "/dev/vfio/0")

_state = {"tuned": False}


def accelerator_present() -> bool:
    """Whether a GPU or TPU device node exists (then JAX will not train on the host CPU)."""
    return any(os.path.exists(node) for node in ACCELERATOR_NODES)


def libtpu_installed() -> bool:
    """Whether libtpu (TPU support for JAX) is installed, without loading it."""
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


def skip_absent_tpu() -> bool:
    """Where libtpu is installed (for ``csce-plan``) but this host has no accelerator, and
    JAX_PLATFORMS is unset, set it to ``cpu`` before JAX starts: JAX would otherwise load
    libtpu to look for a TPU, which prints a page of warnings into every command's output.
    Compiling for a TPU slice (``csce-plan``) is unaffected. Returns whether it was set."""
    if "JAX_PLATFORMS" in os.environ or accelerator_present() or not libtpu_installed():
        return False
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # imported already: JAX read the variable then
        sys.modules["jax"].config.update("jax_platforms", "cpu")
    return True


def gpu_present() -> bool:
    """Whether an NVIDIA GPU's device node exists (the XLA:GPU flags apply only there)."""
    return os.path.exists(ACCELERATOR_NODES[0])


def keep_freed_memory(setting: str | None = None) -> bool:
    """Set glibc to one arena, no mmap, no trimming; True if the settings took effect.

    ``setting`` defaults to ``$CSCE_JAX_HOST_ALLOCATOR`` (else ``auto``). A no-op (False) off
    Linux/glibc, for ``default``, and for ``auto`` where an accelerator is present.
    """
    setting = (setting or os.environ.get(ENV) or "auto").lower()
    if setting not in CHOICES:
        raise ValueError(f"{ENV}={setting!r}: expected one of {', '.join(CHOICES)}")
    if setting == "default" or (setting == "auto" and accelerator_present()):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = all(
        mallopt(param, value) == 1
        for param, value in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))
    )
    _state["tuned"] = ok
    return ok


def apply_environment() -> bool:
    """For entry points: ``keep_freed_memory()``; a bad ``$CSCE_JAX_HOST_ALLOCATOR`` exits with
    its message (nothing has been read or written yet), not a traceback."""
    try:
        return keep_freed_memory()
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None


def is_tuned() -> bool:
    """Whether ``keep_freed_memory`` has taken effect in this process."""
    return _state["tuned"]
