"""I/O errors on the output folder: a full disk (a real, small tmpfs) and a folder the worker may not write
(root without CAP_DAC_OVERRIDE): one line, the slice marked crashed with the reason, no temporary file left."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from builders import committed_rows, noise_dataset, slice_state, wait_for, write_config
from vlm_hpc.verify import verify

needs_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                                reason="needs root (mount a tmpfs; setpriv to drop CAP_DAC_OVERRIDE)")


def start(config: Path, no_dac_override: bool = False) -> subprocess.Popen:
    command = [sys.executable, "-m", "vlm_hpc.worker", "--config", str(config), "--slice", "0", "--num-slices", "1"]
    if no_dac_override:
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def fill(disk: Path) -> Path:
    """Write one file until the file system is full."""
    filler = disk / "filler"
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass
    return filler


def status_of(output: Path) -> dict:
    result = subprocess.run([sys.executable, "-m", "vlm_hpc.status", str(output), "--json"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["slices"][0]


def assert_one_error_line(stderr: str, *words: str) -> None:
    assert "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: output: ") and all(word in last for word in words), last


@needs_root
def test_a_full_disk_is_one_line_and_a_crashed_status_and_the_next_run_finishes(golden_model_dir: Path,
                                                                                tmp_path: Path) -> None:
    data = noise_dataset(tmp_path / "data", 120)
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], check=True)
    try:
        output = disk / "out"
        config = write_config(tmp_path / "c.yaml", golden_model_dir, data, output,
                              generation={"batch_size": 2, "max_new_tokens": 6}, worker={"commit_seconds": 0})
        worker = start(config)
        wait_for(lambda: committed_rows(output) >= 6, 120, "a few commits")
        filler = fill(disk)
        _, stderr = worker.communicate(timeout=120)
        assert worker.returncode == 2, stderr
        assert_one_error_line(stderr, "disk full (ENOSPC)", "df -h")
        state = status_of(output)
        assert state["state"] == "crashed" and "disk full (ENOSPC)" in state["reason"], state
        filler.unlink()
        rerun = start(config)
        _, stderr = rerun.communicate(timeout=300)
        assert rerun.returncode == 0, stderr
        assert slice_state(output)["status"] == "done" and verify(output).ok
        assert list(output.rglob("*.tmp")) == []
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@needs_root
def test_a_folder_that_cannot_be_written_is_one_line_and_a_crashed_status(golden_model_dir: Path,
                                                                          tmp_path: Path) -> None:
    data = noise_dataset(tmp_path / "data", 80)
    output = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", golden_model_dir, data, output,
                          generation={"batch_size": 2, "max_new_tokens": 6}, worker={"commit_seconds": 0})
    worker = start(config, no_dac_override=True)
    try:
        wait_for(lambda: committed_rows(output) >= 4, 120, "a few commits")
        (output / "captions").chmod(0o555)
        _, stderr = worker.communicate(timeout=120)
    finally:
        (output / "captions").chmod(0o755)
    assert worker.returncode == 2, stderr
    assert_one_error_line(stderr, "permission denied (EACCES)", "captions", "ls -ld")
    state = slice_state(output)
    assert state["status"] == "crashed" and "permission denied (EACCES)" in state["stop_reason"], state
    assert status_of(output)["state"] == "crashed"
    rerun = start(config)
    _, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    assert verify(output).ok and list(output.rglob("*.tmp")) == []
