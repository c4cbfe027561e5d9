"""IndexRegistry (rvqa.retriever.index.registry): merging, errors, concurrent swaps."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from rvqa.errors import IndexMismatchError, UnknownIndexError
from rvqa.retriever.index import (
    Hit,
    IndexRegistry,
    KnowledgeIndex,
    SearchResult,
    build_index_from_embeddings,
    merge_results,
)
from tests.index_helpers import (
    unit_rows,
)


def _index_from(tmp_path, name, vectors, fp="sha256:fake-retriever") -> KnowledgeIndex:
    caps = [f"{name}-{i}" for i in range(len(vectors))]
    path = build_index_from_embeddings(
        vectors, caps, None, tmp_path / name, fp, factory="Flat", show_progress=False
    )
    return KnowledgeIndex.load(path)


def test_merge_results_orders_by_score_and_tags():
    a = [SearchResult([1, 2], [0.9, 0.5], ["a1", "a2"], ["A", "A"])]
    b = [SearchResult([7, 8], [0.7, 0.5], ["b7", "b8"], ["B", "B"])]
    [m] = merge_results([a, b], 3)
    assert m.scores == [0.9, 0.7, 0.5] and m.ids == [1, 7, 2]  # tie: first index first
    assert m.index_names == ["A", "B", "A"]
    assert m.hits[1] == Hit("b7", 0.7, "B", 7)


def test_registry_search_merge_and_errors(tmp_path):
    q = unit_rows(1, 8, seed=0)

    # index A holds q's near neighbours at cosines 0.9 and 0.5, index B at 0.7 and 0.3
    def near(cos, seed):
        r = unit_rows(1, 8, seed=seed)[0]
        r -= (r @ q[0]) * q[0]
        return cos * q[0] + np.sqrt(1 - cos**2) * r / np.linalg.norm(r)

    a = _index_from(tmp_path, "a", np.stack([near(0.9, 1), near(0.5, 2)]).astype(np.float32))
    b = _index_from(tmp_path, "b", np.stack([near(0.7, 3), near(0.3, 4)]).astype(np.float32))
    reg = IndexRegistry()
    reg.register("wiki", a)
    reg.register("coco", b)
    assert reg.names == ["wiki", "coco"] and "coco" in reg and len(reg) == 2
    [m] = reg.search(q, 3)
    assert m.captions == ["a-0", "b-0", "a-1"]
    assert m.index_names == ["wiki", "coco", "wiki"]
    np.testing.assert_allclose(m.scores, [0.9, 0.7, 0.5], atol=1e-5)
    [only] = reg.search(q, 5, names="coco")
    assert only.captions == ["b-0", "b-1"] and set(only.index_names) == {"coco"}
    assert reg.search(q, 2, names=["coco", "wiki"])[0].captions == ["a-0", "b-0"]
    with pytest.raises(UnknownIndexError) as err:
        reg.search(q, 3, names="nope")
    assert isinstance(err.value, KeyError)
    assert str(err.value) == "no knowledge index named 'nope'; loaded: wiki, coco"
    for method in (reg.get, reg.unload):
        with pytest.raises(UnknownIndexError, match="no knowledge index named 'nope'"):
            method("nope")
    with pytest.raises(ValueError, match="swap"):
        reg.register("wiki", b)
    assert reg.swap("wiki", b) is a and reg.get("wiki") is b
    assert reg.unload("coco") is b and reg.names == ["wiki"]
    other = _index_from(tmp_path, "c", unit_rows(2, 8), fp="sha256:other")
    reg.register("other", other)
    with pytest.raises(IndexMismatchError, match="different retrievers"):
        reg.search(q, 3)
    with pytest.raises(ValueError, match="no knowledge index"):
        IndexRegistry().search(q, 3)
    loaded = IndexRegistry().load(a.path, "again")
    assert loaded.name == "again"


def test_concurrent_search_and_swap(tmp_path):
    x = unit_rows(2000, 16, seed=0)
    a = _index_from(tmp_path, "A", x)
    b = _index_from(tmp_path, "B", x[::-1].copy())
    q = unit_rows(16, 16, seed=2)
    expected = {"A": a.search(q, 5), "B": b.search(q, 5)}
    reg = IndexRegistry()
    reg.register("captions", a)
    errors: list[str] = []
    stop = threading.Event()

    def searcher():
        while not stop.is_set():
            results = reg.search(q, 5, names="captions")
            prefixes = {c.split("-")[0] for r in results for c in r.captions}
            if len(prefixes) != 1:
                errors.append(f"mixed states: {prefixes}")
                return
            want = expected[prefixes.pop()]
            if [r.captions for r in results] != [r.captions for r in want]:
                errors.append("wrong results")
                return

    threads = [threading.Thread(target=searcher) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(200):
        reg.swap("captions", b if i % 2 == 0 else a)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
