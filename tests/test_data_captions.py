"""CaptionCorpus (rvqa.data.captions) and the lazy-sequence base it shares with VQADataset (rvqa.data.lazy)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from rvqa.data import CaptionCorpus, CaptionRecord, VQADataset, VQARecord
from rvqa.data.captions import CaptionColumns, UniqueIds, caption_text
from rvqa.data.lazy import LazyRecords
from rvqa.errors import DataFormatError


def test_corpus_slicing_and_records() -> None:
    recs = [CaptionRecord("a", 1, 7, "x.png"), CaptionRecord("b", 2, 8, None)]
    corpus = CaptionCorpus.from_records(recs)
    assert list(corpus) == recs and corpus.texts == ["a", "b"] and corpus.image_ids == [7, 8]
    part = corpus[1:]
    assert isinstance(part, CaptionCorpus) and list(part) == recs[1:]
    assert corpus[-1] == recs[1]
    with pytest.raises(IndexError):
        corpus[2]


def test_corpus_negative_indices_and_index_errors() -> None:
    recs = [CaptionRecord("a", 1), CaptionRecord("b", 2), CaptionRecord("c", 3)]
    corpus = CaptionCorpus.from_records(recs)
    assert [corpus[i] for i in (-3, -2, -1)] == recs
    assert list(corpus[::-1]) == recs[::-1] and list(corpus[5:]) == []
    with pytest.raises(IndexError, match=r"^caption index -4 out of range for 3 captions$"):
        corpus[-4]
    with pytest.raises(
        TypeError, match="^CaptionCorpus indices must be integers or slices, not str$"
    ):
        corpus["a"]


def test_corpus_shares_the_lazy_sequence_base_with_vqa_dataset() -> None:
    question = VQARecord(1, "q?", "a.png", 7)
    for seq, record in (
        (CaptionCorpus.from_records([CaptionRecord("a", 1)]), CaptionRecord("a", 1)),
        (VQADataset.from_records([question]), question),
    ):
        assert isinstance(seq, LazyRecords) and isinstance(seq, Sequence)
        assert seq[0] == seq[-1] == record and list(seq) == [record] and record in seq
        assert seq.index(record) == 0 and seq.count(record) == 1


def test_caption_text_checks_and_strips() -> None:
    assert caption_text("  a red bus \n", "f: line 3") == "a red bus"
    with pytest.raises(DataFormatError, match=r"^f: line 3: the caption must be a string, got 7$"):
        caption_text(7, "f: line 3")
    with pytest.raises(
        DataFormatError, match=r"^f: line 3: the caption is empty or whitespace only$"
    ):
        caption_text(" \t", "f: line 3")


def test_unique_ids_name_both_records() -> None:
    ids = UniqueIds()
    ids.add(5, "f: line 1")
    ids.add("5", "f: line 2")  # a string and an integer are different ids
    with pytest.raises(
        DataFormatError, match=r"^f: line 9: duplicate caption id 5 \(also at f: line 1\)$"
    ):
        ids.add(5, "f: line 9")
    with pytest.raises(DataFormatError, match="caption id must be an integer or string, got None"):
        ids.add(None, "f: line 4")


def test_caption_columns_check_collect_and_wrap() -> None:
    out = CaptionColumns()
    out.add(" a cat ", 1, "f: line 1", image_id=7, image="/img/7.jpg")
    out.add("a dog", "x", "f: line 2")
    corpus = out.corpus(source="jsonl", location="f")
    assert len(out) == 2 and corpus.source == "jsonl" and corpus.location == "f"
    assert list(corpus) == [
        CaptionRecord("a cat", 1, 7, "/img/7.jpg"),
        CaptionRecord("a dog", "x", None, None),
    ]
    with pytest.raises(DataFormatError, match=r"^f: line 3: duplicate caption id 1"):
        out.add("a bird", 1, "f: line 3")
    with pytest.raises(DataFormatError, match=r"^f: line 4: the caption is empty"):
        out.add("", 4, "f: line 4")
