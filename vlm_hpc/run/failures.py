"""What happened to a row, in one vocabulary for the failure ledger (`failures/slice_{I}.jsonl`), the slice
index, the worker's log, submit, status and verify: its outcome, and for a row in the ledger its reason.

The ledger is read by people and scripts (and `verify` counts its rows), so a new reason is added here, with
what it means, before any code writes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Outcome = Literal[
    "captioned",  # a caption, nothing in the ledger
    "warned",  # a caption, and a ledger line whose reason says what to know about it ("captioned with a warning")
    "failed",  # no caption; the ledger line's reason says why
]

FailureReason = Literal[
    "missing",  # the image cell is empty (None)
    "not_downloaded",  # img2dataset's status is not success (a failed download or resize): its error_message
    "empty",  # the image has zero bytes
    "undecodable",  # not an image, a corrupt header or pixel data, a zero dimension, truncated beyond repair
    "too_many_pixels",  # over the decompression-bomb limit (preprocess.decode.MAX_PIXELS)
    "truncated",  # cut short: captioned like the original (rest black, a warning), or failed with skip_truncated
    "missing_key",  # the key cell is empty
    "duplicate_key",  # an earlier row has the same key and is captioned
    "out_of_memory",  # out of GPU memory even alone at the fewest tiles
    "empty_caption",  # the model produced no text
]


def outcome_of(captioned: bool, reason: str | None) -> Outcome:
    """The outcome of a row with or without a caption, and with its ledger reason (None: not in the ledger)."""
    if not captioned:
        return "failed"
    return "captioned" if reason is None else "warned"


@dataclass
class OutcomeCounts:
    """Rows by outcome, counted the same way wherever they are shown: `captioned` includes the warned rows, and
    every ledger row is counted under its reason, as a warning (captioned) or a failure."""

    captioned: int = 0
    failed: int = 0
    warned_by_reason: dict[str, int] = field(default_factory=dict)
    failed_by_reason: dict[str, int] = field(default_factory=dict)

    def add(self, outcome: Outcome, reason: str | None = None) -> None:
        """Count one row."""
        if outcome == "failed":
            self.failed += 1
        else:
            self.captioned += 1
        by_reason = {"warned": self.warned_by_reason, "failed": self.failed_by_reason}.get(outcome)
        if by_reason is not None:
            by_reason[str(reason)] = by_reason.get(str(reason), 0) + 1

    def merge(self, other: OutcomeCounts) -> None:
        """Add every count of `other` to these."""
        self.captioned += other.captioned
        self.failed += other.failed
        for mine, theirs in ((self.warned_by_reason, other.warned_by_reason),
                             (self.failed_by_reason, other.failed_by_reason)):
            for reason, count in theirs.items():
                mine[reason] = mine.get(reason, 0) + count

    def describe(self) -> str:
        """The counts as one phrase: 12 captioned (2 with a warning: truncated), 3 failed (2 undecodable, 1 empty)."""
        warned = sum(self.warned_by_reason.values())
        text = f"{self.captioned} captioned"
        if warned:
            reasons = (next(iter(self.warned_by_reason)) if len(self.warned_by_reason) == 1
                       else _by_reason(self.warned_by_reason))
            text += f" ({warned} with a warning: {reasons})"
        text += f", {self.failed} failed"
        return text + (f" ({_by_reason(self.failed_by_reason)})" if self.failed_by_reason else "")


def _by_reason(counts: dict[str, int]) -> str:
    """Counts by reason, most frequent first: 2 undecodable, 1 missing."""
    return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])))
