"""Hash centres (CSQ): one fixed K-bit target code per class, for any K and any class count.

Rows of the Sylvester-Hadamard matrix H_K and of -H_K give 2K centres when K is a power of two,
exactly as the release does. Every other class (or every class when K is not a power of two: the
release crashes there) gets a seeded random *balanced* row (floor(K/2) entries -1), chosen row by
row: a candidate is accepted only if its Hamming distance to every row already chosen is > K/4 and
its mean distance to them is >= K/2. Accepting only rows that meet the mean bound makes the mean
over all pairs meet it too. At 12 bits the candidates come first from the 132 hexads of the
Steiner system S(5,6,12), the optimum, since random draws stall near 70 rows. When no candidate passes for a while (e.g. 200 classes at 12 bits:
at most 132 balanced 12-bit words are pairwise >= 4 apart) the bounds are relaxed one step at a
time (first the mean bound, then the minimum distance one step at a time), which greedily keeps
the minimum distance as large as it can be, and the achieved minimum and mean are logged. Vectorised: candidates are drawn and scored in batches with one matmul.
"""

from __future__ import annotations

import functools
import hashlib
import math

import numpy as np
from absl import logging

_BATCH = 256
_PATIENCE = 64  # candidate batches without an accepted row before the bounds are relaxed


def sylvester_hadamard(bits: int) -> np.ndarray:
    """The Sylvester-Hadamard matrix of order ``bits`` (a power of two), entries in {-1, +1}."""
    if bits < 1 or bits & (bits - 1):
        raise ValueError(f"Sylvester-Hadamard needs a power of two, got {bits}")
    h = np.ones((1, 1), np.int32)
    while h.shape[0] < bits:
        h = np.block([[h, h], [h, -h]])
    return h


def pairwise_hamming(codes: np.ndarray) -> np.ndarray:
    """All pairwise Hamming distances between rows of a {-1,+1} matrix, as int32 (C, C)."""
    c = codes.astype(np.int32)
    return (c.shape[1] - c @ c.T) // 2


def center_stats(centers: np.ndarray) -> tuple[int, float]:
    """(min, mean) pairwise Hamming distance over distinct pairs of rows."""
    n = centers.shape[0]
    if n < 2:
        return centers.shape[1], float(centers.shape[1])
    d = pairwise_hamming(centers)[np.triu_indices(n, 1)]
    return int(d.min()), float(d.mean())


def centers_fingerprint(centers: np.ndarray) -> str:
    """A short SHA-256 of the centres: codes are only comparable under the same centres."""
    c = np.ascontiguousarray(np.asarray(centers, np.int8))
    return hashlib.sha256(repr(c.shape).encode() + c.tobytes()).hexdigest()[:16]


def _balanced_rows(rng: np.random.Generator, n: int, bits: int) -> np.ndarray:
    rows = np.ones((n, bits), np.int32)
    negative = np.argsort(rng.random((n, bits)), axis=1)[:, : bits // 2]
    np.put_along_axis(rows, negative, -1, axis=1)
    return rows


def steiner_12() -> np.ndarray:
    """The 132 hexads of the Steiner system S(5,6,12) as balanced 12-bit rows (-1 on the hexad).

    They are the supports of the weight-6 words of the extended ternary Golay code; two hexads
    share at most 4 points, so the rows are pairwise >= 4 apart: the largest possible set of
    balanced 12-bit words with distance > 12/4, which random draws only half fill.
    """
    a = np.array(
        [
            [0, 1, 1, 1, 1, 1],
            [1, 0, 1, 2, 2, 1],
            [1, 1, 0, 1, 2, 2],
            [1, 2, 1, 0, 1, 2],
            [1, 2, 2, 1, 0, 1],
            [1, 1, 2, 2, 1, 0],
        ]
    )
    generator = np.concatenate([np.eye(6, dtype=np.int64), a], axis=1)
    messages = np.stack(np.meshgrid(*[np.arange(3)] * 6, indexing="ij"), -1).reshape(-1, 6)
    words = messages @ generator % 3
    supports = np.unique(words[(words != 0).sum(1) == 6] != 0, axis=0)
    return np.where(supports, -1, 1).astype(np.int32)


def _accept(cand, out, n, want, min_bound, mean_bound) -> list[int]:
    """Greedily accept candidate rows (in order) meeting both bounds against all chosen rows."""
    bits = cand.shape[1]
    to_chosen = (bits - cand @ out[:n].T) // 2  # (B, n)
    within = (bits - cand @ cand.T) // 2  # (B, B)
    min_d = to_chosen.min(axis=1) if n else np.full(len(cand), bits)
    sum_d = to_chosen.sum(axis=1).astype(np.float64)
    accepted: list[int] = []
    for i in range(len(cand)):
        if accepted:
            d_acc = within[i, accepted]
            lo = min(min_d[i], d_acc.min())
            total, count = sum_d[i] + d_acc.sum(), n + len(accepted)
        else:
            lo, total, count = min_d[i], sum_d[i], n
        if lo >= min_bound and (count == 0 or total >= mean_bound * count):
            accepted.append(i)
            if len(accepted) == want:
                break
    return accepted


def hash_centers(num_classes: int, bits: int, seed: int = 0) -> np.ndarray:
    """Hash centres for ``num_classes`` classes at ``bits`` bits: int8 in {-1,+1}, shape (C, K).

    Deterministic for a seed. See the module docstring for the construction and guarantees.
    Made once per (classes, bits, seed) in a process (a run asks several times); each call
    returns its own copy.
    """
    return _hash_centers(int(num_classes), int(bits), int(seed)).copy()


@functools.lru_cache(maxsize=64)
def _hash_centers(num_classes: int, bits: int, seed: int) -> np.ndarray:
    _check_counts(num_classes, bits)
    out = np.zeros((num_classes, bits), np.int32)
    n = 0
    if bits & (bits - 1) == 0:
        h = sylvester_hadamard(bits)
        n = min(num_classes, 2 * bits)
        out[:n] = np.concatenate([h, -h])[:n]
    if n == num_classes:
        return out.astype(np.int8)
    rng = np.random.default_rng(seed)
    bounds = [bits // 4 + 1, bits / 2]  # min distance strictly > K/4; mean distance >= K/2
    if bits == 12:  # the optimal pool first, rows and columns shuffled by the seed
        pool = steiner_12()[rng.permutation(132)][:, rng.permutation(12)]
        accepted = _accept(pool, out, n, num_classes - n, *bounds)
        out[n : n + len(accepted)] = pool[accepted]
        n += len(accepted)
    relaxed = _fill_random(out, n, rng, bounds)
    centers = out.astype(np.int8)
    _log_stats(centers, relaxed)
    return centers


def _check_counts(num_classes: int, bits: int) -> None:
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if bits < 2:
        raise ValueError(f"bits must be >= 2, got {bits}")
    available = math.comb(bits, bits // 2) + (2 * bits if bits & (bits - 1) == 0 else 0)
    if num_classes > available:
        raise ValueError(
            f"cannot give {num_classes} classes distinct {bits}-bit centres (at most "
            f"{available} exist): use more bits"
        )


def _fill_random(out: np.ndarray, n: int, rng: np.random.Generator, bounds: list) -> bool:
    """Rows ``n:`` of ``out`` from balanced random candidates within ``bounds`` (min, mean
    distance), relaxed one step whenever no candidate fits for a while; True if relaxed."""
    num_classes, bits = out.shape
    relaxed, stalled = False, 0
    while n < num_classes:
        cand = _balanced_rows(rng, _BATCH, bits)
        accepted = _accept(cand, out, n, num_classes - n, *bounds)
        if accepted:
            out[n : n + len(accepted)] = cand[accepted]
            n += len(accepted)
            stalled = 0
            continue
        stalled += 1
        if stalled >= _PATIENCE:  # the bounds cannot be met (or not found): relax, go on
            relaxed, stalled = True, 0
            if bounds[1] > 0:
                bounds[1] = 0.0  # the minimum distance matters more than the mean
            elif bounds[0] > 1:
                bounds[0] -= 1
            else:
                raise RuntimeError(f"no new distinct {bits}-bit centre found for class {n}")
    return relaxed


def _log_stats(centers: np.ndarray, relaxed: bool) -> None:
    num_classes, bits = centers.shape
    lo, mean = center_stats(centers)
    log = logging.warning if relaxed else logging.info
    log(
        "hash centres: %d classes x %d bits, min distance %d (wanted > %g), mean %.3f "
        "(wanted >= %g)%s",
        num_classes,
        bits,
        lo,
        bits / 4,
        mean,
        bits / 2,
        "; the bounds cannot all be met, best found kept" if relaxed else "",
    )
