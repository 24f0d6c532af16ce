"""vlm_hpc.cluster.slurm without a cluster: task ids, and the squeue/scontrol answers parsed from stand-in commands
(tests/test_slurm.py runs the same calls against a real one)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vlm_hpc.cluster import slurm


def fake_command(folder: Path, name: str, script: str) -> None:
    path = folder / name
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)


@pytest.fixture
def bin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir()
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    return folder


def test_task_ids_are_written_and_read_one_way() -> None:
    assert slurm.task_id("900", "123", "4") == "123_4"
    assert slurm.task_id("900", None, None) == "900"
    assert slurm.task_id(None, None, None) is None
    assert slurm.array_job_of("123_4") == "123" and slurm.array_job_of("900") == "900"


def test_task_states_asks_once_per_array_and_parses_its_lines(bin_dir: Path, tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    fake_command(bin_dir, "squeue", f'echo "$@" >> {calls}\nprintf "123_4|RUNNING\\n123_5 | PENDING\\n"')
    assert slurm.task_states({"123_4", "123_5"}) == {"123_4": "RUNNING", "123_5": "PENDING"}
    assert calls.read_text().splitlines() == ["-h -r --states=all -j 123 -o %i|%T"]


def test_task_alive_reads_the_state_and_an_unknown_job(bin_dir: Path) -> None:
    fake_command(bin_dir, "squeue", 'echo "COMPLETING"')
    assert slurm.task_alive("123_4")
    fake_command(bin_dir, "squeue", 'echo "COMPLETED"')
    assert not slurm.task_alive("123_4")
    fake_command(bin_dir, "squeue", 'echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1')
    assert not slurm.task_alive("123_4")
    fake_command(bin_dir, "squeue", 'echo "Unable to contact slurm controller" >&2; exit 1')
    assert slurm.task_alive("123_4")  # Slurm cannot be asked: assume the holder lives


def test_max_array_size_reads_scontrol_or_falls_back(bin_dir: Path) -> None:
    fake_command(bin_dir, "scontrol", 'printf "MailProg = /bin/mail\\nMaxArraySize            = 4\\n"')
    assert slurm.max_array_size() == 4
    fake_command(bin_dir, "scontrol", "exit 1")
    assert slurm.max_array_size() == slurm.DEFAULT_MAX_ARRAY_SIZE


def test_requeue_reports_what_happened(bin_dir: Path) -> None:
    assert slurm.requeue(None).startswith("not under Slurm")
    fake_command(bin_dir, "scontrol", "exit 0")
    assert slurm.requeue("123_4") == "requeued Slurm task 123_4"
    fake_command(bin_dir, "scontrol", 'echo "Job is pending" >&2; exit 1')
    assert slurm.requeue("123_4") == "scontrol requeue 123_4 failed: Job is pending"


def test_kill_wait_and_the_controller_are_read_from_scontrol(bin_dir: Path) -> None:
    fake_command(bin_dir, "scontrol", 'if [ "$1" = ping ]; then echo "Slurmctld(primary) at vm is UP"; '
                                      'else printf "KillWait                = 5 sec\\n"; fi')
    assert slurm.kill_wait() == 5 and slurm.controller_problem() is None
    fake_command(bin_dir, "scontrol", 'echo "scontrol: fatal: Could not establish a configuration source" >&2; exit 1')
    assert slurm.kill_wait() is None
    assert slurm.controller_problem() == "scontrol ping: scontrol: fatal: Could not establish a configuration source"
