"""`ruff check` is clean on the package, the tests and the benchmarks (rules in pyproject's [tool.ruff]); no tracked
file names a path that exists only on the machine it was written on."""

from __future__ import annotations

import os
import re
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


def test_no_tracked_file_names_a_path_of_this_machine() -> None:
    """Folders under /work, /root or /home belong to one machine; a clone names its neighbours relatively (the lab
    notes are ../shared/notes/ beside it). Binary files (weights, tokenizer models, Arrow data) are not read."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, timeout=60)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    machine_path = re.compile(rb"(?<![\w.~/-])/(?:work|root|home)/")
    found = []
    for name in filter(None, listed.stdout.split(b"\0")):
        path = ROOT / os.fsdecode(name)
        data = path.read_bytes() if path.is_file() else b""
        if b"\0" not in data[:8192]:
            found += [f"{os.fsdecode(name)}:{number}" for number, line in enumerate(data.splitlines(), 1)
                      if machine_path.search(line)]
    assert found == []
