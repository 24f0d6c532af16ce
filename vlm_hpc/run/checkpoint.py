"""The checkpoint of one slice (`state/slice_N.json`, "the index" in messages): which rows are finished, where
the append-only files end, why it stopped.

Commit protocol (see `writer`): a batch's outputs are made durable first, then `SliceCheckpoint.commit` rewrites
the index atomically. A crash before the index write leaves the batch uncommitted: its files are
overwritten (json) or its appended tail cut off (jsonl, failure ledger) when the slice resumes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

from vlm_hpc.errors import VlmHpcError
from vlm_hpc.run.durable import write_json_atomic
from vlm_hpc.run.failures import OutcomeCounts

# What a slice's index records about it; `vlm_hpc.status` derives "stalled" and "corrupt" on top.
CheckpointStatus = Literal["pending", "running", "stopped", "requeued", "done", "crashed"]

# How the reason of a crash that resubmitting as it is would repeat begins (a VlmHpcError: the config, the model
# folder, the data, the node's device, a corrupt index), in the index and in the slice log's "crashed: " line.
WILL_CRASH_AGAIN = "will crash again until fixed"


class CorruptCheckpoint(VlmHpcError):
    """An index file that exists but cannot be what `SliceCheckpoint.save` wrote; `problem` says what is wrong."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path} is corrupt: {problem}")
        self.path = path
        self.problem = problem


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


def intervals_of(rows: set[int] | list[int]) -> list[list[int]]:
    """Rows as the index's sorted, disjoint [start, stop) intervals."""
    return [[a, b] for a, b in _runs(list(rows))]


def rows_in(intervals: list[list[int]]) -> int:
    return sum(b - a for a, b in intervals)


@dataclass
class SliceCheckpoint:
    """state/slice_{I}.json. `done` holds row intervals that are committed or in the failure ledger."""

    slice: int
    num_slices: int
    start: int
    stop: int
    done: list[list[int]] = field(default_factory=list)
    captions: int = 0  # captioned rows, warned ones included (OutcomeCounts.captioned)
    failures: int = 0  # failed rows (OutcomeCounts.failed)
    warned_by_reason: dict[str, int] = field(default_factory=dict)  # ledger reasons of captioned rows
    failed_by_reason: dict[str, int] = field(default_factory=dict)  # ledger reasons of failed rows
    captions_offset: int = 0  # output-format state: committed size of the slice's jsonl file (only jsonl uses it)
    failures_offset: int = 0  # committed size of the failure ledger
    sample_images: int = 0
    status: CheckpointStatus = "pending"
    stop_reason: str | None = None
    will_crash_again: bool = False  # crashed on an error a resubmission repeats: fix it first (WILL_CRASH_AGAIN)
    attempts: int = 0
    started_at: float | None = None
    rows_at_start: int = 0  # finished rows when the current attempt started (for its rate)
    updated_at: float | None = None
    compute_seconds: float = 0.0  # model time spent on committed batches, across attempts
    repairs: list[dict] = field(default_factory=list)  # damaged outputs found on resume or by verify --repair

    @property
    def total(self) -> int:
        return self.stop - self.start

    @property
    def finished_rows(self) -> int:
        return rows_in(self.done)

    @property
    def complete(self) -> bool:
        return self.finished_rows >= self.total

    def outcomes(self) -> OutcomeCounts:
        """The committed rows by outcome (an index written before reasons were counted has none by reason)."""
        return OutcomeCounts(self.captions, self.failures, dict(self.warned_by_reason), dict(self.failed_by_reason))

    def set_outcomes(self, counts: OutcomeCounts) -> None:
        """Record `counts` as the committed rows' outcomes."""
        self.captions, self.failures = counts.captioned, counts.failed
        self.warned_by_reason, self.failed_by_reason = dict(counts.warned_by_reason), dict(counts.failed_by_reason)

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
    def load(cls, path: Path) -> SliceCheckpoint | None:
        """The index at `path`, None if there is none; CorruptCheckpoint if its content is anything else."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CorruptCheckpoint(path, f"unreadable ({exc.strerror})") from None
        return cls.parse(data, path)

    @classmethod
    def parse(cls, data: bytes, path: Path) -> SliceCheckpoint:
        """Check every field's type and the intervals' order, so that no later step trips over a bad value."""
        try:
            raw = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise CorruptCheckpoint(path, f"invalid UTF-8 at byte {exc.start}") from None
        except json.JSONDecodeError as exc:
            raise CorruptCheckpoint(path, f"not JSON ({exc.msg} at byte {exc.pos} of {len(data)})") from None
        if not isinstance(raw, dict):
            raise CorruptCheckpoint(path, f"a JSON {type(raw).__name__}, not an object")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise CorruptCheckpoint(path, f"unknown fields {unknown}; was it written by another tool?")
        missing = [name for name in ("slice", "num_slices", "start", "stop") if name not in raw]
        if missing:
            raise CorruptCheckpoint(path, f"missing fields {missing}")
        for name, value in raw.items():
            if name in _FIELD_TYPES and not _has_type(value, _FIELD_TYPES[name]):
                raise CorruptCheckpoint(path, f"field {name!r} is {value!r:.60}, not {_FIELD_TYPES[name][0]}")
        checkpoint = cls(**raw)
        previous = checkpoint.start
        for interval in checkpoint.done:
            if len(interval) != 2 or not previous <= interval[0] < interval[1] <= checkpoint.stop:
                raise CorruptCheckpoint(path, f"'done' interval {interval} is out of order or outside "
                                         f"[{checkpoint.start}, {checkpoint.stop})")
            previous = interval[1]
        negative = [name for name in ("captions", "failures", "captions_offset", "failures_offset")
                    if getattr(checkpoint, name) < 0]
        if negative:
            raise CorruptCheckpoint(path, f"negative {negative}")
        return checkpoint

    def save(self, path: Path) -> None:
        self.updated_at = time.time()
        write_json_atomic(path, asdict(self))

    def record_output_state(self, state: Mapping[str, int]) -> None:
        """Set the fields the output format owns (`run.outputs`; jsonl: captions_offset) to what it returned."""
        for name, value in state.items():
            if name not in _OUTPUT_STATE_FIELDS:
                raise ValueError(f"output-format state {name!r} is not an index field of {_OUTPUT_STATE_FIELDS}")
            setattr(self, name, value)

    def commit(self, path: Path, rows: list[int], outcomes: OutcomeCounts, output_state: Mapping[str, int],
               failures_offset: int, samples: int, seconds: float) -> None:
        """Mark rows finished with their `outcomes`, and record the output format's new state and the ledger's size,
        atomically."""
        for start, stop in _runs(rows):
            self.done = add_interval(self.done, start, stop)
        total = self.outcomes()
        total.merge(outcomes)
        self.set_outcomes(total)
        self.record_output_state(output_state)
        self.failures_offset = failures_offset
        self.sample_images += samples
        self.compute_seconds += seconds
        self.save(path)


def _has_type(value: object, expected: tuple[str, tuple[type, ...]]) -> bool:
    name, types = expected
    if isinstance(value, bool) and bool not in types:  # JSON true is not a row count
        return False
    if name == "a list of [start, stop] pairs":
        return isinstance(value, list) and all(
            isinstance(pair, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
            for pair in value)
    if name == "a list of objects":
        return isinstance(value, list) and all(isinstance(item, dict) for item in value)
    if name == _COUNTS[0]:
        return isinstance(value, dict) and all(
            isinstance(count, int) and not isinstance(count, bool) and count >= 0 for count in value.values())
    return isinstance(value, types)


_OUTPUT_STATE_FIELDS = ("captions_offset",)  # the fields an output format may own (stored names never change)
_INT = ("an integer", (int,))
_NUMBER = ("a number", (int, float))
_OPTIONAL_NUMBER = ("a number or null", (int, float, type(None)))
_COUNTS = ("an object of reasons and row counts", (dict,))
_FIELD_TYPES: dict[str, tuple[str, tuple[type, ...]]] = {
    "slice": _INT, "num_slices": _INT, "start": _INT, "stop": _INT, "done": ("a list of [start, stop] pairs", (list,)),
    "captions": _INT, "failures": _INT, "warned_by_reason": _COUNTS, "failed_by_reason": _COUNTS,
    "captions_offset": _INT, "failures_offset": _INT, "sample_images": _INT,
    "status": ("a string", (str,)), "stop_reason": ("a string or null", (str, type(None))),
    "will_crash_again": ("true or false", (bool,)), "attempts": _INT,
    "started_at": _OPTIONAL_NUMBER, "rows_at_start": _INT, "updated_at": _OPTIONAL_NUMBER,
    "compute_seconds": _NUMBER, "repairs": ("a list of objects", (list,)),
}
