"""KnowledgeIndex (rvqa.retriever.index.knowledge_index): exact agreement with numpy
brute force, row access, query validation, fingerprint check, add, search params, GPU."""

from __future__ import annotations

import numpy as np
import pytest

from rvqa.errors import IndexMismatchError
from rvqa.retriever.index import (
    KnowledgeIndex,
    build_index,
)
from tests.index_helpers import (
    HashEncoder,
    brute_force,
    build_arrays,
    clustered,
    unit_rows,
)


def test_flat_search_equals_brute_force(flat_data):
    x, q, ids, path = flat_data
    index = KnowledgeIndex.load(path, "sha256:fake-retriever")
    assert index.memory_mapped and index.factory == "Flat" and len(index) == 3000
    results = index.search(q, 10)
    s_ref, i_ref = brute_force(q, x, 10)
    assert len(results) == len(q)
    for r, srow, irow in zip(results, s_ref, i_ref):
        np.testing.assert_allclose(r.scores, srow, atol=1e-5)
        assert r.ids == [ids[j] for j in irow]  # random data: no ties
        assert r.captions == [f"caption {j}" for j in irow]
        assert r.index_names == [path.name] * 10


def test_flat_scores_match_vectors(flat_data):
    """Each returned id really has the returned score (holds under ties too)."""
    x, q, _, path = flat_data
    index = KnowledgeIndex.load(path)
    for qi, r in zip(q, index.search(q, 10)):
        rows = [int(i[1:]) for i in r.ids]
        np.testing.assert_allclose(r.scores, x[rows] @ qi, atol=1e-5)
        assert r.scores == sorted(r.scores, reverse=True)


@pytest.mark.parametrize(
    "chunks",
    [
        [["a cat", "", "ünïcode ✓"], ["x"] * 4, ["dog on a mat", "b"]],  # string
        [[3, -7, 2**40], [0], [5, 6, 7, 8]],  # int64
        [["s"], [None, "t"], ["u", "v"]],  # a chunk with a null
        [[0.5, 1.5], [2.5]],  # float
    ],
)
def test_rows_take_matches_pyarrow(chunks):
    """Row access by chunk binary search equals ``ChunkedArray.to_pylist`` — across
    chunks, for sliced chunks (non-zero offset), large strings, nulls and floats."""
    import pyarrow as pa

    from rvqa.retriever.index.knowledge_index import _Rows

    col = pa.chunked_array(chunks)
    variants = [col, pa.chunked_array([c.slice(1) for c in col.chunks if len(c) > 1])]
    if pa.types.is_string(col.type):
        large = col.cast(pa.large_string())
        variants += [large, pa.chunked_array([c.slice(1) for c in large.chunks if len(c) > 1])]
    rng = np.random.default_rng(0)
    for v in variants:
        ref = v.to_pylist()
        rows = rng.integers(0, len(ref), 50)
        assert _Rows(v).take(rows) == [ref[r] for r in rows]
        assert _Rows(v).take(np.arange(len(ref))) == ref
        assert _Rows(v).take(np.array([], dtype=np.int64)) == []


def test_take_from_many_chunks_matches_arrow_take():
    import pyarrow as pa

    from rvqa.retriever.index.knowledge_index import _Rows

    col = pa.chunked_array([[f"c{i}" for i in range(s, s + 7)] for s in range(0, 70, 7)])
    rows = np.array([0, 6, 7, 69, 13, 13, 42], dtype=np.int64)
    assert _Rows(col).take(rows) == col.take(pa.array(rows)).to_pylist()
    assert _Rows(col).take(rows[:0]) == []
    one = pa.chunked_array([["a", "b", "c"]])
    assert _Rows(one).take(np.array([2, 0])) == ["c", "a"]


def test_fingerprint_mismatch_names_both(tmp_path):
    path = build_index(HashEncoder(fp="sha256:aaa"), ["a caption"], tmp_path / "i")
    other = HashEncoder(fp="sha256:bbb")
    with pytest.raises(IndexMismatchError, match="sha256:aaa") as err:
        KnowledgeIndex.load(path, other)
    assert "sha256:bbb" in str(err.value)
    assert isinstance(err.value, ValueError)  # callers catching ValueError keep working
    with pytest.raises(IndexMismatchError, match="sha256:bbb"):
        KnowledgeIndex.load(path, "sha256:bbb")
    with pytest.raises(IndexMismatchError, match="dim"):
        KnowledgeIndex.load(path, HashEncoder(dim=16, fp="sha256:aaa"))
    assert len(KnowledgeIndex.load(path, HashEncoder(fp="sha256:aaa"))) == 1


def test_fewer_hits_than_k_and_no_minus_one(tmp_path):
    enc = HashEncoder()
    small = KnowledgeIndex.load(build_index(enc, ["one", "two", "three"], tmp_path / "s"))
    [r] = small.search(enc.embed_texts(["two"])[0], 10)
    assert len(r) == 3 and r.captions[0] == "two" and sorted(r.ids) == [0, 1, 2]
    # IVF with nprobe=1 visits one list: fewer than k hits, never -1 ids
    x = clustered(400, 16, n_clusters=8)
    ivf = KnowledgeIndex.load(build_arrays(tmp_path, x, factory="IVF8,Flat"), nprobe=1)
    for r in ivf.search(unit_rows(20, 16, seed=5), 200):
        assert 0 < len(r) < 200
        assert all(isinstance(i, int) and 0 <= i < 400 for i in r.ids)
        assert len(r.scores) == len(r.captions) == len(r.ids)


def test_bad_queries_raise_clear_errors(flat_data):
    x, q, _, path = flat_data
    index = KnowledgeIndex.load(path)
    with pytest.raises(ValueError, match=r"\(n, 32\).*\(5, 16\)"):
        index.search(np.zeros((5, 16), np.float32), 3)
    with pytest.raises(ValueError, match=r"\(2, 3, 32\)"):
        index.search(np.zeros((2, 3, 32), np.float32), 3)
    with pytest.raises(TypeError, match="int64"):
        index.search(np.zeros((2, 32), np.int64), 3)
    with pytest.raises(TypeError):
        index.search(np.array([[object()] * 32]), 3)
    with pytest.raises(TypeError):
        index.search("a red circle", 3)
    for k in (0, -1):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            index.search(q, k)
    with pytest.raises(TypeError, match="k must be"):
        index.search(q, 2.5)
    bad = q.copy()
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        index.search(bad, 3)
    # float64 and 1-D queries are accepted
    assert index.search(q.astype(np.float64), 3) == index.search(q, 3)
    [single] = index.search(q[0], 3)
    assert single == index.search(q[:1], 3)[0]
    assert index.search(np.zeros((0, 32), np.float32), 3) == []


def test_add_then_search_and_persisted(tmp_path):
    enc = HashEncoder()
    path = build_index(enc, [f"old {i}" for i in range(300)], tmp_path / "a", factory="HNSW16")
    index = KnowledgeIndex.load(path, enc)
    assert index.memory_mapped
    assert index.add(["a purple triangle", "old 5", "a yellow star"], show_progress=False) == 2
    assert len(index) == 302 and index.memory_mapped  # re-mapped after the atomic save
    [r] = index.search(enc.embed_texts(["a yellow star"]), 1)
    assert r.captions == ["a yellow star"] and r.ids == [301]
    reloaded = KnowledgeIndex.load(path, enc)
    assert len(reloaded) == 302
    assert reloaded.manifest["dedupe"]["removed"] == 1 and reloaded.manifest["updated"]
    assert np.load(path / "embeddings.npy").shape == (302, 32)
    [r] = reloaded.search(enc.embed_texts(["a purple triangle"]), 1)
    assert r.ids == [300]
    with pytest.raises(ValueError, match="already in the index"):
        reloaded.add(["brand new"], ids=[7])
    with pytest.raises(ValueError, match="needs the retriever"):
        KnowledgeIndex.load(path).add(["x"])


def test_add_to_ivf_embeddings_without_save(tmp_path):
    x = clustered(2000, 16, n_clusters=20)
    index = KnowledgeIndex.load(build_arrays(tmp_path, x, factory="IVF16,Flat", dedupe=True))
    new = unit_rows(2, 16, seed=9)
    assert index.add_embeddings(new, ["n1", "n2"], ids=[5000, 5001], save=False) == 2
    [r1, r2] = index.search(new, 1)
    assert (r1.ids, r2.ids, r1.captions) == ([5000], [5001], ["n1"])
    assert len(KnowledgeIndex.load(index.path)) == 2000  # not saved


def test_search_params_override(tmp_path):
    x = clustered(2000, 16, n_clusters=20)
    path = build_arrays(tmp_path, x, factory="IVF16,Flat")
    assert KnowledgeIndex.load(path, nprobe=3).search_params == {"nprobe": 3}
    with pytest.raises(ValueError, match="efSearch"):
        KnowledgeIndex.load(path, ef_search=64)
    index = KnowledgeIndex.load(path)
    index.set_search_params(nprobe=16)
    exact = brute_force(x[:5], x, 5)[1]
    assert [r.ids for r in index.search(x[:5], 5)] == exact.tolist()
