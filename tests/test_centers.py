"""Hash centres: values, balance, distance conditions, determinism (docs/model.md)."""

import numpy as np
import pytest

from csce_jax.hashing import center_stats, hash_centers, pairwise_hamming, sylvester_hadamard

FEASIBLE = [
    (b, c) for b in (12, 24, 32, 48, 64) for c in (10, 100, 132, 200) if (b, c) != (12, 200)
]


@pytest.mark.parametrize(("bits", "classes"), FEASIBLE)
def test_centers_meet_the_distance_conditions(bits, classes):
    c = hash_centers(classes, bits, seed=0)
    assert c.dtype == np.int8 and c.shape == (classes, bits)
    assert set(np.unique(c)) <= {-1, 1}
    lo, mean = center_stats(c)
    assert lo > bits / 4
    assert mean >= bits / 2
    assert len(np.unique(c, axis=0)) == classes


@pytest.mark.parametrize("bits", [12, 24, 48])
def test_non_power_of_two_rows_are_balanced(bits):
    c = hash_centers(50, bits)
    np.testing.assert_array_equal((c == -1).sum(axis=1), bits // 2)


def test_power_of_two_uses_hadamard_rows_then_balanced_rows():
    h = sylvester_hadamard(64)
    np.testing.assert_array_equal(h @ h.T, 64 * np.eye(64))
    c = hash_centers(200, 64)
    np.testing.assert_array_equal(c[:64], h)
    np.testing.assert_array_equal(c[64:128], -h)
    np.testing.assert_array_equal((c[128:] == -1).sum(axis=1), 32)


def test_deterministic_for_a_seed():
    np.testing.assert_array_equal(hash_centers(300, 48, seed=3), hash_centers(300, 48, seed=3))
    assert not np.array_equal(hash_centers(300, 48, seed=3), hash_centers(300, 48, seed=4))


def test_infeasible_case_keeps_the_best_minimum(caplog):
    # At most 132 balanced 12-bit words are pairwise >= 4 apart; distances between balanced
    # words are even, so for 200 classes the best possible minimum is 2 (all rows distinct).
    with caplog.at_level("WARNING"):
        c = hash_centers(200, 12)
    lo, mean = center_stats(c)
    assert lo == 2
    assert len(np.unique(c, axis=0)) == 200
    assert mean >= 6.0
    assert "cannot all be met" in caplog.text and "min distance 2" in caplog.text


def test_impossible_class_count_is_refused():
    with pytest.raises(ValueError, match="at most 924 exist"):
        hash_centers(1000, 12)


def test_thousand_classes_at_64_bits():
    c = hash_centers(1000, 64)  # timed in benchmarks/bench_centers.py
    d = pairwise_hamming(c)[np.triu_indices(1000, 1)]
    assert d.min() > 16 and d.mean() >= 32


def test_steiner_pool_is_optimal_at_12_bits():
    from csce_jax.hashing.centers import steiner_12

    s = steiner_12()
    assert s.shape == (132, 12)
    np.testing.assert_array_equal((s == -1).sum(1), 6)
    lo, mean = center_stats(s)
    assert lo == 4 and mean >= 6
