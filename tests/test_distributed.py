"""rvqa.distributed: contiguous shards, gathered back in item order."""

from __future__ import annotations

import numpy as np
import pytest

from rvqa import distributed
from rvqa.distributed import shard_bounds, sharded_map


def test_shard_bounds_cover_every_item_once_in_order():
    for n in range(0, 12):
        for world in range(1, 5):
            bounds = [shard_bounds(n, world, r) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))


class _Rank:
    """What sharded_map needs of an Accelerator, for one rank of a simulated run."""

    def __init__(self, rank: int, world: int):
        self.process_index, self.num_processes = rank, world


@pytest.mark.parametrize("world", [2, 3, 4])
def test_sharded_map_equals_one_process(monkeypatch, world):
    """Every rank of a simulated run gets exactly the one-process rows, in item order."""

    def fn(xs: list) -> np.ndarray:  # rows that identify their item
        return np.array([[x, x * x] for x in xs], dtype=np.float32).reshape(len(xs), 2)

    for n in range(1, 11):
        items = list(range(100, 100 + n))
        expected = fn(items)
        # gather_object: every rank's [(start, rows)] in rank order, as accelerate returns.
        parts = []
        for r in range(world):
            lo, hi = shard_bounds(n, world, r)
            parts.append((lo, fn(items[lo:hi]) if hi > lo else None))
        monkeypatch.setattr("accelerate.utils.gather_object", lambda _mine, parts=parts: parts)
        for r in range(world):
            got = sharded_map(fn, items, _Rank(r, world))
            np.testing.assert_array_equal(got, expected)


def test_sharded_map_single_process_calls_fn_once():
    calls = []
    out = sharded_map(lambda xs: calls.append(xs) or np.ones((len(xs), 1)), [1, 2, 3])
    assert calls == [[1, 2, 3]] and out.shape == (3, 1)
    assert distributed.is_main_process() is True
