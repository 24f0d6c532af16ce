"""`vlm_hpc.status` and submit's own reports without Slurm: the overall line, waiting kill files, a resubmit hint
that runs as printed, `--watch` ending when nothing moves any more, and submit writing nothing of a run that was
not submitted. (Slurm states, "killed" and KillWait: tests/test_slurm.py, on the real cluster.)"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from builders import make_dataset, png, write_config
from vlm_hpc.config import load_config
from vlm_hpc.run.slice_run import run_slice
from vlm_hpc.status import collect, overall_line

ROOT = Path(__file__).parent.parent


def status(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlm_hpc.status", *args], capture_output=True, text=True,
                          timeout=120)


def test_status_names_waiting_kill_files_and_a_resubmit_command_that_runs_as_printed(
        golden_model_dir: Path, tmp_path: Path, shared_engine) -> None:
    data = make_dataset(tmp_path / "data", [(f"k{i}", png(i), f"web {i}") for i in range(6)])
    output = tmp_path / "out"
    config = write_config(tmp_path / "my config.yaml", golden_model_dir, data, output, worker={"loader_workers": 0})
    # A submission that ran slice 0 here; slices 1 and 2 never ran, and slice 2 has a kill file waiting.
    submitted = subprocess.run([sys.executable, "-m", "vlm_hpc.submit", "--config", str(config), "--array", "0",
                                "--num-slices", "3", "--cluster", "local", "--wait", "worker.loader_workers=0"],
                               capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert "submitted slice 0 (of 3) on local" in submitted.stdout, submitted.stdout
    assert "progress: " in submitted.stdout and "finished in " in submitted.stdout, submitted.stdout
    assert f"check it: python -m vlm_hpc.verify {shlex.quote(str(output))}" in submitted.stdout
    (output / "kill2.txt").touch()
    shown = status(str(output))
    assert shown.returncode == 0, shown.stderr
    assert f"waiting kill file: {output / 'kill2.txt'}" in shown.stdout
    assert "total: 2/6 rows (33.3%): 2 captioned, 0 failed; slices: 1 done, 2 pending" in shown.stdout, shown.stdout
    hint = shown.stdout.split("resubmit what is incomplete: ", 1)[1].splitlines()[0]
    assert shlex.split(hint) == ["python", "-m", "vlm_hpc.submit", "--config", str(config.resolve()), "--array",
                                 "1-2", "--num-slices", "3", "--cluster", "local", "worker.loader_workers=0"]
    # As printed (from another folder): it submits what is incomplete, and says the kill file is waiting.
    again = subprocess.run([sys.executable, *shlex.split(hint)[1:], "--wait"], capture_output=True, text=True,
                           timeout=600, cwd=ROOT)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"note: {output / 'kill2.txt'} is waiting" in again.stdout
    statuses = {s.slice: s for s in collect(output)[0]}
    assert statuses[1].state == "done" and statuses[2].state == "stopped" and statuses[2].eta_s is None
    assert not (output / "kill2.txt").exists()


def test_status_watch_ends_once_no_slice_can_move(golden_model_dir: Path, tmp_path: Path, shared_engine) -> None:
    data = make_dataset(tmp_path / "data", [(f"k{i}", png(i), f"web {i}") for i in range(4)])
    output = tmp_path / "out"
    config = load_config(write_config(tmp_path / "c.yaml", golden_model_dir, data, output,
                                      worker={"loader_workers": 0}))
    for slice_id in range(2):
        assert run_slice(config, slice_id, 2, engine_factory=shared_engine).status == "done"
    watched = status(str(output), "--watch", "0.1")
    assert watched.returncode == 0, watched.stderr
    assert watched.stdout.count("total: ") == 1  # ended at the first look: every slice is done
    assert "every slice is done: 4/4 rows (100.0%)" in watched.stdout
    assert f"check it: python -m vlm_hpc.verify {output}" in watched.stdout
    statuses, num_rows = collect(output)
    assert overall_line(statuses, num_rows) == "4/4 rows (100.0%): 4 captioned, 0 failed; slices: 2 done"


def test_a_submission_that_fails_its_checks_writes_nothing(golden_model_dir: Path, tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", [(f"k{i}", png(i), f"web {i}") for i in range(4)])
    output = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", golden_model_dir, data, output)
    refused = subprocess.run([sys.executable, "-m", "vlm_hpc.submit", "--config", str(config), "--array", "0-1",
                              "--cluster", "slurm"], capture_output=True, text=True, timeout=300,
                             env={"PATH": f"{tmp_path}:/usr/bin:/bin", "SLURM_CONF": str(tmp_path / "none.conf")})
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "no Slurm controller answers here" in lines[0], refused.stderr
    assert lines[0].endswith("--array 0-1 --cluster local"), lines[0]
    assert not output.exists()
