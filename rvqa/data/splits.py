"""Deterministic splits of record lists."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, TypeVar

from rvqa.data.lazy import LazyRecords
from rvqa.errors import UsageError

R = TypeVar("R")

__all__ = ["holdout_by_image"]


def holdout_by_image(records: Sequence[R], fraction: float, seed: int) -> tuple[Any, Any]:
    """Split records into (train, held-out) by image, deterministically.

    Every record of an image lands on the same side. A lazy record sequence
    (:class:`~rvqa.data.VQADataset`, :class:`~rvqa.data.CaptionCorpus`) gives two
    of its kind sharing its parsed data, reading image ids from its columns (no
    record built, no image decoded); any other sequence gives two lists.

    Raises:
        UsageError: ``fraction`` not in (0, 1).
    """
    if not 0 < fraction < 1:
        raise UsageError(f"val_fraction must be in (0, 1), got {fraction}")
    lazy = isinstance(records, LazyRecords)
    ids = (
        [records.image_id_at(i) for i in range(len(records))]
        if lazy
        else [r.image_id for r in records]
    )
    images = sorted(set(ids), key=str)
    rng = random.Random(seed)
    rng.shuffle(images)
    n_val = max(1, int(round(fraction * len(images))))
    val_ids = set(images[:n_val])
    train_pos = [i for i, image_id in enumerate(ids) if image_id not in val_ids]
    val_pos = [i for i, image_id in enumerate(ids) if image_id in val_ids]
    if lazy:
        return records.take(train_pos), records.take(val_pos)
    return [records[i] for i in train_pos], [records[i] for i in val_pos]
