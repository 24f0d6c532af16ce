"""Where the golden set is (data produced by the original code), and how its JSON files are read.

It defaults to tests/fixtures/golden (a copy of the visible set); point VLM_HPC_GOLDEN at another set produced
by the same recipe to run every exactness test against it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = Path(os.environ.get("VLM_HPC_GOLDEN", FIXTURES / "golden"))


def load_golden(name: str) -> dict:
    """A JSON file of the golden set, by its path inside the set."""
    return json.loads((GOLDEN / name).read_text())
