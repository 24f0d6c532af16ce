"""output.format jsonl (for millions of rows): one append-only file per slice, captions/slice_{I}.jsonl, a line
`{"key", "web_caption", "vlm_caption", "row"}` per caption. The index records the file's committed size in
`captions_offset`; a resume cuts off whatever an interrupted append left beyond it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from vlm_hpc.run.checkpoint import SliceCheckpoint
from vlm_hpc.run.committed import damage_hint, is_row, scan_append_only
from vlm_hpc.run.durable import append_durable, truncate_to
from vlm_hpc.run.outputs.base import (
    CaptionRecord,
    CommittedCaptions,
    Damage,
    IndexState,
    OutputFormat,
    SliceKeys,
    StagedBatch,
)
from vlm_hpc.run.outputs.json_files import caption_body_problem


def caption_line_problem(record: object) -> str | None:
    """What is wrong with a captions jsonl record `{"key", "web_caption", "vlm_caption", "row"}`."""
    problem = caption_body_problem(record)
    if problem is None and not isinstance(record.get("key"), str):
        problem = "key is missing or not a string"
    if problem is None and not is_row(record.get("row")):
        problem = "row is missing or not a non-negative integer"
    return problem


class JsonlFile(OutputFormat):
    """captions/slice_{I}.jsonl, appended and fsynced per batch."""

    name = "jsonl"

    @property
    def path(self) -> Path:
        return self.layout.caption_jsonl(self.slice_id)

    def recover(self, checkpoint: SliceCheckpoint) -> None:
        truncate_to(self.path, checkpoint.captions_offset)

    def stage(self, records: Sequence[CaptionRecord], checkpoint: SliceCheckpoint) -> StagedBatch:
        if not records:
            return StagedBatch()
        lines = "".join(json.dumps({"key": r.key, "web_caption": r.web_caption, "vlm_caption": r.vlm_caption,
                                    "row": r.row}, ensure_ascii=False) + "\n" for r in records)
        return StagedBatch(checkpoint_state=self.appended_state(
            append_durable(self.path, lines.encode(), checkpoint.captions_offset)))

    def read(self, rows: SliceKeys, checkpoint: SliceCheckpoint | None) -> CommittedCaptions:
        committed = None if checkpoint is None else checkpoint.captions_offset
        scan = scan_append_only(self.path, committed, caption_line_problem)
        captions = CommittedCaptions(records={}, damage=[Damage(scan.path, item) for item in scan.damage],
                                     appended=scan)
        for line in scan.lines:
            row, key = line.record["row"], line.record["key"]
            where = f"{scan.path.name} bytes {line.start}-{line.end}"
            if rows.key(row) != key:  # a row outside the slice has no key
                captions.foreign.append(f"{where}: key {key!r} is not row {row} of this slice")
            elif row in captions.lines:
                captions.repeated.append(f"{where}: row {row} (key {key!r}) again")
            else:
                captions.lines[row] = line
                captions.records[row] = CaptionRecord(row, key, line.record["web_caption"], line.record["vlm_caption"])
        return captions

    def append_only_files(self) -> list[Path]:
        return [self.path]

    def damage_hints(self, checkpoint: SliceCheckpoint) -> dict[Path, str]:
        hint = damage_hint(self.path, checkpoint.captions_offset, checkpoint.captions)
        return {self.path: hint} if hint else {}

    def appended_state(self, size: int) -> IndexState:
        return {"captions_offset": size}
