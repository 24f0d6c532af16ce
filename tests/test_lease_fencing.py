"""Exactly-once against live but late lease holders: a suspended holder, two starts in one Slurm job, a
heartbeat that cannot write. "Another host" is a real second UTS namespace (`unshare --uts`, root only)."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builders import committed_rows, noise_dataset, slice_state, slow_dataset, stop, wait_for, write_config
from vlm_hpc.config import load_config
from vlm_hpc.run.slice_run import run_slice
from vlm_hpc.verify import verify

needs_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("setpriv"),
                                reason="needs root with unshare and setpriv (a second host name, dropped capabilities)")

ROWS = 40


def start(config: Path, log: Path, host: str | None = None, env: dict[str, str] | None = None,
          no_dac_override: bool = False) -> subprocess.Popen:
    """`python -m vlm_hpc.worker` on slice 0 in its own process group; `host` runs it under another host name,
    `no_dac_override` as root without the right to ignore file permissions."""
    command = [sys.executable, "-m", "vlm_hpc.worker", "--config", str(config), "--slice", "0", "--num-slices", "1"]
    if host:
        command = ["unshare", "--uts", "sh", "-c", f'hostname {host} && exec "$0" "$@"', *command]
    if no_dac_override:
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(log, "w"), text=True,
                            start_new_session=True, env={**os.environ, **(env or {})})


def read_captions(output: Path) -> dict[str, str]:
    captions = {path.stem: json.loads(path.read_text())["vlm_caption"] for path in (output / "captions").glob("*.json")}
    for path in (output / "captions").glob("*.jsonl"):
        captions.update((r["key"], r["vlm_caption"]) for r in map(json.loads, path.read_text().splitlines()))
    return captions


@pytest.fixture(scope="module")
def reference(golden_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The dataset and its captions from one uninterrupted greedy run."""
    folder = tmp_path_factory.mktemp("fencing")
    data = noise_dataset(folder / "data", ROWS)
    config = load_config(write_config(folder / "c.yaml", golden_model_dir, data, folder / "out",
                                      generation={"batch_size": 2, "max_new_tokens": 6}, worker={"loader_workers": 0}))
    assert run_slice(config, 0, 1).status == "done"
    return data, read_captions(folder / "out")


def _progress_rows(log_text: str) -> list[int]:
    return [int(n) for n in re.findall(r"\| rows (\d+)/", log_text)]


@needs_root
@pytest.mark.slow
@pytest.mark.parametrize("output_format", ["json", "jsonl"])
def test_a_suspended_holder_resumed_after_a_takeover_commits_nothing(
        output_format: str, golden_model_dir: Path, tmp_path: Path, reference) -> None:
    data, expected = reference
    rng = random.Random(f"sigstop-{output_format}")
    for trial in range(5):
        output = tmp_path / f"out{trial}"
        config = write_config(tmp_path / f"c{trial}.yaml", golden_model_dir, data, output,
                              output={"format": output_format}, generation={"batch_size": 2, "max_new_tokens": 6},
                              worker={"commit_seconds": 0, "heartbeat_seconds": 0.5, "stale_lease_seconds": 3})
        holder_log, newcomer_log = tmp_path / f"a{trial}.err", tmp_path / f"b{trial}.err"
        holder = start(config, holder_log, host="node-a")
        newcomer = None
        try:
            wait_for(lambda: committed_rows(output) >= 2 + rng.randrange(8), 120, "the holder's first commits")
            for _attempt in range(3):
                time.sleep(rng.uniform(0, 0.4))
                os.killpg(holder.pid, signal.SIGSTOP)  # scontrol suspend: the whole task
                time.sleep(3.5)  # past stale_lease_seconds
                newcomer = start(config, newcomer_log)
                wait_for(lambda: "took over the slice lease" in newcomer_log.read_text() or newcomer.poll() is not None,
                         120, "the newcomer to take over or refuse")
                if newcomer.poll() is None:
                    break
                # It refused: the holder was suspended holding the lease lock (mid-commit); let it go on.
                assert ".lock: held" in newcomer_log.read_text(), newcomer_log.read_text()
                os.killpg(holder.pid, signal.SIGCONT)
            else:
                pytest.fail("the holder was suspended mid-commit three times")
            wait_for(lambda: " start: " in newcomer_log.read_text(), 60, "the newcomer's start line")
            taken_at = int(re.search(r"(\d+) already done", newcomer_log.read_text()).group(1))
            time.sleep(rng.uniform(0, 2))
            os.killpg(holder.pid, signal.SIGCONT)
            assert holder.wait(timeout=120) == 0, holder_log.read_text()
            assert newcomer.wait(timeout=300) == 0, newcomer_log.read_text()
        finally:
            for process in (holder, newcomer):
                if process is not None and process.poll() is None:
                    os.killpg(process.pid, signal.SIGCONT)
                    stop(process)
        holder_text = holder_log.read_text()
        assert "stopping: another worker took over this slice" in holder_text, holder_text
        assert max(_progress_rows(holder_text), default=0) <= taken_at  # no commit after the takeover
        report = verify(output)
        assert report.ok and report.captioned == ROWS, report
        assert read_captions(output) == expected
        assert slice_state(output)["status"] == "done"


def test_two_workers_in_one_slurm_job_refuse_each_other(golden_model_dir: Path, tmp_path: Path) -> None:
    data = slow_dataset(tmp_path / "data", 300)
    output = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", golden_model_dir, data, output, generation={"batch_size": 2})
    same_job = {"SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "0"}  # two sruns in one allocation
    first = start(config, tmp_path / "first.err", env=same_job)
    try:
        wait_for(lambda: committed_rows(output) > 0, 120, "the first worker's first commit")
        second = start(config, tmp_path / "second.err", env=same_job)
        assert second.wait(timeout=120) == 2
        lines = (tmp_path / "second.err").read_text().strip().splitlines()
        assert len(lines) == 1 and "being worked on" in lines[0] and f"pid {first.pid}" in lines[0], lines
        assert first.poll() is None
    finally:
        stop(first, signal.SIGTERM)
    assert slice_state(output)["status"] == "stopped" and verify(output).lost == []


@needs_root
def test_a_heartbeat_failing_for_a_few_seconds_lets_nobody_take_over(golden_model_dir: Path, tmp_path: Path) -> None:
    data = slow_dataset(tmp_path / "data", 300)
    output = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", golden_model_dir, data, output, generation={"batch_size": 2},
                          worker={"heartbeat_seconds": 0.5, "stale_lease_seconds": 8, "commit_seconds": 3600,
                                  "commit_rows": 100000})
    holder = start(config, tmp_path / "holder.err", no_dac_override=True)
    state_dir = output / "state"
    try:
        wait_for(lambda: "computed rows=" in (tmp_path / "holder.err").read_text(), 120, "the holder's first batch")
        state_dir.chmod(0o555)  # the heartbeat's atomic rewrite now fails with EACCES
        time.sleep(2.5)  # under heartbeat_failure_seconds (half of stale_lease_seconds)
        state_dir.chmod(0o755)
        time.sleep(9)  # longer than stale_lease_seconds: a heartbeat that died would be stale now
        lease = json.loads((state_dir / "slice_00000.lease").read_text())
        assert time.time() - lease["heartbeat"] < 8, lease
        other_host = start(config, tmp_path / "other.err", host="node-b")
        assert other_host.wait(timeout=120) == 2, (tmp_path / "other.err").read_text()
        assert "being worked on" in (tmp_path / "other.err").read_text()
        assert holder.poll() is None
    finally:
        state_dir.chmod(0o755)
        stop(holder, signal.SIGTERM)
    assert "lease heartbeat failed" in (tmp_path / "holder.err").read_text()
    assert holder.returncode == 0 and slice_state(output)["status"] == "stopped"
