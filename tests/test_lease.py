"""The slice lease on its own: who may take it over, fenced writes, heartbeat and release (real files, real pids)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from vlm_hpc.cluster.environment import JobEnvironment
from vlm_hpc.run.lease import LeaseLost, SliceBusy, SliceLease, lease_lock, live_holder, read_lease


def environment(**changes) -> JobEnvironment:
    return replace(JobEnvironment.current(), **changes)


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def write_holder(path: Path, **fields) -> None:
    record = {"host": socket.gethostname(), "pid": 1, "heartbeat": time.time(), "token": "theirs", "generation": 4,
              "job_id": None, "restart_count": 0, **fields}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def test_a_fresh_lease_is_taken_fenced_and_released_with_its_generation(tmp_path: Path) -> None:
    path = tmp_path / "slice_00000.lease"
    lease = SliceLease(path, environment(), stale_seconds=60)
    assert lease.acquire() is None
    assert read_lease(path)["token"] == lease.token and lease.generation == 1
    with lease.fenced():
        pass
    lease.release()
    assert read_lease(path) == {"released": True, "generation": 1, "released_at": read_lease(path)["released_at"]}
    again = SliceLease(path, environment(), stale_seconds=60)
    assert again.acquire() is None and again.generation == 2
    assert live_holder(path, 60) is not None  # this very process holds it
    again.release()
    assert live_holder(path, 60) is None


def test_same_host_a_live_pid_is_never_taken_over_however_old_its_heartbeat(tmp_path: Path) -> None:
    path = tmp_path / "slice_00000.lease"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_holder(path, pid=sleeper.pid, heartbeat=0.0, job_id="77")  # a heartbeat from 1970
        with pytest.raises(SliceBusy, match=f"pid {sleeper.pid}"):
            SliceLease(path, environment(job_id="77"), stale_seconds=1).acquire()  # same Slurm job: two sruns
        assert live_holder(path, 1) is not None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_same_host_a_dead_or_reused_pid_is_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "slice_00000.lease"
    write_holder(path, pid=dead_pid())
    lease = SliceLease(path, environment(), stale_seconds=3600)
    assert "has exited" in lease.acquire() and lease.generation == 5
    lease.release()
    write_holder(path, pid=1, process_start="-1")  # pid 1 lives, but started at another time: reused
    assert "has exited" in SliceLease(path, environment(), stale_seconds=3600).acquire()


def test_an_earlier_restart_of_the_same_slurm_job_elsewhere_is_taken_over_at_once(tmp_path: Path) -> None:
    path = tmp_path / "slice_00000.lease"
    write_holder(path, host="node-elsewhere", job_id="88", restart_count=0)
    reason = SliceLease(path, environment(job_id="88", restart_count=1), stale_seconds=3600).acquire()
    assert "earlier run (restart 0)" in reason


def test_another_host_needs_a_stale_heartbeat_that_stays_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "slice_00000.lease"
    write_holder(path, host="node-elsewhere", heartbeat=time.time())
    with pytest.raises(SliceBusy, match="node-elsewhere"):
        SliceLease(path, environment(), stale_seconds=30, heartbeat_seconds=0.2).acquire()
    write_holder(path, host="node-elsewhere", heartbeat=time.time() - 100)
    # The holder shows life during the confirmation window: the newcomer refuses.
    revived = threading.Timer(0.1, lambda: write_holder(path, host="node-elsewhere", heartbeat=time.time()))
    revived.start()
    with pytest.raises(SliceBusy):
        SliceLease(path, environment(), stale_seconds=30, heartbeat_seconds=0.5).acquire()
    revived.join()
    write_holder(path, host="node-elsewhere", heartbeat=time.time() - 100)
    reason = SliceLease(path, environment(), stale_seconds=30, heartbeat_seconds=0.2).acquire()
    assert "did not move" in reason


def test_a_lease_taken_over_refuses_every_fenced_write_and_the_refresh_notices(tmp_path: Path) -> None:
    path = tmp_path / "slice_00000.lease"
    first = SliceLease(path, environment(), stale_seconds=60)
    first.acquire()
    write_holder(path, host="node-elsewhere", token="newcomer")  # what a takeover leaves in the file
    with pytest.raises(LeaseLost, match="node-elsewhere"):
        with first.fenced():
            pytest.fail("a write ran under a lost lease")
    assert first.lost.is_set()
    second = SliceLease(path, environment(), stale_seconds=60)
    write_holder(path, token=second.token, pid=second.environment.pid)
    first.lost.clear()
    first.refresh()
    assert first.lost.is_set() and read_lease(path)["token"] == second.token  # the refresh wrote nothing
    first.release()
    assert read_lease(path)["token"] == second.token  # and neither did the release


def test_a_removed_or_damaged_lease_file_is_a_lost_lease(tmp_path: Path) -> None:
    path = tmp_path / "slice_00000.lease"
    lease = SliceLease(path, environment(), stale_seconds=60)
    lease.acquire()
    path.write_bytes(b"\x00\xffnot json")
    with pytest.raises(LeaseLost, match="removed or damaged"):
        lease.confirm()
    assert read_lease(path) == {}
    assert "unreadable" in SliceLease(path, environment(), stale_seconds=60).acquire()


def test_fenced_writes_and_takeovers_exclude_each_other(tmp_path: Path) -> None:
    path = tmp_path / "slice_00000.lease"
    lease = SliceLease(path, environment(), stale_seconds=60)
    lease.acquire()
    order: list[str] = []
    with lease.fenced():
        def other() -> None:
            with lease_lock(path):
                order.append("other")
        thread = threading.Thread(target=other)
        thread.start()
        time.sleep(0.3)
        order.append("fenced")
    thread.join()
    assert order == ["fenced", "other"]


def test_the_heartbeat_survives_failed_writes_and_gives_up_after_its_limit(tmp_path: Path) -> None:
    path = tmp_path / "state" / "slice_00000.lease"
    lease = SliceLease(path, environment(), stale_seconds=60, heartbeat_seconds=0.1, failing_seconds=0.8)
    lease.acquire()
    messages: list[str] = []
    lease.log = messages.append
    state = path.parent
    blocker = state.with_name("moved")
    lease.start_heartbeat()
    state.rename(blocker)  # every refresh now fails: the lease folder is gone
    state.write_text("not a folder")
    try:
        deadline = time.monotonic() + 30
        while not lease.lost.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        state.unlink()
        blocker.rename(state)
    assert lease.lost.is_set() and "could not be written" in lease.lost_reason
    assert any("retrying" in message for message in messages)
    lease.release()


def test_a_holder_whose_heartbeat_cannot_lock_sees_a_takeover_as_one(tmp_path: Path) -> None:
    """Resumed from a suspension while the new holder commits (the lock busy): the reason is the takeover, not a
    failing heartbeat."""
    from vlm_hpc.run.lease import lease_lock
    path = tmp_path / "state" / "slice_00000.lease"
    lease = SliceLease(path, environment(), stale_seconds=60, heartbeat_seconds=0.1, failing_seconds=0.05)
    lease.acquire()
    holding = threading.Event()
    done = threading.Event()

    def new_holder() -> None:  # takes the lease over and keeps the lock, as a long fenced write does
        with lease_lock(path):
            write_holder(path, host="node-elsewhere", token="newcomer", generation=lease.generation + 1)
            holding.set()
            done.wait(30)
    thread = threading.Thread(target=new_holder)
    thread.start()
    holding.wait(10)
    lease.start_heartbeat()
    try:
        assert lease.lost.wait(30)
    finally:
        done.set()
        thread.join()
    assert lease.lost_reason.startswith("another worker took over this slice"), lease.lost_reason
