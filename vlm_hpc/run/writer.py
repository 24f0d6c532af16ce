"""Committing a batch: captions, sample images and failure-ledger lines made durable, then the index advanced.

`commit_batch` is the only writer of caption outputs; how captions are stored is the output format's
(`run.outputs`: json renames a file per caption into place, jsonl appends to the slice's file and has the index
record its committed size, so a resumed slice cuts off whatever an interrupted append left). The failure ledger
and the sample images are the same for every format and written here. Every write of the slice's outputs and
index is fenced by the slice lease: it happens under the lease lock, after checking that this worker still
holds the lease, so a worker that lost its lease (suspended, late) writes nothing.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from vlm_hpc.run.checkpoint import SliceCheckpoint
from vlm_hpc.run.durable import append_durable, truncate_to, write_atomic, write_many_atomic
from vlm_hpc.run.failures import Outcome, OutcomeCounts, outcome_of
from vlm_hpc.run.layout import OutputLayout
from vlm_hpc.run.lease import SliceLease
from vlm_hpc.run.outputs.base import CaptionRecord, OutputFormat


@dataclass(frozen=True)
class RowOutcome:
    """What happened to one row: a caption, or a failure reason (a truncated image has both)."""

    row: int
    key: str | None
    web_caption: str | None
    vlm_caption: str | None = None
    failure: str | None = None  # reason tag for the ledger
    detail: str = ""
    sample: tuple[bytes, str] | None = None  # (original bytes, file extension) for the sample folder

    @property
    def outcome(self) -> Outcome:
        return outcome_of(self.vlm_caption is not None, self.failure)

    def ledger_line(self) -> dict:
        """The row's failure-ledger record ("captioned" is what readers go by; "outcome" says it in words)."""
        return {"row": self.row, "key": self.key, "outcome": self.outcome, "reason": self.failure,
                "detail": self.detail, "captioned": self.vlm_caption is not None, "time": time.time()}


class SliceWriter:
    """Writes one slice's outputs in its output format."""

    def __init__(self, layout: OutputLayout, slice_id: int, output: OutputFormat, lease: SliceLease) -> None:
        self.layout = layout
        self.slice_id = slice_id
        self.output = output
        self.lease = lease
        self.temp_dir = layout.temp_dir(slice_id)

    def save_checkpoint(self, checkpoint: SliceCheckpoint) -> None:
        """Rewrite the slice checkpoint (status changes), fenced by the lease."""
        with self.lease.fenced():
            checkpoint.save(self.layout.checkpoint_file(self.slice_id))

    def write_fenced(self, path: Path, data: bytes) -> None:
        """Write a file of this slice's (end marker, stamp) atomically, fenced by the lease."""
        with self.lease.fenced():
            write_atomic(path, data)

    def recover(self, checkpoint: SliceCheckpoint) -> None:
        """Cut append-only files back to what the index says was committed; drop half-written files."""
        if self.temp_dir.exists():
            shutil.rmtree(self.temp_dir)
        self.temp_dir.mkdir(parents=True)
        self.output.recover(checkpoint)
        truncate_to(self.layout.failures_file(self.slice_id), checkpoint.failures_offset)

    def commit_batch(self, outcomes: list[RowOutcome], checkpoint: SliceCheckpoint, seconds: float) -> None:
        """Make every output of the batch durable, then record the batch in the index (the commit point);
        raises LeaseLost, writing nothing, when another worker holds the slice now."""
        with self.lease.fenced():
            self._commit_batch(outcomes, checkpoint, seconds)

    def _commit_batch(self, outcomes: list[RowOutcome], checkpoint: SliceCheckpoint, seconds: float) -> None:
        captioned = [o for o in outcomes if o.vlm_caption is not None]
        records = [CaptionRecord(o.row, o.key, o.web_caption, o.vlm_caption) for o in captioned]
        staged = self.output.stage(records, checkpoint)
        files = list(staged.files)
        samples = [o for o in outcomes if o.sample is not None and o.key is not None]
        files += [(self.layout.sample_image(o.key, o.sample[1]), o.sample[0]) for o in samples]
        if files:
            write_many_atomic(files, self.temp_dir)
        failures_offset = checkpoint.failures_offset
        ledger = [o.ledger_line() for o in outcomes if o.failure is not None]
        if ledger:
            text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in ledger)
            failures_offset = append_durable(self.layout.failures_file(self.slice_id), text.encode(), failures_offset)
        counts = OutcomeCounts()
        for o in outcomes:
            counts.add(o.outcome, o.failure)
        self.lease.confirm()  # again right before the commit point (the lock makes it a formality)
        checkpoint.commit(self.layout.checkpoint_file(self.slice_id), [o.row for o in outcomes], counts,
                          output_state=staged.checkpoint_state, failures_offset=failures_offset,
                          samples=len(samples), seconds=seconds)
