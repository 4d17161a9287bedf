"""Process-level setup before training: joining a multi-host job and XLA's compilation cache."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import ml_collections

from csce_jax.pretrained import cache_dir


def _distributed_ready() -> bool:
    try:
        from jax._src import distributed

        return distributed.global_state.client is not None
    except Exception:  # pragma: no cover - private API moved
        return False


def initialize_distributed(config: ml_collections.ConfigDict) -> None:
    """``jax.distributed.initialize()`` when asked by the config or ``CSCE_DISTRIBUTED=1``.

    JAX itself finds the coordinator on SLURM, Open MPI and Cloud TPU; elsewhere set
    ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (docs/training.md).
    """
    wanted = config.distributed or os.environ.get("CSCE_DISTRIBUTED") == "1"
    if wanted and not _distributed_ready():
        jax.distributed.initialize()


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
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return setting
