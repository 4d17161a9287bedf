"""Process-level setup before training: XLA flags the layers need, joining a multi-host job,
XLA's compilation cache, and the cache folder (downloads, compiled programs)."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import ml_collections
from absl import logging

from csce_jax.errors import ConfigError
from csce_jax.runtime.hostmem import accelerator_present, gpu_present

# The CPU-tuned layers (model.kernels="cpu") give XLA:GPU dots that its Triton GEMM fusion
# cannot tile: compiling the training step aborts in triton_tiling_propagation.cc. With Triton
# GEMM off, XLA:GPU hands those dots to cuBLAS and the step compiles.
TRITON_GEMM_OFF = "--xla_gpu_enable_triton_gemm=false"


def cache_dir() -> Path:
    """Where downloads and XLA's compilation cache live: ``$CSCE_JAX_CACHE``, else
    ``~/.cache/csce_jax``."""
    return Path(os.environ.get("CSCE_JAX_CACHE", Path.home() / ".cache" / "csce_jax"))


def xla_flags_for(kernels: str, gpu: bool, flags: str) -> str | None:
    """The ``XLA_FLAGS`` value ``kernels`` needs on this host, or None when ``flags`` will do.

    Only the CPU-tuned layers on a GPU host need a flag (an XLA:GPU one: a TPU or CPU host
    gets none); a Triton GEMM setting the user gave stands.
    """
    if kernels != "cpu" or not gpu or "xla_gpu_enable_triton_gemm" in flags:
        return None
    return f"{flags} {TRITON_GEMM_OFF}".strip()


def set_xla_flags(config: ml_collections.ConfigDict) -> None:
    """Set the XLA flags ``config.model.kernels`` needs before JAX starts its backends, and log
    them; refuse when a GPU backend already started without them."""
    flags = os.environ.get("XLA_FLAGS", "")
    wanted = xla_flags_for(config.model.kernels, gpu_present(), flags)
    if wanted is None:
        return
    if backends_started():
        if jax.default_backend() == "gpu":
            raise ConfigError(
                f"model.kernels='cpu' on a GPU needs XLA_FLAGS={TRITON_GEMM_OFF} before JAX "
                "starts (XLA:GPU's Triton GEMM cannot compile these layers): set it, or use "
                "model.kernels=auto"
            )
        return
    os.environ["XLA_FLAGS"] = wanted
    logging.info("model.kernels=cpu on a GPU host: XLA_FLAGS=%r", wanted)


def backends_started() -> bool:
    """Whether JAX has created its backends (XLA_FLAGS no longer applies then). JAX 0.10 and
    0.12 have no public query for it (``jax.extend.backend.get_backend``'s cache tells on 0.10
    only), so this one function reads JAX's own record; it is the package's only use of
    ``jax._src``."""
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def prepare_jax(config: ml_collections.ConfigDict) -> None:
    """Before a run touches JAX: the XLA flags its layers need, then the compilation cache."""
    set_xla_flags(config)
    enable_compilation_cache(config.compilation_cache)


# A loaded or slow host can stall for minutes (compiling, or starved of CPU) before it reaches
# the coordinator or sends a heartbeat; JAX's defaults (300 s to join, 100 s without a
# heartbeat) would then abort the whole job. These give a slow host time instead.
JOIN_TIMEOUT_S = 900
HEARTBEAT_TIMEOUT_S = 600


def initialize_distributed(config: ml_collections.ConfigDict) -> None:
    """Join a multi-process job when asked: ``config.distributed``, ``CSCE_DISTRIBUTED=1``, or
    an explicit ``config.coordinator_address`` (with ``num_processes`` and ``process_id``).

    Without an address JAX finds the job itself (its cluster detection: SLURM, Open MPI, Cloud
    TPU and the other environments it knows). On CPU-only hosts the cross-process collectives
    are set to gloo first.
    """
    explicit = bool(config.coordinator_address)
    wanted = config.distributed or explicit or os.environ.get("CSCE_DISTRIBUTED") == "1"
    if not wanted or jax.distributed.is_initialized():
        return
    kwargs = {}
    if explicit:
        n, i = config.num_processes, config.process_id
        if n < 1 or not 0 <= i < n:
            raise ConfigError(
                f"config.coordinator_address={config.coordinator_address!r} needs "
                f"config.num_processes >= 1 and 0 <= config.process_id < num_processes "
                f"(got {n} and {i})"
            )
        kwargs = {
            "coordinator_address": config.coordinator_address,
            "num_processes": n,
            "process_id": i,
        }
    if not accelerator_present():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        **kwargs,
        initialization_timeout=JOIN_TIMEOUT_S,
        heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
    )


def enable_compilation_cache(setting: str) -> str | None:
    """Point XLA's persistent compilation cache at ``setting`` ("auto", a path, or "")."""
    if not setting:
        return None
    if setting == "auto":
        setting = str(cache_dir() / "xla")
    try:
        Path(setting).mkdir(parents=True, exist_ok=True)
    except OSError:  # an unwritable cache only costs compile time: run without it
        return None
    jax.config.update("jax_compilation_cache_dir", setting)
    # Every program, however quick to compile: building the model runs its initialisers
    # eagerly, a few dozen small programs (about 9 s for the demo's model on a 2-core CPU)
    # that a warm cache serves in about 1 s at every later start (resume, eval.py).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return setting
