"""Hash centres and the dynamic sign function: the binary side of CSCE-Net.

Public contracts: ``hash_centers(num_classes, bits, seed=0)`` and
``dynamic_sign(v, t, estimator="ste" | "release")``, ``binarize(v, t)`` (the evaluation's
codes).
"""

from csce_jax.hashing.centers import (
    center_stats,
    centers_fingerprint,
    hash_centers,
    pairwise_hamming,
    sylvester_hadamard,
)
from csce_jax.hashing.dsf import balance_fill, binarize, dynamic_sign, squash

__all__ = [
    "balance_fill",
    "binarize",
    "center_stats",
    "centers_fingerprint",
    "dynamic_sign",
    "hash_centers",
    "pairwise_hamming",
    "squash",
    "sylvester_hadamard",
]
