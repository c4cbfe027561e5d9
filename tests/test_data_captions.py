"""CaptionCorpus (rvqa.data.captions): slicing, records, caption and id checks."""

from __future__ import annotations

import pytest

from rvqa.data import (
    CaptionCorpus,
    CaptionRecord,
)


def test_corpus_slicing_and_records() -> None:
    recs = [CaptionRecord("a", 1, 7, "x.png"), CaptionRecord("b", 2, 8, None)]
    corpus = CaptionCorpus.from_records(recs)
    assert list(corpus) == recs and corpus.texts == ["a", "b"] and corpus.image_ids == [7, 8]
    part = corpus[1:]
    assert isinstance(part, CaptionCorpus) and list(part) == recs[1:]
    assert corpus[-1] == recs[1]
    with pytest.raises(IndexError):
        corpus[2]
