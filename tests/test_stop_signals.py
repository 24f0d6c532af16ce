"""Stop and requeue signals count from the worker's first instant: before torch imports, and while the model loads."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from builders import committed_rows, slice_state, slow_dataset, start_worker, wait_for, write_config
from vlm_hpc.run.stop import StopRequest, record_stop_signals

OUTCOMES = {signal.SIGUSR2: (3, "requeued", "time_limit"), signal.SIGTERM: (0, "stopped", "sigterm")}


def log_text(output: Path) -> str:
    log = output / "logs" / "slice_00000.log"
    return log.read_text() if log.exists() else ""


@pytest.mark.parametrize("number", [signal.SIGUSR2, signal.SIGTERM], ids=["sigusr2", "sigterm"])
@pytest.mark.parametrize("when", ["imports", "model_load"])
def test_a_stop_signal_before_the_model_runs_stops_or_requeues_the_slice(
        number: int, when: str, golden_model_dir: Path, tmp_path: Path) -> None:
    data = slow_dataset(tmp_path / "data", 20)
    output = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", golden_model_dir, data, output)
    process = start_worker(config)
    try:
        if when == "imports":  # torch and transformers are still importing: nothing is set up yet
            time.sleep(0.3)
        else:  # the start line comes right before the model loads
            wait_for(lambda: " start: " in log_text(output) or process.poll() is not None, 180, "the start line")
        os.killpg(process.pid, number)  # as Slurm signals a task: every process of it
        _, stderr = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    code, status, reason = OUTCOMES[number]
    assert process.returncode == code, stderr
    state = slice_state(output)
    assert (state["status"], state["stop_reason"]) == (status, reason)
    assert committed_rows(output) == 0 and "computed rows=" not in log_text(output)
    assert json.loads((output / "state" / "slice_00000.lease").read_text())["released"]


def test_signals_recorded_before_install_are_acted_on_in_order() -> None:
    previous = {number: signal.getsignal(number) for number in (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)}
    try:
        record_stop_signals()
        signal.raise_signal(signal.SIGUSR2)  # the time-limit warning...
        signal.raise_signal(signal.SIGTERM)  # ...and the time limit's own SIGTERM: still a requeue
        before_install = time.monotonic()
        stop = StopRequest(None, grace_seconds=30)
        stop.install()
        stop.install()  # a second install (the caller's, then run_slice's) changes nothing
        assert stop.requested and (stop.reason, stop.requeue) == ("time_limit", True)
        assert stop.deadline is not None and stop.deadline <= before_install + 30  # counted from the signal
        stop.uninstall()
        assert signal.getsignal(signal.SIGUSR2) is not stop._on_signal
        fresh = StopRequest(None, grace_seconds=30)
        fresh.install()  # nothing left over from the first one
        assert not fresh.requested
        fresh.uninstall()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def test_slice_job_restores_the_handlers_it_found(golden_model_dir: Path, tmp_path: Path) -> None:
    """submitit's array tasks: SliceJob installs its StopRequest before run_slice, and afterwards submitit's
    own handlers (its USR2 requeue) are back in place. The debug executor runs the task in this process."""
    from vlm_hpc.cluster.array_spec import parse_array
    from vlm_hpc.config import load_config
    from vlm_hpc.submit import submit

    output = tmp_path / "out"
    config = load_config(write_config(tmp_path / "c.yaml", golden_model_dir, slow_dataset(tmp_path / "data", 4),
                                      output))
    output.mkdir()
    (output / "kill0.txt").touch()  # a stop before the task starts: no model is loaded

    def submitit_handler(_number, _frame) -> None:
        raise AssertionError("a stand-in for submitit's handler was called")
    previous = {number: signal.signal(number, submitit_handler) for number in (signal.SIGUSR2, signal.SIGTERM)}
    try:
        jobs = submit(config, parse_array("0"), 1, "debug")
        summary = jobs[0].result()
        assert (summary["status"], summary["reason"]) == ("stopped", "kill_file")
        assert signal.getsignal(signal.SIGUSR2) is submitit_handler
        assert signal.getsignal(signal.SIGTERM) is submitit_handler
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
