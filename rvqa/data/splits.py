"""Deterministic splits of record lists."""

from __future__ import annotations

import random
from collections.abc import Sequence

from rvqa.errors import UsageError

__all__ = ["holdout_by_image"]


def holdout_by_image(records: Sequence, fraction: float, seed: int) -> tuple[list, list]:
    """Split records into (train, held-out) by image, deterministically."""
    if not 0 < fraction < 1:
        raise UsageError(f"val_fraction must be in (0, 1), got {fraction}")
    images = sorted({r.image_id for r in records}, key=str)
    rng = random.Random(seed)
    rng.shuffle(images)
    n_val = max(1, int(round(fraction * len(images))))
    val_ids = set(images[:n_val])
    train = [r for r in records if r.image_id not in val_ids]
    val = [r for r in records if r.image_id in val_ids]
    return train, val
