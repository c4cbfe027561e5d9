"""VQADataset (rvqa.data.vqa): subsets, slicing and indexing, from_records."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rvqa.data import (
    VQADataset,
    VQARecord,
    read_vqa_files,
)
from rvqa.errors import UsageError
from tests.data_fixtures import (
    write_vqa_split,
)


@pytest.fixture
def split(tmp_path: Path) -> dict[str, Path]:
    return write_vqa_split(tmp_path)


# --------------------------------------------------------------------------- dataset operations


def test_subset_is_deterministic_nested_and_ordered(split: dict[str, Path]) -> None:
    ds = read_vqa_files(split["questions"], split["annotations"], split["images"])
    a = ds.subset(0.6, seed=3)
    assert len(a) == 3 and a.question_ids == ds.subset(0.6, seed=3).question_ids
    order = {q: i for i, q in enumerate(ds.question_ids)}
    assert [order[q] for q in a.question_ids] == sorted(order[q] for q in a.question_ids)
    small = ds.subset(n=2, seed=3)
    assert set(small.question_ids) <= set(a.question_ids)  # nested
    assert len(ds.subset(n=100)) == 5 and len(ds.subset(1.0)) == 5 and len(ds.subset(0.01)) == 1
    assert small.has_answers and small.split == ds.split
    assert [r.question_id for r in small] == small.question_ids
    with pytest.raises(UsageError, match="exactly one of"):
        ds.subset()
    with pytest.raises(UsageError, match=r"fraction must be in \(0, 1\]"):
        ds.subset(1.5)
    with pytest.raises(UsageError, match="non-negative integer"):
        ds.subset(n=-1)


def test_slicing_and_indexing(split: dict[str, Path]) -> None:
    ds = read_vqa_files(split["questions"], split["annotations"], split["images"])
    part = ds[1:4]
    assert isinstance(part, VQADataset) and part.question_ids == [42001, 73000, 9000]
    assert part[::2].question_ids == [42001, 9000] and part.image_ids == [42, 73, 9]
    assert ds[np.int64(2)].question_id == 73000
    with pytest.raises(IndexError, match="out of range"):
        ds[5]
    with pytest.raises(TypeError, match="integers or slices"):
        ds["a"]


def test_from_records() -> None:
    recs = [
        VQARecord(1, "q?", "a.png", 7, ("x",) * 10),
        VQARecord(2, "r?", "b.png", 7, ("y",) * 10),
    ]
    ds = VQADataset.from_records(recs, split="mine")
    assert list(ds) == recs and ds.has_answers and ds.image_ids == [7]
