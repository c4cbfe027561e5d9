"""Artifacts written before the one-package restructure still load and answer the same.

``tests/fixtures/old_layout_run/`` was written by rvqa at commit fa9cedb (top-level
``retriever``/``reader`` packages) with ``tests/fixtures/make_old_layout_run.py``: a
tiny run folder (retriever, reader, ``rvqa_run.json``) and its knowledge index beside
it, plus ``expected_answers.json``, the answers that code gave.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import easy_vqa
import pytest

from rvqa import RVQA
from rvqa.retriever.index import KnowledgeIndex
from rvqa.retriever.modeling import RetrieverModel

FIXTURE = Path(__file__).parent / "fixtures" / "old_layout_run"


@pytest.fixture()
def old_run(tmp_path) -> Path:
    root = tmp_path / "old"
    shutil.copytree(FIXTURE, root)  # loading must not need to write into the repository
    return root


def test_old_run_folder_loads_and_answers_as_before(old_run):
    expected = json.loads((old_run / "expected_answers.json").read_text())["answers"]
    model = RVQA.from_pretrained(old_run / "run", device="cpu")
    assert list(model.indices) == ["tiny-captions"]
    paths = easy_vqa.get_test_image_paths()
    for case in expected:
        out = model.answer(paths[case["image"]], case["question"])
        assert out.answer == case["answer"]
        assert out.score == pytest.approx(case["score"], abs=1e-5)
        got = [[e.text, e.score, e.index, e.id] for e in out.evidence]
        assert [g[0] for g in got] == [e[0] for e in case["evidence"]]
        assert [g[2:] for g in got] == [e[2:] for e in case["evidence"]]
        assert [g[1] for g in got] == pytest.approx([e[1] for e in case["evidence"]], abs=1e-5)


def test_old_index_folder_loads_against_old_retriever(old_run):
    retriever = RetrieverModel.from_pretrained(old_run / "run" / "retriever" / "best")
    index = KnowledgeIndex.load(old_run / "indices" / "tiny-captions", retriever=retriever)
    assert index.manifest["count"] == len(index)
    hits = index.search_images([easy_vqa.get_test_image_paths()[0]], k=2)
    assert len(hits[0]) == 2
