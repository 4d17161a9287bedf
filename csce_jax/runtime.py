"""Process-level setup before training: joining a multi-host job and XLA's compilation cache."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import ml_collections

from csce_jax.errors import ConfigError
from csce_jax.hostmem import accelerator_present
from csce_jax.pretrained import cache_dir


def _distributed_ready() -> bool:
    try:
        from jax._src import distributed

        return distributed.global_state.client is not None
    except Exception:  # pragma: no cover - private API moved
        return False


def initialize_distributed(config: ml_collections.ConfigDict) -> None:
    """Join a multi-process job when asked: ``config.distributed``, ``CSCE_DISTRIBUTED=1``, or
    an explicit ``config.coordinator_address`` (with ``num_processes`` and ``process_id``).

    Without an address JAX finds the job itself on SLURM, Open MPI and Cloud TPU (or from
    ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``). On CPU-only hosts
    the cross-process collectives are set to gloo first.
    """
    explicit = bool(config.coordinator_address)
    wanted = config.distributed or explicit or os.environ.get("CSCE_DISTRIBUTED") == "1"
    if not wanted or _distributed_ready():
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
    jax.distributed.initialize(**kwargs)


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
