"""The device mesh and how arrays are laid on it: one ('data',) axis over every device of every
host; parameters replicated, batches split along their first axis.

The mesh uses ``AxisType.Auto`` (XLA propagates shardings through the model), not the explicit
sharding mode that ``jax.make_mesh`` defaults to in recent JAX, which would ask every reshape for
an output sharding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def make_mesh(*, local: bool = False, devices: Sequence[Any] | None = None) -> Mesh:
    """A 1-D ('data',) mesh over all devices of all processes (``local``: of this one only,
    for work each host does on its own, such as encoding its shards of a collection).

    ``devices``: the devices of another target (a TPU slice described on this host, for
    compiling ahead of time), laid out as ``jax.make_mesh`` lays out a real job's.
    """
    auto = (jax.sharding.AxisType.Auto,)
    if local:
        return Mesh(np.asarray(jax.local_devices()), ("data",), axis_types=auto)
    if devices is not None:
        return jax.make_mesh((len(devices),), ("data",), devices=devices, axis_types=auto)
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=auto)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def global_batch(mesh: Mesh, host_batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """Host-local batch -> global arrays sharded along ('data',) over every host's devices."""
    sharding = data_sharded(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in host_batch.items()}


def gather(x: jax.Array) -> np.ndarray:
    """A (possibly multi-host) global array as one numpy array on every host."""
    if x.is_fully_replicated:  # every device holds all of it (the encode step's outputs)
        return np.asarray(x.addressable_data(0))
    if jax.process_count() == 1 or x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
