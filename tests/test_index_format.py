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
    index_info,
    rebuild_index,
)
from rvqa.retriever.index import format as index_format
from tests.index_helpers import (
    HashEncoder,
    build_arrays,
    unit_rows,
)


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


def _write_pre_restructure_folder(folder: Path, x: np.ndarray, captions: list[str]) -> None:
    """An index folder as rvqa 0.1.0 wrote it before ``rvqa.retriever.index`` became a
    package (``retriever/index_format.py``'s ``write_index_folder``), spelled out with
    faiss, ``datasets``, numpy and json only, so that no current rvqa code writes it."""
    import hashlib

    import faiss
    from datasets import Dataset, Features, Value

    folder.mkdir()
    index = faiss.index_factory(x.shape[1], "Flat", faiss.METRIC_INNER_PRODUCT)
    index.add(x)
    faiss.write_index(index, str(folder / "index.faiss"))
    features = Features({"caption": Value("string"), "id": Value("int64")})
    ids = list(range(100, 100 + len(captions)))
    Dataset.from_dict({"caption": captions, "id": ids}, features=features).save_to_disk(
        str(folder / "captions")
    )
    np.save(folder / "embeddings.npy", x.astype(np.float16), allow_pickle=False)
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            files[p.relative_to(folder).as_posix()] = {
                "bytes": p.stat().st_size,
                "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
            }
    manifest = {
        "format_version": 1,
        "rvqa_version": "0.1.0",
        "created": "2026-11-20T10:00:00+00:00",
        "updated": None,
        "retriever_fingerprint": "sha256:fake-retriever",
        "embed_dim": int(x.shape[1]),
        "metric": "inner_product",
        "normalized": True,
        "factory": "Flat",
        "auto_choice": {
            "factory": "Flat",
            "reason": "exact search: 50 vectors <= 100000 and ~0 MB fits 4 GB",
            "estimated_bytes": 7040,
            "max_memory_bytes": 4000000000,
        },
        "count": len(captions),
        "caption_source": "jsonl:old.jsonl",
        "id_type": "int",
        "build_params": {},
        "search_params": {},
        "search_tuning": None,
        "dedupe": {"enabled": True, "input_count": len(captions), "removed": 0},
        "embeddings": {"file": "embeddings.npy", "dtype": "float16"},
        "files": files,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def test_folder_written_before_the_package_split_still_loads(tmp_path):
    """On-disk format unchanged: a folder in the pre-restructure layout loads, searches
    like numpy brute force, verifies, reports, rebuilds and accepts additions; the
    rvqa version it records (older than this one) plays no part in loading."""
    x = unit_rows(50, 32, seed=3)
    captions = [f"old caption {i}" for i in range(50)]
    old = tmp_path / "old-index"
    _write_pre_restructure_folder(old, x, captions)

    index = KnowledgeIndex.load(old, "sha256:fake-retriever", verify=True)
    assert len(index) == 50 and index.factory == "Flat" and index.embed_dim == 32
    q = unit_rows(5, 32, seed=4)
    truth = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :3]
    for r, rows in zip(index.search(q, 3), truth):
        assert r.ids == [100 + int(i) for i in rows]
        assert r.captions == [captions[int(i)] for i in rows]
    assert index.lookup([0, 49]) == ([100, 149], ["old caption 0", "old caption 49"])

    report = index_info(old)
    assert "written by rvqa 0.1.0" in report
    assert "3/3 captions find themselves at rank 1 (stored embeddings)" in report

    rebuilt = KnowledgeIndex.load(rebuild_index(old, tmp_path / "rebuilt", "Flat"))
    assert rebuilt.search(q, 3)[0].ids == index.search(q, 3)[0].ids
    assert rebuilt.manifest["caption_source"] == "jsonl:old.jsonl"

    index.add_embeddings(unit_rows(1, 32, seed=5), ["a new caption"])
    again = KnowledgeIndex.load(old)
    assert len(again) == 51 and again.lookup([50]) == ([150], ["a new caption"])
    assert again.manifest["created"] == "2026-11-20T10:00:00+00:00"


def test_old_manifest_without_optional_keys_loads(tmp_path):
    """Only the required manifest keys are needed to load and search."""
    x = unit_rows(20, 16, seed=6)
    old = tmp_path / "minimal"
    _write_pre_restructure_folder(old, x, [f"c{i}" for i in range(20)])
    manifest = json.loads((old / "manifest.json").read_text())
    required = ("format_version", "retriever_fingerprint", "embed_dim", "metric", "factory")
    minimal = {k: manifest[k] for k in (*required, "count", "search_params", "files")}
    (old / "manifest.json").write_text(json.dumps(minimal))
    index = KnowledgeIndex.load(old)
    assert index.search(x[7], 1)[0].ids == [107]
    assert "written by rvqa ?" in index_info(old)
