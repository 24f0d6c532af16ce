"""The vocabularies written as types are the ones the code uses: every reason written to the failure ledger is
a FailureReason, and every status written to an index is a CheckpointStatus."""

from __future__ import annotations

import re
from pathlib import Path
from typing import get_args

from vlm_hpc.run.checkpoint import CheckpointStatus
from vlm_hpc.run.failures import FailureReason

SOURCES = Path(__file__).parent.parent / "vlm_hpc"


def written(pattern: str) -> set[str]:
    found: set[str] = set()
    for path in SOURCES.rglob("*.py"):
        found.update(re.findall(pattern, path.read_text()))
    return found


def test_every_ledger_reason_in_the_code_is_in_the_vocabulary() -> None:
    reasons = (written(r'ImageRejected\(\s*"(\w+)"') | written(r'failure="(\w+)"')
               | written(r'prepared\.failure, prepared\.detail(?:, prepared\.truncated)? = "(\w+)"'))
    assert reasons and reasons <= set(get_args(FailureReason)), reasons - set(get_args(FailureReason))


def test_every_recorded_status_in_the_code_is_in_the_vocabulary() -> None:
    statuses = written(r'\.status(?:, [\w.]+)* = "(\w+)"') | written(r'status="(\w+)"')
    assert statuses and statuses <= set(get_args(CheckpointStatus)), statuses - set(get_args(CheckpointStatus))
