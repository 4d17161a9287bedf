"""Where a run is planned for: TPU slices by name, N local CPU devices, or this host's devices.

A target is a set of JAX devices that programs can be compiled for, with or without the
hardware: a TPU topology is described by libtpu on any host (``pip install "jax[tpu]"``),
through ``jax.experimental.topologies``; its devices compile programs but run none.

Names (``csce-plan --target``):

- TPU topologies as JAX names them: ``v5e:2x2``, ``v6e:4x4``, ``v4:2x2x1``, ``v5p:4x4x4``;
- TPU slices as Cloud TPU names them: ``v5e-8``, ``v6e-256`` (chips), ``v4-8``,
  ``v5p-128`` (TensorCores: two per chip, one megacore device);
- ``cpu:N``: N CPU devices of this process (one host);
- ``local``: this host's own devices (its GPUs on a GPU host);
- GPUs by chip (``h100:8``, ``gpu``): only where the installed JAX can describe a GPU without
  one, which its CUDA plugin cannot do before it has found a driver (refused in one line).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

import jax

from csce_jax.errors import ConfigError
from csce_jax.runtime import chips, hostmem

# Cloud TPU slice names count chips (v5e, v6e) or TensorCores (v4, v5p: two per chip).
CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}
MEGACORE = ("v4", "v5p")  # one JAX device per chip (both TensorCores), as Cloud TPU VMs run
SINGLE_HOST_CHIPS = {"v5e": 8, "v6e": 8}  # the largest slice on one VM; bigger: 4 chips a host
# libtpu loaded on a host without a TPU, to describe one: it looks for the TPU VM it is on
# (and prints a page of warnings when it finds none) and takes a lock that lets one process
# at a time use it; compiling needs neither. Set only where no TPU is present.
LIBTPU_COMPILE_ONLY = {
    "TPU_SKIP_MDS_QUERY": "1",
    "TPU_WORKER_HOSTNAMES": "localhost",
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
}
ACCELERATOR_TYPES = {"v4": "v4-8", "v5e": "v5litepod-4", "v5p": "v5p-8", "v6e": "v6e-4"}
GPU_REFUSAL = (
    "cannot compile for a GPU here: JAX's CUDA plugin registers a GPU topology only after it "
    "has found an NVIDIA driver, and this host has none; on a GPU host use --target local"
)


@dataclasses.dataclass(frozen=True)
class Target:
    """The devices of one planned slice or node, and what is known of their chip."""

    name: str  # as given
    platform: str  # "tpu", "cpu" or "gpu"
    devices: tuple[Any, ...]
    topology: str  # JAX's topology name, or the platform and count
    chip: chips.Chip | None

    @property
    def device_kind(self) -> str:
        return self.devices[0].device_kind

    @property
    def hosts(self) -> int:
        return len({d.process_index for d in self.devices})

    @property
    def devices_per_host(self) -> int:
        return len(self.devices) // self.hosts

    def memory_bytes(self) -> int | None:
        """The memory of one device: its chip's HBM; a CPU device has the host's memory."""
        if self.chip is not None:
            return self.chip.hbm_bytes
        if self.platform == "cpu":
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return None


def _grid(chips: int, dims: int) -> list[int]:
    """The slice shape Cloud TPU gives ``chips`` (a power of two): from 2x2 (x1), the
    smallest side doubled, the last of equal sides first (2-D: 8 -> 2x4, 16 -> 4x4; 3-D:
    8 -> 2x2x2, 32 -> 2x4x4, 128 -> 4x4x8)."""
    shape = [2, 2, 1][:dims] if chips >= 4 else [1] * dims
    while math.prod(shape) < chips:
        smallest = min(shape)
        last = max(i for i, s in enumerate(shape) if s == smallest)
        shape[last] *= 2
    return shape


def _slice_topology(family: str, count: int) -> tuple[str, tuple[int, int, int]]:
    """(JAX topology name, chips per host) of a Cloud TPU slice name such as v5e-8, v5p-128."""
    chips, rest = divmod(count, CORES_PER_CHIP[family])
    if rest or chips < 1 or chips & (chips - 1):
        raise ConfigError(
            f"--target {family}-{count}: give the topology instead (e.g. {family}:4x4x12); "
            "slice names are read for powers of two"
        )
    three_d = family in MEGACORE
    shape = _grid(chips, 3 if three_d else 2)
    if three_d and chips < 4:
        raise ConfigError(f"--target {family}-{count}: the smallest {family} slice has 4 chips")
    if not three_d and chips <= SINGLE_HOST_CHIPS[family]:
        per_host = (*shape, 1)
    else:
        per_host = (2, 2, 1)
    return f"{family}:{'x'.join(map(str, shape))}", per_host


def _tpu(name: str) -> Target:
    from jax.experimental import topologies

    if m := re.fullmatch(r"(v4|v5e|v5p|v6e)-(\d+)", name):
        topology, per_host = _slice_topology(m[1], int(m[2]))
        kwargs: dict[str, Any] = {"chips_per_host_bounds": per_host}
    else:
        topology, kwargs = name, {}
    family = topology.split(":")[0]
    if family in MEGACORE:
        kwargs["chip_config_name"] = "megacore"
    try:
        desc = topologies.get_topology_desc(topology_name=topology, platform="tpu", **kwargs)
    except (RuntimeError, ValueError) as e:
        problem = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not libtpu_present():
            problem = f'libtpu is not installed (pip install "jax[tpu]=={jax.__version__}")'
        raise ConfigError(f"--target {name}: cannot describe this TPU slice: {problem}") from None
    devices = tuple(desc.devices)
    return Target(name, "tpu", devices, topology, chips.chip_of(devices[0].device_kind))


def libtpu_without_a_tpu(names: list[str]) -> None:
    """Before libtpu loads on a host with no TPU: the environment that keeps it quiet and
    lets several processes compile at once (a TPU VM's own settings stand)."""
    if hostmem.accelerator_present():
        return
    for key, value in LIBTPU_COMPILE_ONLY.items():
        os.environ.setdefault(key, value)
    family = next((re.split(r"[:-]", n.strip())[0] for n in names if n.startswith("v")), None)
    if family in ACCELERATOR_TYPES:
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", ACCELERATOR_TYPES[family])


def libtpu_present() -> bool:
    """Whether TPU slices can be described here (libtpu is installed)."""
    return hostmem.libtpu_installed()


def _cpu(name: str, count: int) -> Target:
    devices = jax.devices("cpu")
    if count < 1 or count > len(devices):
        raise ConfigError(
            f"--target {name}: this process has {len(devices)} CPU device(s); set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={count} before JAX starts "
            "(csce-plan does so itself when it starts)"
        )
    return Target(name, "cpu", tuple(devices[:count]), f"cpu x {count}", None)


def _local(name: str) -> Target:
    devices = tuple(jax.devices())
    platform = devices[0].platform
    platform = "gpu" if platform in ("cuda", "rocm") else platform
    kind = devices[0].device_kind
    return Target(name, platform, devices, f"{platform} x {len(devices)}", chips.chip_of(kind))


def _gpu(name: str) -> Target:
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(topology_name=name, platform="cuda")
    except Exception:  # every failure here means the same: no GPU topology
        raise ConfigError(f"--target {name}: {GPU_REFUSAL}") from None
    devices = tuple(desc.devices)
    return Target(name, "gpu", devices, name, chips.chip_of(devices[0].device_kind))


def resolve(name: str) -> Target:
    """The devices and chip of target ``name`` (see the module docstring)."""
    name = name.strip()
    if m := re.fullmatch(r"cpu:(\d+)", name):
        return _cpu(name, int(m[1]))
    if name == "local":
        return _local(name)
    if re.fullmatch(r"(v4|v5e|v5p|v6e)(-\d+|:\d+(x\d+)+)", name):
        return _tpu(name)
    if re.fullmatch(r"(gpu|cuda|[ahb]\d+)(:\d+)?", name, re.IGNORECASE):
        return _gpu(name)
    raise ConfigError(
        f"--target {name}: not a target; use a TPU topology (v5e:2x2, v5p:4x4x4), a slice "
        "(v5e-8, v4-8, v5p-128, v6e-256), cpu:N, or local"
    )


def cpu_devices_needed(names: list[str]) -> int:
    """The most CPU devices any ``cpu:N`` target asks for (0 when none does)."""
    counts = [int(m[1]) for n in names if (m := re.fullmatch(r"\s*cpu:(\d+)\s*", n))]
    return max(counts, default=0)
