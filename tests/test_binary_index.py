"""Binary knowledge indices: a hashing retriever's codes in faiss binary indices (Hamming)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rvqa.errors import IndexMismatchError, UsageError
from rvqa.retriever.index import (
    IndexRegistry,
    KnowledgeIndex,
    build_index,
    build_index_from_embeddings,
    rebuild_index,
)
from rvqa.retriever.index.faiss_ops import pack_codes, unpack_codes
from rvqa.retriever.index.info import index_info
from tests.test_retriever_model import tiny_retriever
from tests.tiny import draw_shape

CAPTIONS = [
    f"a {size} {color} {shape}"
    for size in ("small", "large")
    for color in ("red", "green", "blue", "yellow")
    for shape in ("circle", "square", "triangle")
]


@pytest.fixture(scope="module")
def hasher():
    model = tiny_retriever(loss="hash", hash_bits=16)
    model.eval()
    return model


def _hamming_topk(q: np.ndarray, codes: np.ndarray, k: int):
    """Brute force: Hamming distance of ±1 rows, ties by row number."""
    d = (q[:, None, :] != codes[None, :, :]).sum(-1)
    rows = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, rows, axis=1), rows


def test_pack_unpack_round_trip():
    rng = np.random.default_rng(0)
    x = np.where(rng.random((5, 24)) > 0.5, 1.0, -1.0).astype(np.float32)
    packed = pack_codes(x)
    assert packed.shape == (5, 3) and packed.dtype == np.uint8
    np.testing.assert_array_equal(unpack_codes(packed, 24), x)


def test_build_search_mmap_and_info(tmp_path, hasher):
    out = build_index(hasher, CAPTIONS, tmp_path / "bin", show_progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metric"] == "hamming" and manifest["embed_dim"] == 16
    assert manifest["factory"] == "BFlat" and manifest["embeddings"]["dtype"] == "packed_bits"
    # the codes take bits / 8 bytes a caption (+ faiss' header)
    assert manifest["files"]["index.faiss"]["bytes"] < 2 * len(CAPTIONS) + 200
    index = KnowledgeIndex.load(out, hasher)
    assert index.memory_mapped and index.metric == "hamming"
    images = [draw_shape(c, s) for c, s in (("red", "circle"), ("blue", "square"))]
    q = hasher.embed_images(images)
    codes = hasher.embed_texts(CAPTIONS)
    dist, rows = _hamming_topk(q, codes, 5)
    scores, got_rows = index.search_rows(q, 5)
    np.testing.assert_array_equal(got_rows, rows)
    np.testing.assert_allclose(scores, 1 - 2 * dist / 16)
    hits = index.search_images(images, 3)
    assert hits[0].captions == [CAPTIONS[r] for r in rows[0, :3]]
    report = index_info(out, hasher)
    assert "16-bit binary codes, Hamming distance" in report
    assert "3/3 captions find themselves at rank 1" in report


def test_rebuild_with_other_binary_factories_and_add(tmp_path, hasher):
    rng = np.random.default_rng(1)
    n = 400
    codes = np.where(rng.random((n, 32)) > 0.5, 1.0, -1.0).astype(np.float32)
    texts = [f"caption {i}" for i in range(n)]
    flat = build_index_from_embeddings(
        codes, texts, None, tmp_path / "flat", "sha256:x", metric="hamming", show_progress=False
    )
    q = codes[:20].copy()
    q[:, :3] *= -1  # near, not equal, to their rows
    want_d, _ = _hamming_topk(q, codes, 10)
    for factory in ("BHNSW16", "BIVF4"):
        out = rebuild_index(flat, tmp_path / factory, factory, show_progress=False)
        m = json.loads((out / "manifest.json").read_text())
        assert m["factory"] == factory and m["metric"] == "hamming"
        assert m["search_params"] == ({"efSearch": 128} if "HNSW" in factory else {"nprobe": 16})
        index = KnowledgeIndex.load(out)
        scores, rows = index.search_rows(q, 10)
        got_d = (1 - scores) * 32 / 2
        # approximate indices: the nearest distance is found for most queries
        assert np.mean(np.isclose(got_d[:, 0], want_d[:, 0])) >= 0.8
    # add to a binary index: the new captions are found by their own codes, after a reload
    index = KnowledgeIndex.load(flat)
    new = np.where(rng.random((3, 32)) > 0.5, 1.0, -1.0).astype(np.float32)
    assert index.add_embeddings(new, ["new a", "new b", "new c"]) == 3
    again = KnowledgeIndex.load(flat)
    assert len(again) == n + 3
    hit = again.search(new[1], 1)[0]
    assert hit.captions == ["new b"] and hit.scores == [1.0]
    np.testing.assert_array_equal(again.leading_vectors(4)[0], codes[:4])


def test_kinds_do_not_mix(tmp_path, hasher):
    floats = tiny_retriever(loss="infonce")
    with pytest.raises(UsageError, match="'Flat' is a float index, but a hashing retriever"):
        build_index(hasher, CAPTIONS, tmp_path / "a", factory="Flat", show_progress=False)
    with pytest.raises(UsageError, match="'BFlat' is a binary .* float vectors"):
        build_index(floats, CAPTIONS, tmp_path / "b", factory="BFlat", show_progress=False)
    with pytest.raises(ValueError, match="binary codes must be ±1"):
        build_index_from_embeddings(
            np.full((2, 16), 0.5, np.float32),
            ["x", "y"],
            None,
            tmp_path / "c",
            "f",
            metric="hamming",
        )
    b = build_index(hasher, CAPTIONS, tmp_path / "bin", show_progress=False)
    f = build_index(floats, CAPTIONS, tmp_path / "float", show_progress=False)
    reg = IndexRegistry()
    reg.load(b, "codes")
    reg.load(f, "cosine")
    with pytest.raises(IndexMismatchError, match="cannot merge the results of binary .* and float"):
        reg.search(np.ones(16, np.float32), 3, names=["codes", "cosine"])
    # a float index built with the hashing retriever's fingerprint: the metric is checked too
    x = floats.embed_texts(CAPTIONS[:4])
    odd = build_index_from_embeddings(
        np.pad(x, ((0, 0), (0, 0))), CAPTIONS[:4], None, tmp_path / "odd", hasher.fingerprint()
    )
    with pytest.raises(IndexMismatchError, match="is a inner_product index, but the retriever"):
        KnowledgeIndex.load(odd, hasher)


def test_registry_swaps_binary_indices(tmp_path, hasher):
    a = build_index(hasher, CAPTIONS[:12], tmp_path / "a", show_progress=False)
    b = build_index(hasher, CAPTIONS[12:], tmp_path / "b", show_progress=False)
    reg = IndexRegistry()
    reg.load(a, "kb", hasher)
    q = hasher.embed_texts(["a large blue square"])
    before = reg.search(q, 3, names="kb")[0].captions
    assert set(before) <= set(CAPTIONS[:12])
    reg.swap("kb", KnowledgeIndex.load(b, hasher))
    after = reg.search(q, 3, names="kb")[0].captions
    assert set(after) <= set(CAPTIONS[12:])


# ----------------------------------------------------------------------------- PCME


@pytest.fixture(scope="module")
def pcme():
    model = tiny_retriever(loss="pcme")
    with torch.no_grad():  # distinct variances per caption (the fresh head gives ~equal ones)
        model.text_logsigma.weight.normal_(0, 0.5)
        model.vision_logsigma.weight.normal_(0, 0.5)
    model.eval()
    return model


def test_probabilistic_index_stores_variances(tmp_path, pcme):
    out = build_index(pcme, CAPTIONS, tmp_path / "p", show_progress=False)
    m = json.loads((out / "manifest.json").read_text())
    assert m["uncertainty"]["file"] == "logsigma.npy" and "logsigma.npy" in m["files"]
    emb, sig = pcme.embed_texts(CAPTIONS, return_logsigma=True)
    np.testing.assert_allclose(np.load(out / "logsigma.npy"), sig, rtol=1e-3)  # float16
    index = KnowledgeIndex.load(out, pcme)
    res = index.search(emb[:2], 4)
    want = np.exp(2 * np.load(out / "logsigma.npy").astype(np.float32).mean(1))
    for r in res:
        rows = [CAPTIONS.index(c) for c in r.captions]
        np.testing.assert_allclose(r.uncertainties, want[rows], rtol=1e-6)
        assert [h.uncertainty for h in r.hits] == r.uncertainties
    assert len(set(np.round(want, 6))) > 1  # the captions differ in uncertainty
    # add (encodes the new captions' variances) and rebuild keep them row by row
    index.add(["a tiny purple star"], show_progress=False)
    again = KnowledgeIndex.load(out, pcme)
    hit = again.search(pcme.embed_texts(["a tiny purple star"]), 1)[0]
    _, s_new = pcme.embed_texts(["a tiny purple star"], return_logsigma=True)
    assert hit.captions == ["a tiny purple star"]
    assert hit.uncertainties[0] == pytest.approx(float(np.exp(2 * s_new.mean())), rel=1e-2)
    rebuilt = rebuild_index(out, tmp_path / "hnsw", "HNSW8", show_progress=False)
    np.testing.assert_array_equal(np.load(rebuilt / "logsigma.npy"), np.load(out / "logsigma.npy"))
    with pytest.raises(UsageError, match="pass logsigma= for the new captions"):
        again.add_embeddings(emb[:1], ["another"])


def test_rvqa_reports_query_and_caption_uncertainty(tmp_path, tiny_run, pcme):
    from rvqa import RVQA

    base = RVQA.from_pretrained(tiny_run, device="cpu")
    out = build_index(pcme, CAPTIONS, tmp_path / "p", show_progress=False)
    model = RVQA(pcme, base.reader, base.processor, device="cpu")
    model.load_index(out, "shapes")
    image = draw_shape("green", "circle")
    ans = model.answer(image, "what shape is it?", top_k=2)
    _, sig = pcme.embed_images([image], return_logsigma=True)
    assert ans.uncertainty == pytest.approx(float(np.exp(2 * sig.mean())), rel=1e-5)
    assert all(e.uncertainty is not None and e.uncertainty > 0 for e in ans.evidence)
    d = ans.to_dict()
    assert d["uncertainty"] == ans.uncertainty
    assert [e["uncertainty"] for e in d["evidence"]] == [e.uncertainty for e in ans.evidence]
    # a float retriever's answers carry none
    plain = base.answer(image, "what shape is it?")
    assert plain.uncertainty is None and all(e.uncertainty is None for e in plain.evidence)
