"""Reading a slice's committed outputs back: which rows have an intact caption (read by the run's output format,
`run.outputs`) or failure-ledger line, and what is damaged where. The resume check (`repair`), `verify` and
`verify --repair` all read through here; nothing in this module writes.

An append-only file (captions/slice_I.jsonl, failures/slice_I.jsonl) is intact up to its committed offset
when every line there ends in a newline and is a valid record. Damage is described per line, with its byte
range, so that a report names exactly what was lost.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from vlm_hpc.run.checkpoint import SliceCheckpoint
from vlm_hpc.run.failures import OutcomeCounts, outcome_of

if TYPE_CHECKING:  # the output formats build on this module's scans
    from vlm_hpc.run.outputs.base import CommittedCaptions, OutputFormat, SliceKeys

NUL, NEWLINE = b"\0", b"\n"
RecordCheck = Callable[[object], "str | None"]


def ledger_line_problem(record: object) -> str | None:
    """What is wrong with a failure-ledger record `{"row", "key", "outcome", "reason", "detail", "captioned",
    "time"}` ("outcome" is absent from ledgers written before it was)."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    if not is_row(record.get("row")):
        return "row is missing or not a non-negative integer"
    if not isinstance(record.get("reason"), str):
        return "reason is missing or not a string"
    if not isinstance(record.get("captioned"), bool):
        return "captioned is missing or not true/false"
    if "outcome" in record and record["outcome"] != outcome_of(record["captioned"], record["reason"]):
        return f"outcome {record['outcome']!r:.40} disagrees with captioned {str(record['captioned']).lower()}"
    if not isinstance(record.get("key"), (str, type(None))):
        return "key is not a string"
    return None


def is_row(value: object) -> bool:
    """Whether a record's `row` is a row number."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def parse_record(data: bytes, check: RecordCheck) -> tuple[dict | None, str | None]:
    """One JSON record from bytes: (record, None) or (None, what is wrong)."""
    if NUL in data:
        return None, "NUL bytes"
    try:
        record = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return None, f"invalid UTF-8 at byte {exc.start}"
    except json.JSONDecodeError as exc:
        return None, f"not JSON ({exc.msg})"
    problem = check(record)
    return (None, problem) if problem else (record, None)


@dataclass(frozen=True)
class Line:
    """An intact record of an append-only file and the bytes it occupies (newline included)."""

    start: int
    end: int
    record: dict


@dataclass
class AppendOnlyFile:
    """The committed region of one append-only file as it is on disk."""

    path: Path
    committed: int  # the size the index recorded (or the file's size, when no index says)
    size: int  # the file's size on disk (0 when it is missing)
    data: bytes  # its first min(size, committed) bytes
    lines: list[Line] = field(default_factory=list)
    damage: list[str] = field(default_factory=list)  # what is wrong, one item per damaged line or gap

    @property
    def damaged(self) -> bool:
        return bool(self.damage)


def damage_hint(path: Path, committed: int, expected_lines: int | None) -> str | None:
    """Cheap check of a committed region (one read, no parsing but the last line): why it looks damaged, or None."""
    if committed == 0:
        return None
    try:
        with open(path, "rb") as handle:
            data = handle.read(committed)
    except FileNotFoundError:
        return f"missing, {committed} bytes committed"
    if len(data) < committed:
        return f"{len(data)} bytes, shorter than the {committed} committed"
    if not data.endswith(b"\n"):
        return "the last committed line is torn (no newline at the committed offset)"
    if NUL in data:
        return f"NUL bytes at byte {data.index(NUL)}"
    lines = data.count(NEWLINE)
    if expected_lines is not None and lines != expected_lines:
        return f"{lines} lines, {expected_lines} committed"
    last = data[data.rfind(b"\n", 0, len(data) - 1) + 1: -1]
    _, problem = parse_record(last, lambda record: None if isinstance(record, dict) else "not an object")
    return f"the last committed line is damaged: {problem}" if problem else None


def scan_append_only(path: Path, committed: int | None, check: RecordCheck) -> AppendOnlyFile:
    """Every line of the committed region (the whole file when `committed` is None): intact ones, and damage."""
    try:
        with open(path, "rb") as handle:
            data = handle.read() if committed is None else handle.read(committed)
            size = max(len(data), handle.seek(0, 2))
    except FileNotFoundError:
        data, size = b"", 0
    scan = AppendOnlyFile(path, len(data) if committed is None else committed, size, data)
    position, number = 0, 0
    while position < len(data):
        number += 1
        newline = data.find(b"\n", position)
        end = len(data) if newline < 0 else newline + 1
        record, problem = parse_record(data[position:end - (newline >= 0)], check)
        if newline < 0:
            problem = "torn (no newline)" + (f", {problem}" if problem else "")
        if problem:
            scan.damage.append(f"line {number} (bytes {position}-{end}): {problem}")
        else:
            scan.lines.append(Line(position, end, record))
        position = end
    if scan.size < scan.committed:
        scan.damage.append(f"{scan.size} bytes on disk, {scan.committed} committed: the end is lost")
    return scan


@dataclass
class SliceOutputs:
    """What a slice's committed outputs say, row by row: its captions (in the run's output format) and its ledger."""

    captions: CommittedCaptions
    ledger: AppendOnlyFile
    failed: set[int]  # rows with an intact ledger line and no caption
    ledger_lines: dict[int, Line]  # the ledger line kept for each row
    foreign_lines: list[str]  # intact lines for no row of this slice (a key that is not the row's)
    repeated_lines: list[str]  # intact lines for a row that already has one

    @property
    def captioned(self) -> set[int]:
        """Rows with an intact caption."""
        return self.captions.rows

    def outcomes(self, rows: Iterable[int]) -> OutcomeCounts:
        """`rows` by outcome, as the worker counted them when it committed them: a caption, with the reason of
        its ledger line if that says captioned (a warning), or a failure with its reason."""
        counts = OutcomeCounts()
        for row in rows:
            line = self.ledger_lines.get(row)
            reason = line.record["reason"] if line is not None else None
            if row in self.captioned:
                # A ledger line saying "not captioned" beside a caption is no warning: the caption is what counts.
                warning = reason if line is not None and line.record["captioned"] else None
                counts.add(outcome_of(True, warning), warning)
            elif row in self.failed:
                counts.add("failed", reason)
        return counts


def read_slice_outputs(output: OutputFormat, rows: SliceKeys, checkpoint: SliceCheckpoint | None) -> SliceOutputs:
    """Read the slice of `output` (its `rows`) back, up to what `checkpoint` committed (None: whole files)."""
    captions = output.read(rows, checkpoint)
    ledger = scan_append_only(output.layout.failures_file(output.slice_id),
                              None if checkpoint is None else checkpoint.failures_offset, ledger_line_problem)
    ledger_lines: dict[int, Line] = {}
    foreign, repeated = list(captions.foreign), list(captions.repeated)
    for line in ledger.lines:
        row = line.record["row"]
        where = f"{ledger.path.name} bytes {line.start}-{line.end}"
        if not rows.start <= row < rows.stop:
            foreign.append(f"{where}: row {row} is not in this slice")
        elif row in ledger_lines:
            repeated.append(f"{where}: row {row} again")
        else:
            ledger_lines[row] = line
    failed = {row for row, line in ledger_lines.items() if not line.record["captioned"] and row not in captions.records}
    return SliceOutputs(captions, ledger, failed, ledger_lines, foreign, repeated)
