"""The checkpoint index of one slice: which rows are finished, where the append-only files end, why it stopped.

Commit protocol (see `writer`): a batch's outputs are made durable first, then `SliceIndex.commit` rewrites
the index atomically. A crash before the index write leaves the batch uncommitted: its files are
overwritten (json) or its appended tail cut off (jsonl, failure ledger) when the slice resumes.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vlm_hpc.durable import read_json, write_json_atomic
from vlm_hpc.errors import VlmHpcError


def add_interval(intervals: list[list[int]], start: int, stop: int) -> list[list[int]]:
    """Union of sorted, disjoint [start, stop) intervals with one more, merged."""
    merged: list[list[int]] = []
    for a, b in sorted(intervals + [[start, stop]]):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return merged


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    """Sorted rows as contiguous [start, stop) runs."""
    runs: list[tuple[int, int]] = []
    for row in sorted(rows):
        if runs and row == runs[-1][1]:
            runs[-1] = (runs[-1][0], row + 1)
        else:
            runs.append((row, row + 1))
    return runs


def rows_in(intervals: list[list[int]]) -> int:
    return sum(b - a for a, b in intervals)


@dataclass
class SliceIndex:
    """state/slice_{I}.json. `done` holds row intervals that are committed or in the failure ledger."""

    slice: int
    num_slices: int
    start: int
    stop: int
    done: list[list[int]] = field(default_factory=list)
    captions: int = 0
    failures: int = 0
    captions_offset: int = 0  # committed size of the slice's jsonl file (format jsonl)
    failures_offset: int = 0  # committed size of the failure ledger
    sample_images: int = 0
    status: str = "pending"  # pending | running | stopped | requeued | done | crashed
    stop_reason: str | None = None
    attempts: int = 0
    started_at: float | None = None
    rows_at_start: int = 0  # finished rows when the current attempt started (for its rate)
    updated_at: float | None = None
    compute_seconds: float = 0.0  # model time spent on committed batches, across attempts

    @property
    def total(self) -> int:
        return self.stop - self.start

    @property
    def finished_rows(self) -> int:
        return rows_in(self.done)

    @property
    def complete(self) -> bool:
        return self.finished_rows >= self.total

    def is_done(self, row: int) -> bool:
        return any(a <= row < b for a, b in self.done)

    def pending_rows(self) -> list[int]:
        """Row indices not yet finished, in order."""
        pending, position = [], self.start
        for a, b in self.done:
            pending.extend(range(position, a))
            position = max(position, b)
        pending.extend(range(position, self.stop))
        return pending

    @classmethod
    def load(cls, path: Path) -> SliceIndex | None:
        raw = read_json(path)
        if raw is None:
            return None
        try:
            return cls(**raw)
        except TypeError as exc:
            raise VlmHpcError(f"{path} is not a vlm_hpc slice index ({exc}); was it written by another tool?") from None

    def save(self, path: Path) -> None:
        self.updated_at = time.time()
        write_json_atomic(path, asdict(self))

    def commit(self, path: Path, rows: list[int], captions: int, failures: int, captions_offset: int,
               failures_offset: int, samples: int, seconds: float) -> None:
        """Mark rows finished and record the new committed file sizes, atomically."""
        for start, stop in _runs(rows):
            self.done = add_interval(self.done, start, stop)
        self.captions += captions
        self.failures += failures
        self.captions_offset = captions_offset
        self.failures_offset = failures_offset
        self.sample_images += samples
        self.compute_seconds += seconds
        self.save(path)
