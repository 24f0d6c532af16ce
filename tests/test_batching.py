"""Batch planning: fixed batches as the seed, tile budgets, sorting, holding back, shrinking, memory sizing."""

from __future__ import annotations

import random

import pytest

from vlm_hpc.run.batching import BatchLimits, BatchPlanner, memory_tile_budget, split_windows
from vlm_hpc.run.batching import plan_batches as plan_items

# The planner takes any items with a tile count; these tests plan (row, tiles) pairs and compare rows.


def tiles_of(item: tuple[int, int]) -> int:
    return item[1]


def rows(batches: list[list[tuple[int, int]]]) -> list[list[int]]:
    return [[row for row, _ in batch] for batch in batches]


def plan_batches(items: list[tuple[int, int]], limits: BatchLimits) -> list[list[int]]:
    return rows(plan_items(items, limits, tiles_of))


def planner_of(limits: BatchLimits) -> BatchPlanner:
    return BatchPlanner(limits, tiles_of)


def test_without_a_tile_budget_batches_are_the_seeds_fixed_row_chunks() -> None:
    items = [(row, tiles) for row, tiles in zip(range(10, 24), [41, 1, 7, 7, 3, 10, 1, 1, 5, 2, 9, 9, 4, 1])]
    assert plan_batches(items, BatchLimits(6)) == [list(range(10, 16)), list(range(16, 22)), [22, 23]]


def test_tile_budget_sorts_by_tile_count_and_fills_up_to_the_budget() -> None:
    items = [(0, 10), (1, 1), (2, 7), (3, 7), (4, 3), (5, 10), (6, 1), (7, 41)]
    batches = plan_batches(items, BatchLimits(max_images=64, max_tiles=20))
    assert batches == [[1, 6, 4, 2, 3], [0, 5], [7]]  # 1+1+3+7+7 = 19, 10+10 = 20, 41 alone
    tiles = dict(items)
    assert all(sum(tiles[r] for r in b) <= 20 or len(b) == 1 for b in batches)
    assert sorted(r for b in batches for r in b) == list(range(8))


def test_an_image_over_the_budget_goes_alone_and_max_images_still_holds() -> None:
    assert plan_batches([(0, 41), (1, 41)], BatchLimits(64, 10)) == [[0], [1]]
    assert plan_batches([(r, 1) for r in range(7)], BatchLimits(3, 100)) == [[0, 1, 2], [3, 4, 5], [6]]


@pytest.mark.parametrize("seed", range(20))
def test_random_workloads_keep_every_row_once_and_respect_the_limits(seed: int) -> None:
    rng = random.Random(seed)
    items = [(row, rng.choice([1, 3, 5, 7, 10, 13, 41])) for row in range(rng.randint(0, 200))]
    limits = BatchLimits(rng.randint(1, 40), rng.randint(1, 120))
    batches = plan_batches(items, limits)
    tiles = dict(items)
    assert sorted(r for b in batches for r in b) == [r for r, _ in items]
    for batch in batches:
        assert len(batch) <= limits.max_images
        assert sum(tiles[r] for r in batch) <= limits.max_tiles or len(batch) == 1
        assert [tiles[r] for r in batch] == sorted(tiles[r] for r in batch)


def test_planner_holds_back_a_batch_with_room_and_flushes_it_at_the_end() -> None:
    planner = planner_of(BatchLimits(max_images=8, max_tiles=20))
    first = rows(planner.add([(0, 10), (1, 10), (2, 3)]))  # [2, 0] = 13 has room; [1] = 10 has room -> held
    assert first == [[2, 0]] and planner.held == [(1, 10)]
    second = rows(planner.add([(3, 10), (4, 5)]))  # pool 1, 3, 4: [4, 1] = 15, [3] held
    assert second == [[4, 1]] and planner.held == [(3, 10)]
    assert rows(planner.flush()) == [[3]] and planner.held == []


def test_planner_emits_full_batches_and_every_row_exactly_once() -> None:
    rng = random.Random(3)
    planner = planner_of(BatchLimits(max_images=16, max_tiles=60))
    seen: list[int] = []
    for window in range(30):
        items = [(window * 50 + i, rng.choice([1, 5, 7, 10, 41])) for i in range(50)]
        seen += [r for b in rows(planner.add(items)) for r in b]
        assert len(planner.held) <= 16
    seen += [r for b in rows(planner.flush()) for r in b]
    assert sorted(seen) == list(range(1500))


def test_fixed_batches_are_never_held_back() -> None:
    planner = planner_of(BatchLimits(6))
    assert rows(planner.add([(0, 7), (1, 7)])) == [[0, 1]] and planner.held == []


def test_shrink_halves_below_the_failed_batch_but_not_under_one_image() -> None:
    planner = planner_of(BatchLimits(64, 400))
    assert planner.shrink(380, smallest=10) and planner.limits.max_tiles == 190
    assert not planner.shrink(500, smallest=10) and planner.limits.max_tiles == 190  # a bigger failure: no change
    assert planner.shrink(12, smallest=10) and planner.limits.max_tiles == 10
    assert not planner.shrink(10, smallest=10) and planner.limits.max_tiles == 10
    assert not planner_of(BatchLimits(6)).shrink(60, smallest=10)


def test_memory_budget_grows_with_free_memory_and_never_drops_under_one_image() -> None:
    gib = 2**30
    small = memory_tile_budget(20 * gib, 100 * 2**20, 70 * 2**20, 2 * gib, 64, smallest=10)
    large = memory_tile_budget(80 * gib, 100 * 2**20, 70 * 2**20, 2 * gib, 64, smallest=10)
    assert 10 < small < large
    assert large == int((80 * gib * 0.85 - 2 * gib - 64 * 70 * 2**20) // (100 * 2**20))
    assert memory_tile_budget(gib, 100 * 2**20, 70 * 2**20, 2 * gib, 64, smallest=10) == 10


def test_windows_are_batches_without_a_budget_and_sort_windows_with_one() -> None:
    assert split_windows(list(range(7)), BatchLimits(3), sort_window=5) == [[0, 1, 2], [3, 4, 5], [6]]
    assert split_windows(list(range(7)), BatchLimits(3, 30), sort_window=5) == [[0, 1, 2, 3, 4], [5, 6]]
