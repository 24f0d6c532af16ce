"""Which images go into one generate() call: fixed batches (the seed's) or batches filled to a tile budget.

A 41-tile image is ten times the work and the KV cache of a 4-tile one, so with `generation.tile_budget` a
batch takes images until their tiles (thumbnails included) reach the budget, at most `generation.batch_size`
images. Images are sorted by tile count first: equal tile counts mean equal prompt lengths, so left padding
(wasted prefill and cache) nearly vanishes. Pure functions over items and their tile counts; the worker owns
the I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Item = TypeVar("Item")


@dataclass(frozen=True)
class BatchLimits:
    """At most `max_images` per batch and, when `max_tiles` is set, at most that many tiles (an image with
    more tiles than the budget goes alone)."""

    max_images: int
    max_tiles: int | None = None

    def fits(self, images: int, tiles: int) -> bool:
        return images <= self.max_images and (self.max_tiles is None or tiles <= self.max_tiles)


def plan_batches(items: Sequence[Item], limits: BatchLimits, tile_count: Callable[[Item], int]) -> list[list[Item]]:
    """Items grouped into batches. Without a tile budget: in the order given, `max_images` per batch. With one:
    sorted by tile count (ties keep the order given, which is row order), each batch filled greedily up to the
    limits."""
    if limits.max_tiles is None:
        return [list(items[i:i + limits.max_images]) for i in range(0, len(items), limits.max_images)]
    batches: list[list[Item]] = []
    current: list[Item] = []
    tiles = 0
    for item in sorted(items, key=tile_count):
        count = tile_count(item)
        if current and not limits.fits(len(current) + 1, tiles + count):
            batches.append(current)
            current, tiles = [], 0
        current.append(item)
        tiles += count
    if current:
        batches.append(current)
    return batches


def split_windows(rows: list[int], limits: BatchLimits, sort_window: int) -> list[list[int]]:
    """The rows read and prepared together: one batch each without a tile budget, `sort_window` rows with one."""
    size = limits.max_images if limits.max_tiles is None else sort_window
    return [rows[i:i + size] for i in range(0, len(rows), size)]


@dataclass
class BatchPlanner(Generic[Item]):
    """Batches across consecutive windows of items (prepared rows, or anything with a tile count): with a tile
    budget, the last batch of a window, when it still has room, is held back and planned again with the next
    window, so that batches stay full. It hands back the items themselves; the caller keeps no copy of what is
    held."""

    limits: BatchLimits
    tile_count: Callable[[Item], int]
    held: list[Item] = field(default_factory=list)

    def add(self, items: list[Item]) -> list[list[Item]]:
        """Batches ready to run from `items` (in row order) plus what was held back."""
        pool = self.held + items  # held items come from earlier windows: the pool stays in row order per tile count
        batches = plan_batches(pool, self.limits, self.tile_count)
        self.held = []
        if self.limits.max_tiles is not None and batches:
            last = batches[-1]
            if self.limits.fits(len(last) + 1, sum(map(self.tile_count, last)) + 1):  # room for one more image
                self.held = batches.pop()
        return batches

    def flush(self) -> list[list[Item]]:
        """Whatever is held back, as batches (at the end of the slice)."""
        batches = plan_batches(self.held, self.limits, self.tile_count)
        self.held = []
        return batches

    def shrink(self, failed_tiles: int, smallest: int) -> bool:
        """After running out of memory on a batch of `failed_tiles` tiles: the budget drops to half of that,
        never under `smallest` (one image at max_num). Returns whether it changed."""
        if self.limits.max_tiles is None:
            return False
        budget = max(smallest, min(self.limits.max_tiles, failed_tiles // 2))
        if budget >= self.limits.max_tiles:
            return False
        self.limits = BatchLimits(self.limits.max_images, budget)
        return True


def memory_tile_budget(free_bytes: int, tile_bytes: int, image_bytes: int, workspace_bytes: int, max_images: int,
                       smallest: int, headroom: float = 0.85) -> int:
    """The tile budget that fits `free_bytes` of accelerator memory: a `headroom` share of it, less the vision
    workspace and `max_images` images' fixed cost (text and new tokens), divided by the cost of one tile."""
    usable = free_bytes * headroom - workspace_bytes - max_images * image_bytes
    return max(smallest, int(usable // tile_bytes))
