"""Every Slurm command vlm_hpc runs (squeue, scontrol) and the one spelling of an array task's id.

Each call degrades to what its caller can live with when Slurm cannot be asked (no command on PATH, a
timeout): the callers decide liveness, status and splitting from these answers, so the commands, timeouts
and parsing here are part of their behaviour (tests/test_slurm.py runs them against a real cluster).
"""

from __future__ import annotations

import re
import shutil
import subprocess

DEFAULT_MAX_ARRAY_SIZE = 1001  # Slurm's own default, assumed when the cluster's cannot be read

# States in which Slurm still runs, or will run, a task: its lease holder may be alive.
_LIVE_STATES = ("RUNNING", "PENDING", "CONFIGURING", "COMPLETING", "SUSPENDED")
# States of a task Slurm ended against its will: a worker that recorded no stop was killed.
KILLED_STATES = ("CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
                 "DEADLINE")


def task_id(job_id: str | None, array_job_id: str | None, array_task_id: str | None) -> str | None:
    """The id `squeue -j`, `scancel` and `scontrol requeue` take: ARRAYJOB_TASK for an array task, else the job id."""
    if array_job_id and array_task_id:
        return f"{array_job_id}_{array_task_id}"
    return job_id


def array_job_of(task: str) -> str:
    """The array job of a task id ("123_4" -> "123"); a plain job id is its own."""
    return task.split("_")[0]


def task_alive(task: str) -> bool:
    """Whether Slurm still runs (or will run) this task; True when Slurm cannot be asked."""
    if not shutil.which("squeue"):
        return True
    try:
        result = subprocess.run(["squeue", "-h", "-j", task, "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return True
    if result.returncode != 0:
        return "Invalid job id" not in result.stderr
    return any(state in result.stdout for state in _LIVE_STATES)


def task_states(tasks: set[str]) -> dict[str, str]:
    """One squeue call for all the array jobs of `tasks`: {"A_t": STATE}; {} when Slurm cannot be asked."""
    return array_task_states({array_job_of(task) for task in tasks})


def array_task_states(arrays: set[str]) -> dict[str, str]:
    """One squeue call for every task of `arrays` (pending ones one by one): {"A_t": STATE}; {} when Slurm
    cannot be asked."""
    if not arrays or not shutil.which("squeue"):
        return {}
    try:
        result = subprocess.run(["squeue", "-h", "-r", "--states=all", "-j", ",".join(sorted(arrays)), "-o", "%i|%T"],
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    states = {}
    for line in result.stdout.splitlines():
        job, _, state = line.partition("|")
        states[job.strip()] = state.strip()
    return states


def _config_value(name: str) -> str | None:
    """One value of `scontrol show config`; None when it cannot be read."""
    try:
        result = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(rf"^{name}\s*=\s*(\S+)", result.stdout, re.MULTILINE)
    return match.group(1) if match else None


def max_array_size() -> int:
    """The cluster's MaxArraySize (largest array index + 1); Slurm's default 1001 when it cannot be read."""
    value = _config_value("MaxArraySize")
    return int(value) if value and value.isdigit() else DEFAULT_MAX_ARRAY_SIZE


def kill_wait() -> int | None:
    """The cluster's KillWait: seconds between a task's SIGTERM and its SIGKILL; None when it cannot be read."""
    value = _config_value("KillWait")
    return int(value) if value and value.isdigit() else None


def controller_problem() -> str | None:
    """Why no Slurm controller answers here (`scontrol ping`), None when one does."""
    try:
        result = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return "scontrol is not on PATH"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"scontrol ping: {exc}"
    if result.returncode == 0 and " is UP" in result.stdout:
        return None
    said = (result.stderr.strip() or result.stdout.strip() or f"exit code {result.returncode}").splitlines()
    return f"scontrol ping: {said[0] if said else ''}"


def requeue(task: str | None) -> str:
    """Ask Slurm to requeue this task (it restarts with the same index and resumes); returns what happened."""
    if not task:
        return "not under Slurm: nothing to requeue; run the same command again to resume"
    result = subprocess.run(["scontrol", "requeue", task], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        return f"scontrol requeue {task} failed: {result.stderr.strip() or result.stdout.strip()}"
    return f"requeued Slurm task {task}"
