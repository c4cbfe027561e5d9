"""The index folder format (rvqa.retriever.index.format): manifest, atomic writes,
checks on load, and folders written by earlier rvqa versions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rvqa.retriever.index import (
    IndexFormatError,
    KnowledgeIndex,
    build_index,
)
from rvqa.retriever.index import format as index_format
from tests.index_helpers import (
    HashEncoder,
    build_arrays,
    make_clustered_data,
    unit_rows,
)


@pytest.fixture(scope="module")
def clustered_data():
    return make_clustered_data()


def test_manifest_contents(tmp_path):
    enc = HashEncoder()
    path = build_index(enc, ["a red circle", "a blue square"], tmp_path / "m", caption_source="t")
    m = json.loads((path / "manifest.json").read_text())
    assert m["format_version"] == 1
    assert m["retriever_fingerprint"] == enc.fingerprint()
    assert m["embed_dim"] == 32 and m["metric"] == "inner_product" and m["normalized"] is True
    assert m["count"] == 2 and m["caption_source"] == "t" and m["created"].endswith("+00:00")
    assert m["embeddings"] == {"file": "embeddings.npy", "dtype": "float16"}
    assert m["files"]["index.faiss"]["bytes"] == (path / "index.faiss").stat().st_size
    assert len(m["files"]["index.faiss"]["sha256"]) == 64
    assert any(f.startswith("captions/") and f.endswith(".arrow") for f in m["files"])
    assert np.load(path / "embeddings.npy").dtype == np.float16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp folders left


def test_roundtrip_mmap_and_save_as(tmp_path, clustered_data):
    x, q, _ = clustered_data
    path = build_arrays(tmp_path, x[:3000], factory="HNSW32")
    mapped = KnowledgeIndex.load(path, mmap=True)
    in_memory = KnowledgeIndex.load(path, mmap=False)
    assert mapped.memory_mapped and not in_memory.memory_mapped
    ref = mapped.search(q, 7)
    assert ref == in_memory.search(q, 7)
    copy_path = mapped.save(tmp_path / "copy")
    assert mapped.path == copy_path
    reloaded = KnowledgeIndex.load(copy_path)
    assert [(r.ids, r.scores, r.captions) for r in reloaded.search(q, 7)] == [
        (r.ids, r.scores, r.captions) for r in ref
    ]


def test_interrupted_build_leaves_previous_folder(tmp_path, monkeypatch):
    enc = HashEncoder()
    out = tmp_path / "idx"
    build_index(enc, ["old caption one", "old caption two"], out)

    def crash(*args, **kwargs):
        raise RuntimeError("disk full (simulated)")

    # index.faiss is already written when the captions store fails
    monkeypatch.setattr(index_format, "write_captions", crash)
    with pytest.raises(RuntimeError, match="simulated"):
        build_index(enc, ["new caption"], out, overwrite=True)
    with pytest.raises(RuntimeError, match="simulated"):
        build_index(enc, ["new caption"], tmp_path / "fresh")
    monkeypatch.undo()

    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # temp folders cleaned up
    old = KnowledgeIndex.load(out, enc)
    assert len(old) == 2
    assert old.search(enc.embed_texts(["old caption two"]), 1)[0].captions == ["old caption two"]


def test_overwrite_requires_flag(tmp_path):
    enc = HashEncoder()
    out = build_index(enc, ["first"], tmp_path / "idx")
    with pytest.raises(FileExistsError, match="--overwrite"):
        build_index(enc, ["second"], out)
    build_index(enc, ["second", "third"], out, overwrite=True)
    assert len(KnowledgeIndex.load(out)) == 2
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("precious")
    with pytest.raises(ValueError, match="not a knowledge index"):
        build_index(enc, ["x"], tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "precious"


def _edit_manifest(path: Path, **changes) -> None:
    m = json.loads((path / "manifest.json").read_text())
    m.update(changes)
    (path / "manifest.json").write_text(json.dumps(m))


def test_newer_format_version_refused(tmp_path):
    path = build_index(HashEncoder(), ["a caption"], tmp_path / "i")
    _edit_manifest(path, format_version=2)
    with pytest.raises(IndexFormatError, match="upgrade rvqa"):
        KnowledgeIndex.load(path)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        KnowledgeIndex.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        KnowledgeIndex.load(tmp_path / "empty")
    path = build_index(HashEncoder(), ["a caption"], tmp_path / "i")
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(IndexFormatError, match="malformed manifest"):
        KnowledgeIndex.load(path)
    path = build_index(HashEncoder(), ["a caption"], tmp_path / "j")
    _edit_manifest(path, embed_dim="32")
    with pytest.raises(IndexFormatError, match="embed_dim"):
        KnowledgeIndex.load(path)
    path = build_index(HashEncoder(), ["a caption"], tmp_path / "k")
    (path / "index.faiss").unlink()
    with pytest.raises(FileNotFoundError, match="index.faiss"):
        KnowledgeIndex.load(path)


def test_truncated_or_modified_index_file_detected(tmp_path):
    path = build_arrays(tmp_path, unit_rows(500, 16))
    f = path / "index.faiss"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(IndexFormatError, match="index.faiss.*truncated"):
        KnowledgeIndex.load(path)
    f.write_bytes(data[:-4] + b"\0\0\0\1")  # same size, other bytes
    KnowledgeIndex.load(path)  # sizes only by default
    with pytest.raises(IndexFormatError, match="index.faiss.*sha256"):
        KnowledgeIndex.load(path, verify=True)
    garbage = b"\xff" * len(data)
    f.write_bytes(garbage)
    with pytest.raises(IndexFormatError, match="index.faiss.*corrupted"):
        KnowledgeIndex.load(path)
