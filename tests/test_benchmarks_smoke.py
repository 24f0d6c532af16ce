"""The benchmarks' CPU smoke modes, so that they keep running; no timing is asserted (numbers go to
benchmarks/RESULTS.md, measured by hand)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from golden import GOLDEN

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600)


def test_preprocess_benchmark_checks_identity_on_the_golden_images() -> None:
    result = run(str(BENCHMARKS / "preprocess.py"), "--images", str(GOLDEN / "images"), "--max-num", "6",
                 "--repeats", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].endswith("identical=yes")


def test_overhead_benchmark_runs(tmp_path: Path) -> None:
    result = run(str(BENCHMARKS / "overhead.py"), "--rows", "300", "--resume-rows", "2000", "--json",
                 str(tmp_path / "o.json"))
    assert result.returncode == 0, result.stderr
    assert "rows/s" in result.stdout and (tmp_path / "o.json").exists()


def test_engine_benchmark_smoke_mode(tmp_path: Path) -> None:
    result = run(str(BENCHMARKS / "engine.py"), "--smoke", "--json", str(tmp_path / "e.json"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "e.json").exists() and "vs base" in result.stdout


def test_shards_benchmark_smoke_mode(tmp_path: Path) -> None:
    result = run(str(BENCHMARKS / "shards.py"), "--smoke", "--json", str(tmp_path / "s.json"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "s.json").exists()
    assert result.stdout.strip().splitlines()[-1].startswith("50 shards: last slice opens ")
