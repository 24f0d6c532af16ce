"""The README's quick start, as a new user runs it: the demo job array on submitit's local executor, then verify."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_the_demo_array_runs_to_a_verified_output_and_a_second_run_submits_nothing(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "vlm_hpc.submit", "--config", "configs/demo.yaml", "--array", "0-3",
               "--cluster", "local", "--wait", f"output.dir={tmp_path / 'demo'}"]
    assert "bash scripts/setup.sh && .venv/bin/python -m vlm_hpc.submit --config configs/demo.yaml --array 0-3 " \
           "--cluster local --wait" in (ROOT / "README.md").read_text()
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    assert [f"slice {i}: done" in first.stdout for i in range(4)] == [True] * 4, first.stdout
    verified = subprocess.run([sys.executable, "-m", "vlm_hpc.verify", str(tmp_path / "demo")], capture_output=True,
                              text=True, timeout=300)
    assert verified.returncode == 0 and verified.stdout.strip().endswith("OK"), verified.stdout
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "nothing to submit" in again.stdout, again.stdout + again.stderr
