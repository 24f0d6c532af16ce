"""No orphans: DataLoader processes end when the worker's main process dies, however it dies (`kill -9` too)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from builders import committed_rows, make_dataset, png, start_worker, wait_for, write_config


def children_of(pid: int) -> set[int]:
    """Live (not zombie) processes whose parent is `pid`, read from /proc."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            state = _stat(int(entry.name))
            if state is not None and state[1] == pid and state[0] != "Z":
                found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie has ended; in a container nobody may ever reap it)."""
    state = _stat(pid)
    return state is not None and state[0] != "Z"


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


def test_sigkill_of_the_main_process_alone_ends_its_loader_processes(golden_model_dir: Path, tmp_path: Path) -> None:
    # Every row is a sample image, kept in its prepared batch: each batch is larger than a pipe's buffer, so
    # the loader processes are soon blocked writing batches that the main process has not asked for yet.
    data = make_dataset(tmp_path / "data", [(f"row_{i:03d}", png(i, (320, 240)), "w") for i in range(60)])
    output = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", golden_model_dir, data, output,
                          generation={"batch_size": 2}, worker={"loader_workers": 2, "prefetch_batches": 4})
    process = start_worker(config)
    try:
        wait_for(lambda: committed_rows(output) >= 2 or process.poll() is not None, 180, "a committed batch")
        loaders = children_of(process.pid)
        assert len(loaders) >= 2, process.communicate()[1]
        os.kill(process.pid, signal.SIGKILL)  # the main process only, as the OOM killer does
        process.wait(timeout=30)
        wait_for(lambda: not any(alive(pid) for pid in loaders), 10, f"loader processes {sorted(loaders)} to end")
    finally:
        kill_group(process)


def kill_group(process: subprocess.Popen) -> None:
    """Whatever a test left of the process group, gone."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


def test_the_parent_watch_ends_a_process_whose_parent_was_killed(tmp_path: Path) -> None:
    """The fallback where prctl does not exist: a thread that sees the parent change, while the main thread
    is blocked (here in a sleep, as a loader process is in a pipe write)."""
    script = textwrap.dedent("""
        import os, sys, time
        from vlm_hpc.run.stop import watch_parent
        parent = os.getpid()
        child = os.fork()
        if child == 0:
            watch_parent(parent)
            time.sleep(600)
            os._exit(0)
        print(child, flush=True)
        time.sleep(600)
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                               start_new_session=True, cwd=Path(__file__).parent.parent)
    try:
        child = int(process.stdout.readline())
        assert alive(child)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        wait_for(lambda: not alive(child), 10, f"process {child} to end after its parent was killed")
    finally:
        kill_group(process)
