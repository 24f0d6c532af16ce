"""Repairing a slice's committed outputs. On resume: an append-only file shorter than committed, torn, or with
damaged lines keeps only its intact lines, and the rows whose output is gone go back to pending. For
`verify --repair`: a missing or corrupt index is rebuilt from the outputs that are intact.

A row stays done when its caption or its failure line is intact; the ledger note of a captioned row (such
as `truncated`) whose line was destroyed cannot be told from rows that had none, and is not restored.

Both survive a crash at any instant: files are cut or rewritten atomically before the index is, and a file
rewritten but not yet recorded is shorter than the old index's offset, so the next resume finds it again and
comes to the same rows.
"""

from __future__ import annotations

import logging
import shlex
import time
from collections.abc import Callable
from pathlib import Path

from vlm_hpc.cluster.array_spec import format_indices
from vlm_hpc.errors import VlmHpcError
from vlm_hpc.run.checkpoint import CorruptCheckpoint, SliceCheckpoint, intervals_of
from vlm_hpc.run.committed import AppendOnlyFile, Line, SliceOutputs, damage_hint, read_slice_outputs
from vlm_hpc.run.durable import truncate_to, write_atomic
from vlm_hpc.run.layout import OutputLayout
from vlm_hpc.run.outputs.base import OutputFormat, SliceKeys


def repair_command(layout: OutputLayout) -> str:
    return f"python -m vlm_hpc.verify {shlex.quote(str(layout.root))} --repair"


def load_checkpoint(layout: OutputLayout, slice_id: int, num_slices: int, start: int,
                    stop: int) -> SliceCheckpoint | None:
    """Slice `slice_id`'s checkpoint, None if there is none; CorruptCheckpoint if damaged or another slice's."""
    path = layout.checkpoint_file(slice_id)
    checkpoint = SliceCheckpoint.load(path)
    if checkpoint is None:
        return None
    found = (checkpoint.slice, checkpoint.num_slices, checkpoint.start, checkpoint.stop)
    if found != (slice_id, num_slices, start, stop):
        raise CorruptCheckpoint(path, f"it is slice {found[0]} of {found[1]} (rows [{found[2]}, {found[3]})), "
                                      f"not slice {slice_id} of {num_slices} (rows [{start}, {stop}))")
    return checkpoint


def resume_checkpoint(layout: OutputLayout, slice_id: int, num_slices: int, start: int, stop: int,
                      output: OutputFormat) -> SliceCheckpoint:
    """The checkpoint to resume from, a new one for a slice never started, or one error naming the repair command."""
    try:
        checkpoint = load_checkpoint(layout, slice_id, num_slices, start, stop)
    except CorruptCheckpoint as exc:
        raise VlmHpcError(f"{exc}; rebuild it from the slice's outputs with: {repair_command(layout)}") from None
    if checkpoint is not None:
        return checkpoint
    for path in [*output.append_only_files(), layout.failures_file(slice_id)]:
        if path.exists() and path.stat().st_size > 0:  # a fresh start would cut its committed lines away
            raise VlmHpcError(f"{layout.checkpoint_file(slice_id)} is missing but {path} holds committed lines; "
                              f"rebuild the index from them with: {repair_command(layout)}")
    return SliceCheckpoint(slice=slice_id, num_slices=num_slices, start=start, stop=stop)


def _rewrite(scan: AppendOnlyFile, kept: list[Line], temp_dir: Path) -> int:
    """Leave only `kept` in the file: cut it when they are its start, else replace it atomically; new size."""
    body = b"".join(scan.data[line.start:line.end] for line in kept)
    if body == scan.data[:len(body)]:
        if scan.size > len(body):
            truncate_to(scan.path, len(body))
    else:
        temp_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(scan.path, body, temp_dir=temp_dir)
    return len(body)


def _kept_lines(outputs: SliceOutputs, rows: set[int]) -> tuple[list[Line], list[Line]]:
    """The caption and ledger lines of `rows`, in file order."""
    def pick(lines: dict[int, Line]) -> list[Line]:
        return sorted((line for row, line in lines.items() if row in rows), key=lambda line: line.start)
    return pick(outputs.captions.lines), pick(outputs.ledger_lines)


def repair_on_resume(output: OutputFormat, checkpoint: SliceCheckpoint, keys: Callable[[], list[str | None]],
                     duplicate_rows: dict[str, int], log: logging.Logger) -> None:
    """If an append-only file looks damaged (`damage_hint`), scan the slice's outputs, send rows without an
    intact output back to pending, keep only intact lines, and save the index with what was repaired."""
    layout, slice_id = output.layout, checkpoint.slice
    hints: dict[Path, str] = output.damage_hints(checkpoint)
    hint = damage_hint(layout.failures_file(slice_id), checkpoint.failures_offset, None)
    if hint:
        hints[layout.failures_file(slice_id)] = hint
    if not hints:
        return
    outputs = read_slice_outputs(output, SliceKeys(checkpoint.start, keys(), duplicate_rows), checkpoint)
    done = {row for a, b in checkpoint.done for row in range(a, b)}
    lost = done - outputs.captioned - outputs.failed
    kept = done - lost
    caption_lines, ledger_lines = _kept_lines(outputs, kept)
    appended = outputs.captions.appended
    scans = [(appended, caption_lines, "caption line")] if appended is not None else []
    scans.append((outputs.ledger, ledger_lines, "ledger line"))
    damaged = [scan.path for scan, _, _ in scans if scan.damaged] or list(hints)
    sizes = {}
    for scan, lines, _ in scans:
        sizes[scan.path] = _rewrite(scan, lines, layout.temp_dir(slice_id))
    now = time.time()
    for scan, lines, what in scans:
        if scan.path not in hints and sizes[scan.path] == scan.committed:
            continue
        pending = sorted(lost) if scan.path in damaged else []
        relative = str(scan.path.relative_to(layout.root))
        checkpoint.repairs.append({"time": now, "file": relative, "found": hints.get(scan.path, "lines of rows below"),
                              "damage": scan.damage[:20], "rows_pending": intervals_of(pending),
                              "size": [scan.committed, sizes[scan.path]]})
        log.info(f"repaired {relative}: {hints.get(scan.path, 'held lines of rows sent back to pending')}; kept "
                 f"{len(lines)} intact lines ({scan.committed} -> {sizes[scan.path]} bytes); rows back to pending: "
                 f"{format_indices(pending) if pending else 'none'}"
                 + (f" (their {what} is damaged or missing)" if pending else ""))
    if lost:  # the slice is no longer complete
        layout.end_marker(slice_id).unlink(missing_ok=True)
    checkpoint.done = intervals_of(kept)
    checkpoint.set_outcomes(outputs.outcomes(kept))
    if appended is not None:
        checkpoint.record_output_state(output.appended_state(sizes[appended.path]))
    checkpoint.failures_offset = sizes[outputs.ledger.path]
    checkpoint.save(layout.checkpoint_file(slice_id))


def rebuild_checkpoint(output: OutputFormat, num_slices: int, start: int, keys: list[str | None],
                       duplicate_rows: dict[str, int], why: str) -> SliceCheckpoint:
    """A new checkpoint for the slice of `output` from its intact outputs (files cut to their intact lines first)."""
    layout, slice_id = output.layout, output.slice_id
    outputs = read_slice_outputs(output, SliceKeys(start, keys, duplicate_rows), None)
    done = outputs.captioned | outputs.failed
    caption_lines, ledger_lines = _kept_lines(outputs, done)
    appended = outputs.captions.appended
    output_state = {}
    if appended is not None:
        output_state = output.appended_state(_rewrite(appended, caption_lines, layout.temp_dir(slice_id)))
    failures_offset = _rewrite(outputs.ledger, ledger_lines, layout.temp_dir(slice_id))
    # Damaged lines first, named by their file's name, then damaged whole files by their path.
    damage = [d.describe(d.path.name) for d in outputs.captions.damage if not d.whole_file]
    damage += [f"{outputs.ledger.path.name} {item}" for item in outputs.ledger.damage]
    damage += [d.describe(str(d.path)) for d in outputs.captions.damage if d.whole_file]
    repair = {"time": time.time(), "file": str(layout.checkpoint_file(slice_id).relative_to(layout.root)),
              "found": why, "damage": damage[:20], "rows_done": intervals_of(done)}
    checkpoint = SliceCheckpoint(slice=slice_id, num_slices=num_slices, start=start, stop=start + len(keys),
                                 done=intervals_of(done), failures_offset=failures_offset, status="stopped",
                                 stop_reason="index rebuilt by verify --repair", repairs=[repair])
    checkpoint.set_outcomes(outputs.outcomes(done))
    checkpoint.record_output_state(output_state)
    if checkpoint.complete:  # as the worker would have finished it
        checkpoint.status = "done"
        write_atomic(layout.end_marker(slice_id), f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    else:
        layout.end_marker(slice_id).unlink(missing_ok=True)
    checkpoint.save(layout.checkpoint_file(slice_id))
    return checkpoint
