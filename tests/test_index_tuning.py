"""Search-parameter tuning (rvqa.retriever.index.tuning): exact kNN against numpy,
ANN recall and its bound, the x1.5 grid with bisection, proxy and held-out query sets."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from rvqa.retriever.index import (
    KnowledgeIndex,
    exact_knn,
    knn_recall,
    knn_recall_bound,
    make_index,
    proxy_queries,
    set_search_params,
    tune_search_params,
)
from tests.index_helpers import (
    brute_force,
    build_arrays,
    unit_rows,
)


def test_exact_knn_helper_matches_numpy():
    x, q = unit_rows(1000, 16), unit_rows(7, 16, seed=3)
    s, i = exact_knn(q, x, 5, chunk=128)
    s_ref, i_ref = brute_force(q, x, 5)
    np.testing.assert_array_equal(i, i_ref)
    np.testing.assert_allclose(s, s_ref, atol=1e-5)


@pytest.mark.parametrize(
    "factory, threshold",
    [
        ("HNSW32", 0.95),
        ("IVF128,Flat", 0.95),
        ("IVF128,SQ8", 0.95),
        # 8-byte codes for 64 dims: quantisation error caps recall far below 0.95
        # (measured 0.55); PQ training is slow in faiss 1.15, so the test uses a small code
        ("IVF128,PQ8np", 0.45),
    ],
)
def test_approximate_recall_at_10(tmp_path, clustered_data, factory, threshold):
    x, q, truth = clustered_data
    path = build_arrays(tmp_path, x, factory=factory, store_embeddings=False)
    index = KnowledgeIndex.load(path)
    m = index.manifest
    assert m["factory"] == factory and m["auto_choice"] is None
    assert set(m["search_params"]) == {"efSearch" if "HNSW" in factory else "nprobe"}
    found = np.array([r.ids + [-1] * (10 - len(r)) for r in index.search(q, 10)])
    assert knn_recall(found, truth) >= threshold
    assert m["search_tuning"]["recall_at_10"] >= threshold - 0.1


def test_tuning_on_given_queries_is_minimal(tmp_path, clustered_data):
    """With representative queries, the tuned efSearch is the smallest grid value whose
    recall@10 on those queries reaches the target (with 2 standard errors to spare);
    recorded in the manifest."""
    from rvqa.retriever.index.tuning import _grid

    x, q, truth = clustered_data
    path = build_arrays(tmp_path, x, factory="HNSW16", store_embeddings=False, tuning_queries=q)
    index = KnowledgeIndex.load(path)
    tuning = index.manifest["search_tuning"]
    ef = index.manifest["search_params"]["efSearch"]
    assert tuning["query_proxy"] == "given queries" and tuning["queries"] == len(q)
    raw = faiss.read_index(str(path / "index.faiss"))

    def recall_at(value):
        set_search_params(raw, {"efSearch": value})
        return knn_recall_bound(raw.search(q, 10)[1], truth)

    mean, lower = recall_at(ef)
    assert lower >= 0.95 and mean > lower
    assert tuning["recall_at_10"] == round(mean, 4)
    assert tuning["recall_lower_bound"] == round(lower, 4)
    smaller = [v for v in _grid(16, 1024) if v < ef]
    assert all(recall_at(v)[1] < 0.95 for v in smaller)
    curve = {v: (r, lb) for v, r, lb in tuning["curve"]}
    assert curve[ef] == (tuning["recall_at_10"], tuning["recall_lower_bound"])
    assert all(curve[v] == tuple(round(x, 4) for x in recall_at(v)) for v in curve)


def test_knn_recall_bound_matches_hand_computation():
    truth = np.array([[0, 1], [2, 3], [4, 5], [6, 7]])
    found = np.array([[0, 1], [2, -1], [9, 8], [7, 6]])  # per query 1, 0.5, 0, 1
    mean, lower = knn_recall_bound(found, truth)
    per_query = np.array([1.0, 0.5, 0.0, 1.0])
    se = per_query.std(ddof=1) / 2.0
    assert mean == pytest.approx(0.625) and lower == pytest.approx(0.625 - 2 * se)
    assert knn_recall_bound(found[:1], truth[:1]) == (1.0, 1.0)  # one query: no spread


@pytest.mark.parametrize("factory, target", [("IVF128,Flat", 0.99), ("HNSW8", 0.99)])
def test_tuning_bisects_between_grid_values(clustered_data, factory, target):
    """Past the x1.5 grid, tuning bisects between the last miss and the first hit: the
    choice reaches the target, is at most the first grid value that does, lies within
    ~10% of a measured miss, and every measured point is in the recorded curve."""
    from rvqa.retriever.index.tuning import _grid

    x, q, truth = clustered_data
    index = make_index(factory, x.shape[1])
    index.train(x)
    index.add(x)
    params, tuning = tune_search_params(index, x, target=target, queries=q)
    ((name, value),) = params.items()

    def recall_at(v):
        set_search_params(index, {name: v})
        return knn_recall_bound(index.search(q, 10)[1], truth)

    lo_grid = 1 if name == "nprobe" else 16
    first_hit = next(v for v in _grid(lo_grid, 1024) if recall_at(v)[1] >= target)
    assert first_hit > lo_grid, "test data too easy: the first grid value already hits"
    assert recall_at(value)[1] >= target and value <= first_hit
    curve = {v: (r, lb) for v, r, lb in tuning["curve"]}
    misses = [v for v in curve if v < value]
    assert misses and all(curve[v][1] < target for v in misses)
    assert value - max(misses) <= max(1, max(misses) // 10)
    assert all(curve[v] == tuple(round(x, 4) for x in recall_at(v)) for v in curve)
    assert (tuning["recall_at_10"], tuning["recall_lower_bound"]) == curve[value]


@pytest.mark.parametrize("factory", ["IVF128,Flat", "HNSW8"])
def test_proxy_tuning_counts_worse_of_noise_and_held_out(clustered_data, factory):
    """With held-out corpus vectors (not in the index), every tuning point is the worse
    (by lower bound) of the noise proxy and those vectors, each checked against numpy
    brute force over the indexed rows; the choice is the first value both reach."""

    x, _, _ = clustered_data
    head, tail = x[:-150], x[-150:]
    index = make_index(factory, x.shape[1])
    index.train(x)
    index.add(head)
    params, tuning = tune_search_params(index, head, target=0.99, held_out=tail)
    ((name, value),) = params.items()
    assert tuning["queries"] == 350 and "last 150 vectors" in tuning["query_proxy"]
    qn = proxy_queries(head, 200, 0)
    truth = {
        "noise": np.argsort(-(qn @ head.T), axis=1, kind="stable")[:, :10],
        "held_out": np.argsort(-(tail @ head.T), axis=1, kind="stable")[:, :10],
    }

    def both(v):
        set_search_params(index, {name: v})
        q = {"noise": qn, "held_out": tail}
        return {s: knn_recall_bound(index.search(q[s], 10)[1], truth[s]) for s in q}

    curve = {v: (r, lb) for v, r, lb in tuning["curve"]}
    for v, point in curve.items():
        per = both(v)
        assert point == tuple(round(t, 4) for t in min(per.values(), key=lambda r: r[1]))
        if v == value:
            assert tuning["proxies"] == {s: [round(t, 4) for t in r] for s, r in per.items()}
    assert curve[value][1] >= 0.99
    assert all(curve[v][1] < 0.99 for v in curve if v < value)


def test_held_out_duplicates_and_small_tails_are_left_out(tmp_path, clustered_data):
    """Held-out vectors that duplicate a stored one would find their twin's node (like
    a stored query) and are left out; a tail under MIN_HELD_OUT vectors is not used."""
    from rvqa.retriever.index.tuning import MIN_HELD_OUT

    x, _, _ = clustered_data
    head = x[:-100]
    tail = np.concatenate([head[:60], x[-40:]])  # 60 exact copies of stored rows
    index = make_index("HNSW8", x.shape[1])
    index.add(head)
    _, tuning = tune_search_params(index, head, held_out=tail)
    assert tuning["queries"] == 200 + 40
    assert tuning["query_proxy"].endswith(
        "the corpus' last 100 vectors, searched before they were added "
        "(60 duplicates of stored vectors left out)"
    )
    _, tuning = tune_search_params(index, head, held_out=np.concatenate([head[:60], x[-29:]]))
    assert MIN_HELD_OUT == 30 and tuning["queries"] == 200 and "proxies" not in tuning
    with pytest.raises(ValueError, match=r"held-out vectors must have shape \(m >= 1, 64\)"):
        tune_search_params(index, head, held_out=x[:5, :8])
    # 299 vectors: a tail of 29 would be too small, so the build tunes on noise only.
    small = build_arrays(tmp_path, x[:299], factory="HNSW8", store_embeddings=False)
    tuning = KnowledgeIndex.load(small).manifest["search_tuning"]
    assert "proxies" not in tuning and "last" not in tuning["query_proxy"]


def test_tuning_queries_bad_input(tmp_path):
    x = unit_rows(500, 16, seed=0)
    cases = [
        (unit_rows(5, 8), ValueError, r"shape \(m >= 1, 16\), got \(5, 8\)"),
        (np.zeros((0, 16), np.float32), ValueError, r"got \(0, 16\)"),
        (np.ones((3, 16), np.int64), TypeError, "float numpy array .* dtype int64"),
        ([[0.1] * 16], TypeError, "got list"),
        (np.full((2, 16), np.nan, np.float32), ValueError, "zero, NaN or infinite row"),
    ]
    for queries, err, msg in cases:
        with pytest.raises(err, match=msg):
            build_arrays(tmp_path, x, name="bad", factory="HNSW8", tuning_queries=queries)
    assert not (tmp_path / "bad").exists()
