"""A content digest of a tree of arrays, computed where the arrays are (one small transfer).

A checkpoint records the digest of what it saved; a restore recomputes it over what it read,
so a damaged or edited file is refused instead of training on. (Files an index writes are
digested by their bytes instead: :func:`file_digest`, :func:`json_digest`.) Each leaf's bits (as unsigned
integers) are summed with odd position weights modulo 2^32: any change of one element changes
the sum, since an odd weight is invertible modulo 2^32. The per-leaf sums, shapes and dtypes
(in the tree's flattening order) are then hashed together.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}


def _leaf_sum(x: jax.Array) -> jax.Array:
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        u = x.astype(jnp.uint32)
    else:  # 8-byte leaves become pairs of 32-bit words
        u = jax.lax.bitcast_convert_type(x, _UNSIGNED[x.dtype.itemsize]).astype(jnp.uint32)
    u = u.ravel()
    weights = jnp.arange(u.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
    return jnp.sum(u * weights, dtype=jnp.uint32)


@jax.jit
def _leaf_sums(leaves: list[jax.Array]) -> jax.Array:
    return jnp.stack([_leaf_sum(x) for x in leaves]) if leaves else jnp.zeros(0, jnp.uint32)


def tree_digest(tree: Any) -> str:
    """A 16-hex-digit digest of ``tree``'s leaves: shapes, dtypes and every bit of their data."""
    leaves = jax.tree.leaves(tree)
    sums = np.asarray(_leaf_sums([jnp.asarray(x) for x in leaves]), np.uint32)
    shapes = [(tuple(np.shape(x)), str(jnp.asarray(x).dtype)) for x in leaves]
    h = hashlib.sha256(repr(shapes).encode())
    h.update(sums.tobytes())
    return h.hexdigest()[:16]


def file_digest(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex), read in blocks: what an index records of each
    file it writes and checks when it reads it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def json_digest(record: dict[str, Any]) -> str:
    """The SHA-256 of a JSON record in canonical form (sorted keys), without its own
    ``digest`` field: a manifest carries it to show it was not edited."""
    body = {k: v for k, v in record.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
