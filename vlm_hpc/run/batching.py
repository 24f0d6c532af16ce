"""Which images go into one generate() call: fixed batches (the seed's) or batches filled to a tile budget.

A 41-tile image is ten times the work and the KV cache of a 4-tile one, so with `generation.tile_budget` a
batch takes images until their tiles (thumbnails included) reach the budget, at most `generation.batch_size`
images. Images are sorted by tile count first: equal tile counts mean equal prompt lengths, so left padding
(wasted prefill and cache) nearly vanishes. Pure functions over (row, tiles) pairs; the worker owns the I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class BatchLimits:
    """At most `max_images` per batch and, when `max_tiles` is set, at most that many tiles (an image with
    more tiles than the budget goes alone)."""

    max_images: int
    max_tiles: int | None = None

    def fits(self, images: int, tiles: int) -> bool:
        return images <= self.max_images and (self.max_tiles is None or tiles <= self.max_tiles)


def plan_batches(items: list[tuple[int, int]], limits: BatchLimits) -> list[list[int]]:
    """Rows grouped into batches. `items` are (row, tiles). Without a tile budget: row order, `max_images`
    per batch. With one: sorted by (tiles, row), each batch filled greedily up to the limits."""
    if limits.max_tiles is None:
        rows = [row for row, _ in items]
        return [rows[i:i + limits.max_images] for i in range(0, len(rows), limits.max_images)]
    batches: list[list[int]] = []
    current: list[int] = []
    tiles = 0
    for row, count in sorted(items, key=lambda item: (item[1], item[0])):
        if current and not limits.fits(len(current) + 1, tiles + count):
            batches.append(current)
            current, tiles = [], 0
        current.append(row)
        tiles += count
    if current:
        batches.append(current)
    return batches


def split_windows(rows: list[int], limits: BatchLimits, sort_window: int) -> list[list[int]]:
    """The rows read and prepared together: one batch each without a tile budget, `sort_window` rows with one."""
    size = limits.max_images if limits.max_tiles is None else sort_window
    return [rows[i:i + size] for i in range(0, len(rows), size)]


@dataclass
class BatchPlanner:
    """Batches across consecutive windows of prepared rows: with a tile budget, the last batch of a window,
    when it still has room, is held back and planned again with the next window, so that batches stay full."""

    limits: BatchLimits
    held: list[tuple[int, int]] = field(default_factory=list)

    def add(self, items: list[tuple[int, int]]) -> list[list[int]]:
        """Batches ready to run from `items` (row, tiles) plus what was held back."""
        pool = self.held + items
        batches = plan_batches(pool, self.limits)
        self.held = []
        if self.limits.max_tiles is not None and batches:
            tiles = dict(pool)
            last = batches[-1]
            if self.limits.fits(len(last) + 1, sum(tiles[row] for row in last) + 1):  # room for one more image
                batches.pop()
                self.held = [(row, tiles[row]) for row in last]
        return batches

    def flush(self) -> list[list[int]]:
        """Whatever is held back, as batches (at the end of the slice)."""
        batches = plan_batches(self.held, self.limits)
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
