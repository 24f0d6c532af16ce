"""Slurm `--array` expressions as plain data: `0-63`, `0-63%16`, `3,7,10-12`, and back."""

from __future__ import annotations

import re
from dataclasses import dataclass

from vlm_hpc.errors import VlmHpcError

_PART = re.compile(r"(\d+)(?:-(\d+)(?::(\d+))?)?\Z")


@dataclass(frozen=True)
class ArraySpec:
    indices: tuple[int, ...]  # sorted, unique
    throttle: int | None  # the %P part: at most P tasks at once

    def __str__(self) -> str:
        return format_indices(self.indices) + (f"%{self.throttle}" if self.throttle else "")


def parse_array(spec: str) -> ArraySpec:
    """Parse a Slurm array expression; raises one clear line on anything else."""
    text = spec.replace(" ", "")
    throttle = None
    if "%" in text:
        text, _, limit = text.partition("%")
        if not limit.isdigit() or int(limit) < 1:
            raise VlmHpcError(f"--array {spec!r}: the part after % must be a positive number of parallel tasks")
        throttle = int(limit)
    indices: set[int] = set()
    for part in text.split(","):
        match = _PART.match(part)
        if not match:
            raise VlmHpcError(f"--array {spec!r}: {part!r} is not N, N-M or N-M:S (example: 0-63%16 or 3,7,10-12)")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) else first
        step = int(match.group(3)) if match.group(3) else 1
        if last < first or step < 1:
            raise VlmHpcError(f"--array {spec!r}: {part!r} is an empty range")
        indices.update(range(first, last + 1, step))
    return ArraySpec(tuple(sorted(indices)), throttle)


def format_indices(indices) -> str:
    """Compress indices into Slurm's form: [0,1,2,5,7,8] -> '0-2,5,7-8'."""
    ordered = sorted(set(indices))
    parts: list[str] = []
    start = previous = None
    for task in ordered + [None]:
        if start is not None and (task is None or task != previous + 1):
            parts.append(str(start) if start == previous else f"{start}-{previous}")
            start = None
        if task is not None and start is None:
            start = task
        previous = task
    return ",".join(parts)


def split_for_max_array_size(indices: tuple[int, ...], max_array_size: int) -> list[tuple[int, tuple[int, ...]]]:
    """Groups of (offset, task ids) with every task id < max_array_size; slice = offset + task id."""
    groups: dict[int, list[int]] = {}
    for task in indices:
        offset = (task // max_array_size) * max_array_size
        groups.setdefault(offset, []).append(task - offset)
    return [(offset, tuple(tasks)) for offset, tasks in sorted(groups.items())]
