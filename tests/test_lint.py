"""`ruff check` is clean on the package, the tests and the benchmarks (rules in pyproject's [tool.ruff])."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def ruff() -> list[str]:
    """The ruff beside this Python (the test extra installs it), else the one on PATH."""
    beside = Path(sys.executable).with_name("ruff")
    if beside.exists():
        return [str(beside)]
    if shutil.which("ruff"):
        return ["ruff"]
    pytest.fail("ruff is not installed; install the test extra: pip install -e '.[test]'")


def test_ruff_check_is_clean() -> None:
    result = subprocess.run([*ruff(), "check", "--no-cache", "vlm_hpc", "tests", "benchmarks"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
