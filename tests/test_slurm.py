"""Submit, watch, stop and requeue on a real single-node Slurm cluster (slurm/cluster.sh).

Needs the Debian Slurm packages (cluster.sh installs them when run as root). Without them these tests skip
on a laptop, and fail in CI (CI=true), where they must run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builders import slow_dataset, wait_for, write_config
from golden import GOLDEN
from vlm_hpc.cluster.slurm import KILLED_STATES
from vlm_hpc.config import load_config
from vlm_hpc.run.slice_run import run_slice
from vlm_hpc.status import collect, resubmit_indices
from vlm_hpc.verify import verify

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    """A throw-away cluster for this module; its SLURM_CONF and sacct stand-in are put in os.environ."""
    if not shutil.which("slurmctld") and os.geteuid() != 0:
        message = ("Slurm is not installed and installing it needs root "
                   "(apt-get install slurmctld slurmd slurm-client munge)")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    folder = tmp_path_factory.mktemp("slurm")
    # MaxArraySize 4: --array beyond index 3 must be split into several arrays.
    up = subprocess.run(["bash", str(ROOT / "slurm" / "cluster.sh"), "up", str(folder), "--max-array-size", "4"],
                        capture_output=True, text=True)
    if up.returncode != 0:
        pytest.fail(f"slurm/cluster.sh up failed:\n{up.stdout}\n{up.stderr}")
    saved = {name: os.environ.get(name) for name in ("SLURM_CONF", "PATH")}
    os.environ["SLURM_CONF"] = str(folder / "etc" / "slurm.conf")
    os.environ["PATH"] = f"{folder / 'bin'}:{os.environ['PATH']}"
    try:
        yield folder
    finally:
        subprocess.run(["bash", str(ROOT / "slurm" / "cluster.sh"), "down", str(folder)], capture_output=True)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def submit(config: Path, array: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlm_hpc.submit", "--config", str(config), "--array", array, *extra],
                          capture_output=True, text=True, timeout=300)


def states(output: Path) -> dict[int, str]:
    return {s.slice: s.state for s in collect(output)[0]}


def wait_until_done(output: Path, slices, timeout: float) -> None:
    wait_for(lambda: all(states(output).get(i) == "done" for i in slices), timeout, f"slices {slices} done", 1.0)


def squeue_all(job: str) -> str:
    return subprocess.run(["squeue", "-h", "-r", "--states=all", "-j", job, "-o", "%i|%T|%r"],
                          capture_output=True, text=True).stdout


def test_demo_array_runs_each_task_on_its_own_gpu_and_matches_a_local_run(slurm: Path, golden_model_dir: Path,
                                                                          tmp_path: Path) -> None:
    output = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", golden_model_dir, GOLDEN / "dataset", output,
                          slurm={"cpus_per_task": 1, "mem_gb": None, "time_min": 10})
    result = submit(config, "0-3")
    assert result.returncode == 0, result.stderr
    job = re.search(r"job (\d+)", result.stdout).group(1)
    wait_until_done(output, range(4), 300)
    logs = [(output / "logs" / f"slice_{i:05d}.log").read_text() for i in range(4)]
    devices = [re.search(r"Slurm job (\d+_\d+).*CUDA_VISIBLE_DEVICES=(\S+)", log).groups() for log in logs]
    assert [task for task, _ in devices] == [f"{job}_{i}" for i in range(4)]
    assert sorted(gpu for _, gpu in devices) == ["0", "1", "2", "3"]
    assert verify(output).ok
    local = tmp_path / "local"
    local_config = load_config(config, [f"output.dir={local}"])
    for slice_id in range(4):
        run_slice(local_config, slice_id, 4)
    read = lambda folder: {p.name: p.read_text() for p in (folder / "captions").glob("*.json")}  # noqa: E731
    assert read(output) == read(local) and len(read(output)) == 15
    again = submit(config, "0-3")
    assert again.returncode == 0 and "nothing to submit" in again.stdout
    changed = submit(config, "0-3", "data.limit=10")
    assert changed.returncode == 2 and "belongs to another run" in changed.stderr


def test_scancel_stops_one_slice_gracefully_and_resubmitting_finishes_only_it(slurm: Path, golden_model_dir: Path,
                                                                              tmp_path: Path) -> None:
    output = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", golden_model_dir, slow_dataset(tmp_path / "data", 48), output,
                          generation={"batch_size": 2}, worker={"grace_seconds": 3, "loader_workers": 1},
                          slurm={"cpus_per_task": 1, "mem_gb": None, "time_min": 20})
    result = submit(config, "0-3")
    assert result.returncode == 0, result.stderr
    # KillWait is 5 s on the test cluster: a grace of 3 s would leave too little to commit before the SIGKILL.
    assert "worker.grace_seconds: 3 s lowered to 2 s for this submission" in result.stdout, result.stdout
    job = re.search(r"job (\d+)", result.stdout).group(1)
    checkpoint = output / "state" / "slice_00002.json"
    wait_for(lambda: checkpoint.exists() and json.loads(checkpoint.read_text())["done"], 300, "slice 2 to commit")
    assert states(output)[2] == "running"
    cancelled = time.monotonic()
    subprocess.run(["scancel", f"{job}_2"], check=True)
    wait_for(lambda: json.loads(checkpoint.read_text())["status"] != "running", 30, "slice 2 to stop")
    assert time.monotonic() - cancelled < 5  # before KillWait (5 s on the test cluster)
    state = json.loads(checkpoint.read_text())
    assert state["status"] == "stopped" and state["stop_reason"] == "sigterm"
    assert "stop requested (sigterm): the batch in flight gets 2 s" in (output / "logs" / "slice_00002.log").read_text()
    assert 0 < sum(b - a for a, b in state["done"]) < 12
    wait_until_done(output, [0, 1, 3], 600)
    time.sleep(8)  # past the scheduler's requeue latency: a requeued task would be back by now
    assert "CANCELLED" in squeue_all(f"{job}_2") and state["attempts"] == 1
    assert json.loads(checkpoint.read_text())["status"] == "stopped"
    assert states(output)[2] == "stopped"
    again = submit(config, "0-3")
    assert again.returncode == 0, again.stderr
    assert "submitted slice 2 (of 4)" in again.stdout and again.stdout.count("skip slice") == 3
    wait_until_done(output, [2], 600)
    assert verify(output).ok


def test_a_task_killed_without_a_stop_record_is_killed_in_status_at_once(slurm: Path, golden_model_dir: Path,
                                                                         tmp_path: Path) -> None:
    output = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", golden_model_dir, slow_dataset(tmp_path / "data", 40), output,
                          generation={"batch_size": 2}, slurm={"cpus_per_task": 1, "mem_gb": None, "time_min": 20})
    result = submit(config, "0-1")
    assert result.returncode == 0, result.stderr
    job = re.search(r"job (\d+)", result.stdout).group(1)
    checkpoint = output / "state" / "slice_00001.json"
    wait_for(lambda: checkpoint.exists() and json.loads(checkpoint.read_text())["done"], 300, "slice 1 to commit")
    # The worker SIGKILLed mid-batch, as KillWait's SIGKILL or the OOM killer does: it records nothing.
    os.kill(json.loads((output / "state" / "slice_00001.lease").read_text())["pid"], signal.SIGKILL)
    # COMPLETING: Slurm is still ending it (a graceful stop looks the same then); status says "running" until
    wait_for(lambda: not re.search("RUNNING|COMPLETING", squeue_all(f"{job}_1")), 60, "Slurm to end the task")
    found = {s.slice: s for s in collect(output)[0]}[1]  # one look, long before the heartbeat is stale
    assert found.state == "killed" and json.loads(checkpoint.read_text())["status"] == "running"
    assert found.reason.startswith(f"Slurm {found.slurm}; last log line: ") and found.slurm in KILLED_STATES
    shown = subprocess.run([sys.executable, "-m", "vlm_hpc.status", str(output)], capture_output=True, text=True)
    assert "killed" in shown.stdout and "--array 1" in shown.stdout.split("resubmit what is incomplete: ")[1]
    subprocess.run(["scancel", job])


def test_an_sbatch_refusal_is_one_line_and_fixes_nothing_of_the_run(slurm: Path, golden_model_dir: Path,
                                                                    tmp_path: Path) -> None:
    output = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", golden_model_dir, GOLDEN / "dataset", output,
                          slurm={"cpus_per_task": 1, "time_min": 10})
    refused = submit(config, "0-7", "slurm.mem_gb=100000")
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: sbatch refused the array: sbatch: error: "), refused.stderr
    assert "slurm.mem_gb=100000" in lines[0] and "slurm.cpus_per_task=1" in lines[0]
    assert not (output / "manifest.json").exists() and not list(output.rglob("*.pkl"))
    # Fixed, the same folder takes another slicing: nothing of the refused submission was kept.
    accepted = submit(config, "0-3", "slurm.mem_gb=null")
    assert accepted.returncode == 0, accepted.stderr
    wait_until_done(output, range(4), 300)
    assert json.loads((output / "manifest.json").read_text())["num_slices"] == 4


def test_the_sbatch_template_runs_on_the_cluster_and_status_sees_its_queued_tasks(slurm: Path, golden_model_dir: Path,
                                                                                   tmp_path: Path) -> None:
    output = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", golden_model_dir, slow_dataset(tmp_path / "data", 9), output,
                          slurm={"cpus_per_task": 1, "mem_gb": None, "time_min": 10})
    # One task at a time (%1): while slice 0 runs, slices 1 and 2 wait in Slurm's queue.
    submitted = subprocess.run(["bash", str(ROOT / "sbatch_templates" / "caption_array.sbatch"), "--array=0-2%1",
                                str(config)], capture_output=True, text=True, timeout=120,
                               env={**os.environ, "VLM_HPC_PYTHON": sys.executable})
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job = re.search(r"Submitted batch job (\d+)", submitted.stdout).group(1)
    wait_for(lambda: (output / "state" / "slice_00000.json").exists(), 300, "slice 0 to start")
    shown = collect(output)[0]
    queued = {s.slice for s in shown if s.slurm == "PENDING"}
    if queued:  # slice 0 not finished yet: its queued siblings are known (the worker's record), not resubmittable
        assert queued <= {1, 2} and not queued & set(resubmit_indices(shown)), shown
    wait_until_done(output, range(3), 600)
    assert verify(output).ok
    assert sorted(p.name for p in (output / "logs").glob("sbatch_*.out")) == [f"sbatch_{job}_{i}.out" for i in range(3)]
    assert all(f"{job}_" in line for line in (output / "submissions.jsonl").read_text().splitlines())


def test_time_limit_commits_requeues_the_same_index_and_completes(slurm: Path, golden_model_dir: Path,
                                                                   tmp_path: Path) -> None:
    # 2-minute limit, warning 60 s before: Slurm's 30 s tick delivers it 30-60 s into each run, and the slice
    # holds well over a minute of work, so it must be requeued at least once before it can finish.
    output = tmp_path / "out"
    rows = 2 * 1000
    config = write_config(tmp_path / "c.yaml", golden_model_dir, slow_dataset(tmp_path / "data", rows), output,
                          generation={"batch_size": 4}, worker={"grace_seconds": 3},
                          slurm={"cpus_per_task": 1, "mem_gb": None, "time_min": 2, "signal_delay_s": 60})
    result = submit(config, "1", "--num-slices", "2")
    assert result.returncode == 0, result.stderr
    job = re.search(r"job (\d+)", result.stdout).group(1)
    seen: list[str] = []  # slice 1's state as status reports it, polled throughout

    def done() -> bool:
        state = states(output).get(1)
        if not seen or seen[-1] != state:
            seen.append(state)
        return state == "done"
    wait_for(done, 900, "slice 1 done", 0.5)
    assert seen.index("running") < seen.index("requeued") < seen.index("done"), seen
    log = (output / "logs" / "slice_00001.log").read_text()
    assert f"Slurm job {job}_1 (restart 0)" in log and f"Slurm job {job}_1 (restart 1)" in log
    assert "requeued (time_limit)" in log
    state = json.loads((output / "state" / "slice_00001.json").read_text())
    assert state["attempts"] >= 2 and state["status"] == "done"
    report = verify(output)
    assert report.captioned == rows // 2 and not (report.lost or report.duplicate or report.corrupt)
    assert states(output) == {0: "pending", 1: "done"}  # only slice 1 was submitted


def test_array_beyond_max_array_size_is_split_with_offsets(slurm: Path, golden_model_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", golden_model_dir, GOLDEN / "dataset", output,
                          slurm={"cpus_per_task": 1, "mem_gb": None, "time_min": 10})
    result = submit(config, "2-5", "--num-slices", "6")
    assert result.returncode == 0, result.stderr
    first, second = re.search(r"job (\d+), (\d+)", result.stdout).groups()
    wait_until_done(output, [2, 3, 4, 5], 300)
    tasks = {i: re.search(r"Slurm job (\d+_\d+)", (output / "logs" / f"slice_{i:05d}.log").read_text()).group(1)
             for i in range(2, 6)}
    assert tasks == {2: f"{first}_2", 3: f"{first}_3", 4: f"{second}_0", 5: f"{second}_1"}
    assert states(output) == {0: "pending", 1: "pending", 2: "done", 3: "done", 4: "done", 5: "done"}
