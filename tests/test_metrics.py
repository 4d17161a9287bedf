"""Retrieval metrics against straightforward numpy implementations of the same definitions."""

import numpy as np
import pytest

from csce_jax.retrieval import metrics


def ref_rank(q, db):
    """(distance, index) order of the database for one query, by a full lexicographic sort."""
    ham = 0.5 * (db.shape[1] - db.astype(np.float64) @ q.astype(np.float64))
    return np.lexsort((np.arange(len(db)), ham)), ham


def ref_relevant(ql, dl):
    if ql.ndim == 0:
        return dl == ql if dl.ndim == 1 else dl[:, ql] > 0
    return (dl @ ql) > 0


def ref_map(qc, dc, ql, dl, topk=None):
    aps = []
    for i in range(len(qc)):
        order, _ = ref_rank(qc[i], dc)
        rel = ref_relevant(ql[i], dl)[order][:topk]
        hits = np.flatnonzero(rel)
        aps.append(0.0 if len(hits) == 0 else np.mean(np.arange(1, len(hits) + 1) / (hits + 1)))
    return float(np.mean(aps))


def release_formula_map(qc, dc, ql_onehot, dl_onehot, topk):
    """The release's CalcTopMap, with a stable sort so that ties follow database index."""
    total = 0.0
    for i in range(len(qc)):
        gnd = (ql_onehot[i] @ dl_onehot.T > 0).astype(np.float32)
        ham = 0.5 * (dc.shape[1] - qc[i] @ dc.T)
        tgnd = gnd[np.argsort(ham, kind="stable")][:topk]
        tsum = int(tgnd.sum())
        if tsum == 0:
            continue
        count = np.linspace(1, tsum, tsum)
        tindex = np.asarray(np.where(tgnd == 1)) + 1.0
        total += np.mean(count / tindex)
    return total / len(qc)


def codes(rng, n, bits, flips=0.5):
    base = np.where(rng.random((4, bits)) < 0.5, -1, 1)
    c = base[rng.integers(0, 4, n)] * np.where(rng.random((n, bits)) < flips, -1, 1)
    return c.astype(np.int8)  # few prototypes: many exact ties


@pytest.mark.parametrize("bits", [12, 13, 64])
@pytest.mark.parametrize("topk", [None, 7, 50, 10_000])
def test_single_label_map_matches_reference_with_ties(bits, topk):
    rng = np.random.default_rng(bits)
    qc, dc = codes(rng, 40, bits, 0.1), codes(rng, 300, bits, 0.1)
    ql, dl = rng.integers(0, 6, 40), rng.integers(0, 6, 300)
    ql[0] = 99  # a query with no relevant item: AP 0
    ours = metrics.mean_average_precision(qc, dc, ql, dl, topk)
    assert abs(ours - ref_map(qc, dc, ql, dl, topk)) < 1e-9
    aps = metrics.average_precisions(qc, dc, ql, dl, topk)
    assert aps[0] == 0.0


@pytest.mark.parametrize("topk", [None, 25])
def test_multi_label_and_release_formula(topk):
    rng = np.random.default_rng(7)
    qc, dc = codes(rng, 30, 24, 0.2), codes(rng, 200, 24, 0.2)
    ql = (rng.random((30, 8)) < 0.25).astype(np.int8)
    dl = (rng.random((200, 8)) < 0.25).astype(np.int8)
    ours = metrics.mean_average_precision(qc, dc, ql, dl, topk)
    assert abs(ours - ref_map(qc, dc, ql, dl, topk)) < 1e-9
    k = 200 if topk is None else topk
    assert abs(ours - release_formula_map(qc.astype(float), dc.astype(float), ql, dl, k)) < 1e-9


def test_codes_in_any_dtype_or_packed():
    rng = np.random.default_rng(3)
    qc, dc = codes(rng, 20, 13, 0.3), codes(rng, 90, 13, 0.3)
    ql, dl = rng.integers(0, 3, 20), rng.integers(0, 3, 90)
    want = ref_map(qc, dc, ql, dl)
    for q, d in [(qc.astype(np.float32), dc.astype(np.float32)), (qc.astype(np.int64), dc)]:
        assert abs(metrics.mean_average_precision(q, d, ql, dl) - want) < 1e-9
    for words in (8, 32):
        pq, pd = metrics.pack_codes(qc, words), metrics.pack_codes(dc, words)
        assert pq.dtype == (np.uint8 if words == 8 else np.uint32)
        np.testing.assert_array_equal(metrics.unpack_codes(pq, 13), qc)
        assert abs(metrics.mean_average_precision(pq, pd, ql, dl, bits=13) - want) < 1e-9
    onehot_q, onehot_d = np.eye(3)[ql], np.eye(3)[dl]
    assert abs(metrics.mean_average_precision(qc, dc, onehot_q, onehot_d) - want) < 1e-9


def test_hamming_distances():
    rng = np.random.default_rng(0)
    qc, dc = codes(rng, 5, 70, 0.5), codes(rng, 9, 70, 0.5)
    want = 0.5 * (70 - qc.astype(int) @ dc.astype(int).T)
    np.testing.assert_array_equal(metrics.hamming_distances(qc, dc), want)


def test_precision_recall_curves_and_radius():
    rng = np.random.default_rng(5)
    qc, dc = codes(rng, 25, 16, 0.2), codes(rng, 120, 16, 0.2)
    ql, dl = rng.integers(0, 4, 25), rng.integers(0, 4, 120)
    out = metrics.precision_recall_at_k(qc, dc, ql, dl, [1, 10, 120, 500])
    assert out["k"] == [1, 10, 120, 120]
    p_ref, r_ref = [], []
    for k in (1, 10, 120):
        ps, rs = [], []
        for i in range(25):
            order, _ = ref_rank(qc[i], dc)
            rel = dl == ql[i]
            ps.append(rel[order][:k].sum() / k)
            rs.append(rel[order][:k].sum() / max(rel.sum(), 1))
        p_ref.append(np.mean(ps))
        r_ref.append(np.mean(rs))
    np.testing.assert_allclose(out["precision"][:3], p_ref, atol=1e-12)
    np.testing.assert_allclose(out["recall"][:3], r_ref, atol=1e-12)
    curve = metrics.hamming_radius_curve(qc, dc, ql, dl)
    for r in (0, 2, 5, 16):
        ps, rs = [], []
        for i in range(25):
            _, ham = ref_rank(qc[i], dc)
            inside, rel = ham <= r, dl == ql[i]
            ps.append((inside & rel).sum() / inside.sum() if inside.any() else 0.0)
            rs.append((inside & rel).sum() / max(rel.sum(), 1))
        assert abs(curve["precision"][r] - np.mean(ps)) < 1e-12
        assert abs(curve["recall"][r] - np.mean(rs)) < 1e-12
    assert metrics.precision_within_radius(qc, dc, ql, dl, 2) == curve["precision"][2]


def test_map_at_several_ks_in_one_pass():
    rng = np.random.default_rng(9)
    qc, dc = codes(rng, 30, 32, 0.2), codes(rng, 150, 32, 0.2)
    ql, dl = rng.integers(0, 5, 30), rng.integers(0, 5, 150)
    got = metrics.map_at_ks(qc, dc, ql, dl, [10, 100, None])
    for k in (10, 100, None):
        key = "map@all" if k is None else f"map@{k}"
        assert abs(got[key] - ref_map(qc, dc, ql, dl, k)) < 1e-9


def test_bad_topk_is_refused():
    with pytest.raises(ValueError, match="topk must be positive"):
        metrics.average_precisions(np.ones((1, 8)), np.ones((2, 8)), [0], [0, 1], topk=0)


def test_search_topk_orders_by_distance_then_index():
    rng = np.random.default_rng(11)
    qc, dc = codes(rng, 7, 20, 0.2), codes(rng, 60, 20, 0.2)
    idx, dist = metrics.search_topk(qc, dc, 15)
    for i in range(7):
        order, ham = ref_rank(qc[i], dc)
        np.testing.assert_array_equal(idx[i], order[:15])
        np.testing.assert_array_equal(dist[i], ham[order[:15]])


def test_chunking_keeps_results_exact(monkeypatch):
    rng = np.random.default_rng(12)
    qc, dc = codes(rng, 50, 32, 0.2), codes(rng, 80, 32, 0.2)
    ql, dl = rng.integers(0, 3, 50), rng.integers(0, 3, 80)
    whole = metrics.average_precisions(qc, dc, ql, dl)
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 80 * 3)  # chunks of 3 queries
    np.testing.assert_array_equal(metrics.average_precisions(qc, dc, ql, dl), whole)


@pytest.mark.parametrize("k", [1, 7, 99, 249, 250, 1000])
def test_the_k_nearest_equal_a_stable_full_ranking(k):
    rng = np.random.default_rng(k)
    dist = rng.integers(0, 13, (9, 1000)).astype(np.uint8)  # heavy ties
    dist[0] = 5  # a row of one distance
    dist[1, :3] = 0  # fewer than k items at the smallest distance
    want = np.argsort(dist, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(metrics.nearest(dist, k), want)


def test_the_radius_curve_gives_precision_over_answering_queries_and_their_share(tmp_path):
    """``precision`` counts a query that retrieves nothing within r as 0; ``precision_answered``
    averages over the queries that retrieve something, ``answered`` is their share, so the
    first is the product of the other two; the picture draws both."""
    from csce_jax.retrieval import pictures

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 400)
    centres = np.where(rng.random((5, 32)) > 0.5, 1, -1)
    codes = (centres[labels] * np.where(rng.random((400, 32)) < 0.15, -1, 1)).astype(np.int8)
    curve = metrics.hamming_radius_curve(codes[:40], codes[40:], labels[:40], labels[40:])
    assert curve["answered"][0] < 1 and curve["answered"][-1] == 1
    np.testing.assert_allclose(
        curve["precision"], np.multiply(curve["precision_answered"], curve["answered"]), atol=1e-12
    )
    r = next(i for i, a in enumerate(curve["answered"]) if 0 < a < 1)  # some queries answered
    assert curve["precision_answered"][r] > curve["precision"][r]
    pictures.plot_pr_curve(curve, str(tmp_path / "pr.png"), "test")
    assert (tmp_path / "pr.png").stat().st_size > 1000
