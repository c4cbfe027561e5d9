"""Automatic factory choice (rvqa.retriever.index.factory) and faiss construction
(rvqa.retriever.index.faiss_ops)."""

from __future__ import annotations

import json

import faiss
import pytest

from rvqa.retriever.index import (
    FLAT_MAX_VECTORS,
    HNSW_EF_CONSTRUCTION,
    KnowledgeIndex,
    auto_nlist,
    build_index,
    choose_factory,
    make_index,
    parse_memory,
    rebuild_index,
)
from tests.index_helpers import (
    HashEncoder,
    build_arrays,
    unit_rows,
)


def test_automatic_choice_thresholds():
    assert choose_factory(FLAT_MAX_VECTORS, 384, "4GB").factory == "Flat"
    assert choose_factory(FLAT_MAX_VECTORS + 1, 384, "4GB").factory == "HNSW32"
    assert choose_factory(2_000_000, 384, "4GB").factory == "HNSW32"
    sq = choose_factory(5_000_000, 384, "4GB")
    assert sq.factory == f"IVF{auto_nlist(5_000_000)},SQ8" == "IVF8192,SQ8"
    pq = choose_factory(30_000_000, 384, "4GB")
    assert pq.factory == "IVF16384,PQ96np" and pq.estimated_bytes <= 4e9
    assert "fits" in pq.reason
    assert choose_factory(50_000, 384, "10MB").factory.startswith("IVF")  # budget over size
    with pytest.raises(ValueError, match="max_memory"):
        choose_factory(10**9, 384, "1MB")
    assert auto_nlist(1000) * 39 <= 1000


def test_automatic_choice_for_gpu_search_skips_hnsw():
    """faiss has no GPU HNSW: an index meant for GPU search gets an IVF tier instead."""
    gpu = choose_factory(2_000_000, 384, "4GB", for_gpu=True)
    assert gpu.factory == f"IVF{auto_nlist(2_000_000)},SQ8"
    assert "no faiss GPU version" in gpu.reason
    assert choose_factory(FLAT_MAX_VECTORS, 384, "4GB", for_gpu=True).factory == "Flat"
    assert choose_factory(30_000_000, 384, "4GB", for_gpu=True).factory == "IVF16384,PQ96np"


def test_parse_memory():
    assert parse_memory("4GB") == 4 * 10**9
    assert parse_memory("512MiB") == 512 * 2**20
    assert parse_memory("1.5G") == 1_500_000_000
    assert parse_memory(1234) == 1234
    for bad in ("lots", "-1GB", "0"):
        with pytest.raises(ValueError):
            parse_memory(bad)


def test_automatic_choice_recorded(tmp_path):
    path = build_index(HashEncoder(), [f"a caption {i}" for i in range(50)], tmp_path / "auto")
    m = KnowledgeIndex.load(path).manifest
    assert m["factory"] == "Flat"
    assert "exact search" in m["auto_choice"]["reason"]
    assert m["search_params"] == {} and m["search_tuning"] is None


def test_hnsw_ef_construction_set_and_recorded(tmp_path):
    x = unit_rows(2000, 16, seed=0)
    path = build_arrays(tmp_path, x, factory="HNSW16")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["build_params"] == {"efConstruction": HNSW_EF_CONSTRUCTION}
    graph = faiss.downcast_index(faiss.read_index(str(path / "index.faiss"))).hnsw
    assert graph.efConstruction == HNSW_EF_CONSTRUCTION
    ivf = make_index("IVF16_HNSW8,Flat", 16, ef_construction=77)
    quantizer = faiss.downcast_index(faiss.extract_index_ivf(ivf).quantizer)
    assert quantizer.hnsw.efConstruction == 77
    assert (
        faiss.downcast_index(make_index("HNSW8", 16, ef_construction=None)).hnsw.efConstruction
        == 40
    )
    flat = json.loads((build_arrays(tmp_path, x, name="f") / "manifest.json").read_text())
    assert flat["build_params"] == {}
    low = build_arrays(tmp_path, x, name="low", factory="HNSW16", ef_construction=24)
    assert json.loads((low / "manifest.json").read_text())["build_params"] == {"efConstruction": 24}
    rebuilt = rebuild_index(low, tmp_path / "re", "HNSW16", ef_construction=64)
    assert (
        faiss.downcast_index(faiss.read_index(str(rebuilt / "index.faiss"))).hnsw.efConstruction
        == 64
    )
    for bad in (0, -3, 2.5, "40", True):
        with pytest.raises(ValueError, match="ef_construction must be an integer ≥ 1"):
            build_arrays(tmp_path, x, name="bad", factory="HNSW16", ef_construction=bad)
    assert not (tmp_path / "bad").exists()


@pytest.fixture
def blas_threshold():
    """faiss' process-wide BLAS threshold, restored after the test."""
    saved = faiss.cvar.distance_compute_blas_threshold
    yield
    faiss.cvar.distance_compute_blas_threshold = saved


def test_flat_batches_use_blas_unless_told_otherwise(blas_threshold, monkeypatch, caplog):
    """Over faiss' default rvqa sets its threshold; RVQA_FAISS_BLAS_THRESHOLD sets
    another (even over a value set before) or keeps faiss'; without it a value someone
    else set stays; a bad value is named and ignored."""
    from rvqa.retriever.index import faiss_ops as ops

    assert ops.FLAT_BLAS_THRESHOLD == 2048
    cases = [
        (None, ops.FAISS_BLAS_THRESHOLD, 2048),
        ("4096", ops.FAISS_BLAS_THRESHOLD, 4096),
        ("0", 50, 0),  # an explicit value wins over one set before
        ("faiss", ops.FAISS_BLAS_THRESHOLD, ops.FAISS_BLAS_THRESHOLD),
        (None, 50, 50),  # the caller's own value stays
        ("-3", ops.FAISS_BLAS_THRESHOLD, 2048),
        ("3000000000", ops.FAISS_BLAS_THRESHOLD, 2048),  # beyond faiss' int: ignored
        ("many", 50, 50),
    ]
    for env, before, want in cases:
        faiss.cvar.distance_compute_blas_threshold = before
        if env is None:
            monkeypatch.delenv("RVQA_FAISS_BLAS_THRESHOLD", raising=False)
        else:
            monkeypatch.setenv("RVQA_FAISS_BLAS_THRESHOLD", env)
        assert ops.apply_blas_threshold() == want, (env, before)
        assert faiss.cvar.distance_compute_blas_threshold == want
    for bad in ("'-3'", "'3000000000'", "'many'"):
        assert f"RVQA_FAISS_BLAS_THRESHOLD={bad} is not 'faiss' or an integer" in caplog.text


def test_flat_search_agrees_with_brute_force_on_both_faiss_paths(blas_threshold):
    """A batch of queries searched by per-query scan and by BLAS: the same neighbours
    as numpy, scores within float32 rounding."""
    import numpy as np

    x, q = unit_rows(5000, 64, seed=3), unit_rows(40, 64, seed=4)
    index = make_index("Flat", 64)
    index.add(x)
    want = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :5]
    for threshold in (2**31 - 1, 0):  # every search a scan; every search BLAS
        faiss.cvar.distance_compute_blas_threshold = threshold
        scores, rows = index.search(q, 5)
        np.testing.assert_array_equal(rows, want)
        np.testing.assert_allclose(scores, np.take_along_axis(q @ x.T, want, 1), atol=1e-5)
