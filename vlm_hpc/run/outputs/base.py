"""The output-format protocol: how a slice's captions are stored, made durable, and read back.

The writer (`run.writer`) owns the commit: it hands a batch's captions to the format (`stage`), makes whatever
whole files the format returns durable together with the batch's sample images, appends the failure ledger,
and then records the batch in the slice index together with the format's own index state. Everything a format
does happens inside the writer's lease fence. The failure ledger and the sample images are common to every
format and stay in the writer.

The read side (`read`) serves verify, the repair on resume, `verify --repair` and an export: the intact
captions of a slice, row by row, and what is damaged where. Adding a format is one file with a subclass of
`OutputFormat` plus one line in `outputs/__init__.py`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from vlm_hpc.run.checkpoint import SliceCheckpoint
from vlm_hpc.run.committed import AppendOnlyFile, Line
from vlm_hpc.run.layout import OutputLayout

# The index fields a format owns, by name, with the values to record at the commit (jsonl: captions_offset).
IndexState = Mapping[str, int]


@dataclass(frozen=True)
class CaptionRecord:
    """One captioned row as every format stores it."""

    row: int
    key: str
    web_caption: str | None
    vlm_caption: str


@dataclass(frozen=True)
class StagedBatch:
    """A batch's captions in a format's hands: whole files still to be renamed into place (the writer makes them
    durable in one go with the batch's sample images) and the index state to record at the commit point."""

    files: list[tuple[Path, bytes]] = field(default_factory=list)
    checkpoint_state: IndexState = field(default_factory=dict)


@dataclass(frozen=True)
class Damage:
    """A damaged part of a slice's committed captions: a line of an append-only file, or a whole file."""

    path: Path
    problem: str  # "line 3 (bytes 10-20): NUL bytes", or what is wrong with the whole file
    whole_file: bool = False

    def describe(self, name: str) -> str:
        """The damage as reports print it, the file called `name`."""
        return f"{name}: {self.problem}" if self.whole_file else f"{name} {self.problem}"


@dataclass(frozen=True)
class SliceKeys:
    """The rows of one slice as its outputs name them: row `start + i` has key `keys[i]`."""

    start: int
    keys: list[str | None]
    duplicate_rows: Mapping[str, int]  # manifest.duplicate_rows: str(row) -> the row that owns its key

    @property
    def stop(self) -> int:
        return self.start + len(self.keys)

    def key(self, row: int) -> str | None:
        return self.keys[row - self.start] if self.start <= row < self.stop else None

    def owns_key(self, row: int) -> bool:
        """Whether `row` may have a caption of its own: it has a key and no earlier row has the same one."""
        return bool(self.key(row)) and str(row) not in self.duplicate_rows


@dataclass
class CommittedCaptions:
    """What a slice's caption outputs hold, as read back."""

    records: dict[int, CaptionRecord]  # each row with an intact caption (its first one)
    damage: list[Damage] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)  # intact captions for no row of this slice
    repeated: list[str] = field(default_factory=list)  # intact captions of a row that already has one
    # A format that appends to one file per slice gives its scan and the line of each row in `records`, so that
    # a repair can cut the file back to the lines of the rows it keeps.
    appended: AppendOnlyFile | None = None
    lines: dict[int, Line] = field(default_factory=dict)

    @property
    def rows(self) -> set[int]:
        return set(self.records)


class OutputFormat(ABC):
    """How one slice's captions are stored. Subclasses set `name` (the `output.format` config value)."""

    name: ClassVar[str]

    def __init__(self, layout: OutputLayout, slice_id: int) -> None:
        self.layout = layout
        self.slice_id = slice_id

    # Write side: called by the writer inside the lease fence.

    @abstractmethod
    def recover(self, checkpoint: SliceCheckpoint) -> None:
        """Bring the slice's caption files back to what `checkpoint` committed (a resume after a crash)."""

    @abstractmethod
    def stage(self, records: Sequence[CaptionRecord], checkpoint: SliceCheckpoint) -> StagedBatch:
        """Write `records` (maybe none) durably, or return them as whole files for the writer to rename into place;
        the returned index state is recorded when the batch commits, and nothing is committed before that."""

    # Read side: nothing here writes.

    @abstractmethod
    def read(self, rows: SliceKeys, checkpoint: SliceCheckpoint | None) -> CommittedCaptions:
        """The slice's intact captions and their damage, up to what `checkpoint` committed (None: read all).
        Captions of rows the checkpoint does not mark done may be among them (a batch written just before a crash)."""

    def committed_captions(self, rows: SliceKeys, checkpoint: SliceCheckpoint) -> Iterator[CaptionRecord]:
        """The committed captions of the slice in row order (for an export)."""
        captions = self.read(rows, checkpoint)
        for row in sorted(captions.records):
            if checkpoint.is_done(row):
                yield captions.records[row]

    def append_only_files(self) -> list[Path]:
        """The slice's caption files that only grow (a fresh index would cut their committed lines away)."""
        return []

    def has_outputs(self, rows: SliceKeys) -> bool:
        """Whether the slice wrote any caption (then an absent index was lost, not never written)."""
        return any(path.exists() and path.stat().st_size > 0 for path in self.append_only_files())

    def damage_hints(self, checkpoint: SliceCheckpoint) -> dict[Path, str]:
        """A cheap check on resume: the caption files that look damaged, with why; a full `read` follows."""
        return {}

    def appended_state(self, size: int) -> IndexState:
        """The index state once a repair cut `appended` to `size` bytes (formats with an append-only file)."""
        return {}

    @classmethod
    def orphans(cls, layout: OutputLayout, keys: set[str]) -> list[str]:
        """Caption files of the whole run that belong to no key of the dataset (verify); paths as strings."""
        return []
