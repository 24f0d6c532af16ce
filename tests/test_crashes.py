"""Crashes are reported where a user looks: the slice log gets the reason (and the traceback of anything but a
VlmHpcError), the index and status say it, and an error a resubmission repeats (the config, the model folder,
a device the node lacks) is marked "will crash again" and kept out of the plain resubmit hint."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from builders import noise_dataset, slice_state, start_worker, write_config
from vlm_hpc import status, submit
from vlm_hpc.config import DataSection, load_config
from vlm_hpc.engines.base import Engine
from vlm_hpc.errors import VlmHpcError
from vlm_hpc.run.checkpoint import WILL_CRASH_AGAIN
from vlm_hpc.run.readers import Row, RowReader
from vlm_hpc.run.slice_run import run_slice

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this node has CUDA: model.device=cuda is fine here")
AGAIN = f"{WILL_CRASH_AGAIN}: "


def log_of(output: Path, slice_id: int = 0) -> str:
    return (output / "logs" / f"slice_{slice_id:05d}.log").read_text()


def status_json(output: Path) -> dict:
    result = subprocess.run([sys.executable, "-m", "vlm_hpc.status", str(output), "--json"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@no_cuda
def test_cuda_on_a_node_without_it_is_one_line_before_the_lease_and_the_slice_log_and_status_say_so(
        golden_model_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", golden_model_dir, noise_dataset(tmp_path / "data", 3), output)
    worker = start_worker(config, 0, 1, "model.device=cuda")
    _, stderr = worker.communicate(timeout=300)
    assert worker.returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model.device is cuda, but this node ("), stderr
    assert "has no CUDA device" in lines[0] and lines[0].endswith("set model.device=auto (the GPU where there is "
                                                                  "one) or model.device=cpu")
    log = log_of(output)
    assert f"| crashed: {AGAIN}{lines[0].removeprefix('error: ')}\n" in log and "Traceback" not in log, log
    # Refused before the lease and the index: the slice was never taken, and nothing of it was written.
    assert [path.name for path in (output / "state").iterdir()] == []
    report = status_json(output)
    assert report["slices"][0]["state"] == "crashed" and report["slices"][0]["will_crash_again"]
    assert report["slices"][0]["reason"].startswith(f"{AGAIN}model.device is cuda")
    assert (report["resubmit"], report["fix_first"]) == ("", "0")
    # Fixed, the same slice runs (model.device is not pinned), and its status is news again.
    rerun = start_worker(config, 0, 1, "model.device=cpu")
    _, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    assert status_json(output)["slices"][0]["state"] == "done" and slice_state(output)["status"] == "done"


@no_cuda
def test_submit_refuses_cuda_for_tasks_on_this_node_in_one_line(golden_model_dir: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    output = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", golden_model_dir, noise_dataset(tmp_path / "data", 3), output)
    capsys.readouterr()  # what building the dataset printed
    assert submit.main(["--config", str(config), "--array", "0", "--cluster", "local", "model.device=cuda"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1
    assert captured.err.startswith("error: model.device is cuda, but this node (")
    assert not (output / "manifest.json").exists() and not (output / "submissions.jsonl").exists()


class FallingOverEngine(Engine):
    """An engine whose accelerator fails on the first batch, as a node's hardware fault would."""

    @classmethod
    def from_config(cls, config) -> FallingOverEngine:
        return cls()

    def caption(self, tiles, settings=None, poll=None):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def prompt(self, num_tiles: int) -> str:
        return f"prompt of {num_tiles} tiles"

    def describe(self) -> dict[str, str]:
        return {"device": "falling over"}


def test_a_crash_logs_its_traceback_and_status_resubmits_it_but_not_a_slice_that_would_crash_again(
        golden_model_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    config = load_config(write_config(tmp_path / "c.yaml", golden_model_dir, noise_dataset(tmp_path / "data", 6),
                                      output, worker={"loader_workers": 0}))
    with pytest.raises(RuntimeError):
        run_slice(config, 0, 2, engine_factory=lambda _: FallingOverEngine())
    reason = "RuntimeError: CUDA error: an illegal memory access was encountered"
    state = slice_state(output, 0)
    assert (state["status"], state["stop_reason"], state["will_crash_again"]) == ("crashed", reason, False)
    log = log_of(output, 0)
    after = log.split(f"| crashed: {reason}\n", 1)[1]  # the traceback follows the line status reads
    assert after.startswith("Traceback (most recent call last):\n") and "in caption" in after, log
    assert after.rstrip().endswith(reason)
    # Slice 1 is started with a pinned setting changed: refused before its lease, whatever node it runs on.
    changed = load_config(write_config(tmp_path / "d.yaml", golden_model_dir, tmp_path / "data", output,
                                       generation={"max_new_tokens": 5}))
    with pytest.raises(VlmHpcError) as refusal:
        run_slice(changed, 1, 2, engine_factory=lambda _: FallingOverEngine())
    assert f"| crashed: {AGAIN}{refusal.value}\n" in log_of(output, 1)
    statuses, rows = status.collect(output)
    assert [(s.state, s.reason, s.will_crash_again) for s in statuses] == [
        ("crashed", reason, False), ("crashed", f"{AGAIN}{refusal.value}", True)]
    shown = status.render(statuses, rows).splitlines()
    assert shown[-2] == "resubmit what is incomplete: python -m vlm_hpc.submit --config CONFIG --array 0"
    assert shown[-1] == "crashed on an error a resubmission repeats (their reason says what to fix); once fixed: " \
                        "python -m vlm_hpc.submit --config CONFIG --array 1"


def test_a_model_folder_that_does_not_load_is_recorded_as_crashing_again(golden_model_dir: Path,
                                                                         tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(golden_model_dir, model)
    config_json = json.loads((model / "config.json").read_text())
    config_json["llm_config"]["intermediate_size"] = 96  # the weights are 128 wide: found only when loading
    (model / "config.json").write_text(json.dumps(config_json))
    output = tmp_path / "out"
    config = load_config(write_config(tmp_path / "c.yaml", model, noise_dataset(tmp_path / "data", 3), output))
    with pytest.raises(VlmHpcError) as error:
        run_slice(config, 0, 1)
    assert str(error.value).startswith("model: ") and "has shape" in str(error.value)
    state = slice_state(output)
    assert (state["status"], state["stop_reason"], state["will_crash_again"]) == \
        ("crashed", f"{AGAIN}{error.value}", True)
    assert f"| crashed: {AGAIN}{error.value}\n" in log_of(output) and "Traceback" not in log_of(output)
    assert status_json(output)["fix_first"] == "0"


class UnreadableShardReader(RowReader):
    """Rows whose later part is on a shard that cannot be read: the error happens in a loader process."""

    format = "unreadable_shard"

    def __init__(self, config: DataSection) -> None:
        super().__init__(config, 6)

    def describe(self) -> str:
        return "an input with an unreadable shard"

    def _read(self, start: int, stop: int) -> list[Row]:
        if stop > 2:
            raise ValueError(f"shard 1 of rows [{start}, {stop}) is unreadable: bad magic number")
        return [Row(row, f"row_{row}", None, None) for row in range(start, stop)]

    def _key_array(self, start: int, stop: int) -> pa.Array:
        return pa.array([f"row_{row}" for row in range(start, stop)], pa.string())

    def _image_sizes(self, start: int, stop: int) -> np.ndarray:
        return np.full(stop - start, -1, np.int64)


def test_a_worker_whose_loader_process_fails_ends_with_that_error_and_its_own_exception_line(
        golden_model_dir: Path, tmp_path: Path) -> None:
    """The loader's processes ignore stop signals, SIGTERM included; the traceback that held the loader kept them,
    and the worker waited for them at exit forever."""
    output = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", golden_model_dir, tmp_path, output,
                          data={"format": UnreadableShardReader.format}, generation={"batch_size": 2},
                          worker={"loader_workers": 1, "commit_seconds": 0})
    # The worker command with this file's reader registered, as a plugin would register one.
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_crashes; "
            "from vlm_hpc.run.readers import register_reader; from vlm_hpc import worker; "
            "register_reader(test_crashes.UnreadableShardReader); sys.exit(worker.main(sys.argv[1:]))")
    process = subprocess.Popen([sys.executable, "-c", code, "--config", str(config), "--slice", "0", "--num-slices",
                                "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    reason = "ValueError: shard 1 of rows [2, 4) is unreadable: bad magic number"
    assert process.returncode == 1 and stderr.rstrip().endswith(reason), stderr  # Python's traceback, as any bug's
    state = slice_state(output)
    assert (state["status"], state["stop_reason"], state["will_crash_again"]) == ("crashed", reason, False), state
    assert sum(b - a for a, b in state["done"]) == 2  # the rows before it are committed
    assert status.collect(output)[0][0].reason == reason
    assert f"| crashed: {reason}\n" in log_of(output)
