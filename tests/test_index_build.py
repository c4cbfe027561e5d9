"""Build entry points (rvqa.retriever.index.build): tuning on the corpus tail,
rebuilds from stored embeddings, IndexBuildOptions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rvqa.retriever.index import (
    IndexBuildOptions,
    KnowledgeIndex,
    build_index,
    build_index_from_embeddings,
    knn_recall,
    rebuild_index,
)
from tests.index_helpers import (
    HashEncoder,
    build_arrays,
    unit_rows,
)


@pytest.mark.parametrize(
    "factory, override", [("IVF64,Flat", {"nprobe": 64}), ("HNSW8", {"ef_search": 256})]
)
def test_build_tunes_on_corpus_tail_before_adding_it(
    tmp_path, clustered_data, monkeypatch, factory, override
):
    """A build without tuning queries holds out its last min(200, N/10) vectors from
    training and from the index while it tunes, then adds them: the index holds every
    caption at its own row."""
    import rvqa.retriever.index.build as ib

    x, _, _ = clustered_data
    m = min(200, len(x) // 10)
    seen = {}
    train, tune = ib.train_index, ib.tune_search_params

    def spy_train(index, xs, **kw):
        seen.setdefault("train_rows", len(xs))
        return train(index, xs, **kw)

    def spy_tune(index, xb, **kw):
        seen.update(ntotal=index.ntotal, xb=len(xb), held_out=kw["held_out"].copy())
        return tune(index, xb, **kw)

    monkeypatch.setattr(ib, "train_index", spy_train)
    monkeypatch.setattr(ib, "tune_search_params", spy_tune)
    path = build_arrays(tmp_path, x, factory=factory, store_embeddings=False)
    if factory.startswith("IVF"):
        assert seen.pop("train_rows") == len(x) - m
    assert seen["ntotal"] == seen["xb"] == len(x) - m
    np.testing.assert_array_equal(seen["held_out"], x[-m:])
    index = KnowledgeIndex.load(path, **override)
    tuning = index.manifest["search_tuning"]
    assert set(tuning["proxies"]) == {"noise", "held_out"}
    assert f"the corpus' last {m} vectors, searched before they were added" in tuning["query_proxy"]
    assert "duplicates" not in tuning["query_proxy"]
    assert len(index) == len(x)
    top = [r.ids[0] for r in index.search(x[-m - 5 :], 1)]
    assert top == list(range(len(x) - m - 5, len(x)))


def test_rebuild_flat_equals_fresh_build(tmp_path, flat_data):
    x, q, _, path = flat_data
    again = rebuild_index(path, tmp_path / "rebuilt", "Flat", show_progress=False)
    a, b = KnowledgeIndex.load(path), KnowledgeIndex.load(again)
    assert [(r.ids, r.scores, r.captions) for r in a.search(q, 10)] == [
        (r.ids, r.scores, r.captions) for r in b.search(q, 10)
    ]
    ma, mb = a.manifest, b.manifest
    for key in ("retriever_fingerprint", "count", "embed_dim", "dedupe"):
        assert ma[key] == mb[key]


def test_rebuild_from_float16_with_another_factory(tmp_path, clustered_data):
    x, q, _ = clustered_data
    path = build_arrays(tmp_path, x[:4000], name="flat")  # float16 embeddings
    hnsw = rebuild_index(path, tmp_path / "hnsw", "HNSW32", show_progress=False)
    flat, approx = KnowledgeIndex.load(path), KnowledgeIndex.load(hnsw)
    assert approx.factory == "HNSW32" and "efSearch" in approx.search_params
    exact = flat.search(q, 10)
    found = np.array([r.ids for r in approx.search(q, 10)])
    assert knn_recall(found, np.array([r.ids for r in exact])) >= 0.95
    # in place, back to Flat: float16 rounding moves scores by < 1e-2 only
    rebuild_index(hnsw, hnsw, "Flat", overwrite=True, show_progress=False)
    again = KnowledgeIndex.load(hnsw).search(q, 10)
    for r, e in zip(again, exact):
        np.testing.assert_allclose(r.scores, e.scores, atol=1e-2)
    no_emb = build_arrays(tmp_path, x[:100], name="noemb", store_embeddings=False)
    with pytest.raises(ValueError, match="no stored embeddings"):
        rebuild_index(no_emb, tmp_path / "x", "Flat")


def test_build_options_object_equals_keywords(tmp_path):
    """An IndexBuildOptions object and the same fields as keywords build the same folder;
    keywords override the object's fields."""
    x = unit_rows(600, 16, seed=2)
    caps = [f"c{i}" for i in range(len(x))]
    opts = IndexBuildOptions(
        factory="HNSW16", ef_construction=48, embeddings_dtype="float32", show_progress=False
    )
    a = build_index_from_embeddings(x, caps, None, tmp_path / "a", "fp", opts)
    b = build_index_from_embeddings(
        x,
        caps,
        None,
        tmp_path / "b",
        "fp",
        factory="HNSW16",
        ef_construction=48,
        embeddings_dtype="float32",
        show_progress=False,
    )
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    for key in ("factory", "build_params", "embeddings", "count"):
        assert ma[key] == mb[key]
    assert ma["build_params"] == {"efConstruction": 48}
    assert ma["embeddings"] == {"file": "embeddings.npy", "dtype": "float32"}
    assert (a / "embeddings.npy").read_bytes() == (b / "embeddings.npy").read_bytes()
    c = build_index_from_embeddings(x, caps, None, tmp_path / "c", "fp", opts, factory="Flat")
    assert json.loads((c / "manifest.json").read_text())["factory"] == "Flat"
    assert opts.factory == "HNSW16"  # the object itself is not changed
    enc = HashEncoder(dim=16)
    d = build_index(enc, caps, tmp_path / "d", opts, max_memory="1GB")
    assert json.loads((d / "manifest.json").read_text())["build_params"] == {"efConstruction": 48}


def test_build_options_bad_values(tmp_path):
    with pytest.raises(TypeError, match="unknown index build option.*efsearch.*ef_construction"):
        build_arrays(tmp_path, unit_rows(10, 8), efsearch=64)
    with pytest.raises(ValueError, match="embeddings_dtype must be 'float16' or 'float32'"):
        IndexBuildOptions(embeddings_dtype="int8")
    with pytest.raises(ValueError, match="max_memory 'lots' is not a size"):
        IndexBuildOptions(max_memory="lots")
    with pytest.raises(TypeError, match="options must be an IndexBuildOptions"):
        build_index_from_embeddings(unit_rows(3, 8), ["a", "b", "c"], None, tmp_path, "fp", {})
    assert not any(tmp_path.iterdir())
