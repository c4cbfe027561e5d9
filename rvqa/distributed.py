"""Process-level helpers for runs started by ``torchrun`` / ``accelerate launch``.

One sharding strategy everywhere: contiguous shards in rank order
(:func:`shard_bounds`), so gathering them back is a concatenation in rank order
and a several-process run yields exactly the rows of a one-process run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["is_distributed_launch", "is_main_process", "shard_bounds", "sharded_map"]


def is_distributed_launch() -> bool:
    """True when started by torchrun / accelerate launch with several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    """True on the global rank-0 process (and in a plain, single-process run)."""
    return os.environ.get("RANK", "0") == "0"


def shard_bounds(n: int, num_shards: int, rank: int) -> tuple[int, int]:
    """Contiguous ``[lo, hi)`` of shard ``rank`` when ``n`` items are split ``num_shards`` ways."""
    return n * rank // num_shards, n * (rank + 1) // num_shards


def sharded_map(
    fn: Callable[[list], np.ndarray], items: Sequence[Any], accelerator: Any = None
) -> np.ndarray:
    """Apply ``fn`` (a list of items → an (n, d) array) to this process's shard of
    ``items`` and gather every process's rows, in item order, on every process."""
    items = list(items)
    if accelerator is None or accelerator.num_processes == 1:
        return fn(items)
    from accelerate.utils import gather_object

    lo, hi = shard_bounds(len(items), accelerator.num_processes, accelerator.process_index)
    part = fn(items[lo:hi]) if hi > lo else None
    gathered = gather_object([(lo, part)])
    parts = sorted((start, rows) for start, rows in gathered if rows is not None)
    if not parts:
        raise ValueError("sharded_map: no items to map")
    out = np.concatenate([rows for _, rows in parts], axis=0)
    if len(out) != len(items):
        raise RuntimeError(f"sharded_map gathered {len(out)} rows for {len(items)} items")
    return out
