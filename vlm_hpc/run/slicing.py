"""Cutting a dataset's rows into contiguous slices, identical on every node (pure arithmetic: no I/O)."""

from __future__ import annotations

from vlm_hpc.errors import VlmHpcError


def slice_bounds(num_rows: int, slice_id: int, count: int) -> tuple[int, int]:
    """Rows [start, stop) of slice `index` of `count`: contiguous, sizes differ by at most one."""
    if count < 1 or not 0 <= slice_id < count:
        raise VlmHpcError(f"slice {slice_id} of {count} does not exist; slices are numbered 0..{count - 1}")
    base, extra = divmod(num_rows, count)
    start = slice_id * base + min(slice_id, extra)
    return start, start + base + (1 if slice_id < extra else 0)
