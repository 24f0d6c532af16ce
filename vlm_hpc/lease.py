"""One worker per slice: a lease file created exclusively, refreshed by a heartbeat, recoverable when its holder dies.

Exclusive creation (O_CREAT|O_EXCL) is atomic on local disks and NFSv3+, so it needs no lock daemon. Taking
over a dead holder's lease is serialised with `filelock` (flock), falling back to its lock-file variant where
the file system refuses flock, and every refresh checks that the lease still carries our token.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

from filelock import FileLock, SoftFileLock, Timeout

from vlm_hpc.durable import write_atomic
from vlm_hpc.errors import VlmHpcError
from vlm_hpc.job_environment import JobEnvironment


class SliceBusy(VlmHpcError):
    """Another live worker holds the slice."""


def _process_start(pid: int) -> str | None:
    """Start time of a local process (tells a live holder from a reused pid)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _holder_task(holder: dict) -> str | None:
    """The holder's Slurm task id (ARRAYJOB_TASK, or a plain job id), if it ran under Slurm."""
    if holder.get("array_job_id"):
        return f"{holder['array_job_id']}_{holder.get('array_task_id')}"
    return holder.get("job_id")


def _describe(holder: dict) -> str:
    slurm = _holder_task(holder)
    age = time.time() - float(holder.get("heartbeat", 0))
    return (f"host {holder.get('host')} pid {holder.get('pid')}" + (f" (Slurm job {slurm})" if slurm else "")
            + f", heartbeat {age:.0f}s ago")


def _slurm_task_alive(task: str) -> bool:
    """Whether Slurm still runs (or will run) this task; True when Slurm cannot be asked."""
    if not shutil.which("squeue"):
        return True
    try:
        result = subprocess.run(["squeue", "-h", "-j", task, "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return True
    if result.returncode != 0:
        return "Invalid job id" not in result.stderr
    return any(state in result.stdout for state in ("RUNNING", "PENDING", "CONFIGURING", "COMPLETING", "SUSPENDED"))


def live_holder(path: Path, stale_seconds: float) -> str | None:
    """Who holds a slice right now (for status and submit), or None if nobody alive does."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if time.time() - float(holder.get("heartbeat", 0)) > stale_seconds:
        return None
    if holder.get("host") == socket.gethostname() and _process_start(int(holder.get("pid", -1))) is None:
        return None
    task = _holder_task(holder)
    if task and not _slurm_task_alive(task):
        return None
    return _describe(holder)


def _takeover_lock(path: Path):
    lock_path = str(path) + ".takeover"
    try:
        lock = FileLock(lock_path, timeout=30)
        lock.acquire()
        return lock
    except Timeout:
        raise SliceBusy(f"{path}: another worker is taking this slice over right now; try again") from None
    except OSError:  # flock unsupported (some NFS mounts): lock-file semantics instead
        lock = SoftFileLock(lock_path, timeout=30)
        lock.acquire()
        return lock


class SliceLease:
    """The right to work on one slice, held by one process at a time."""

    def __init__(self, path: Path, environment: JobEnvironment, stale_seconds: float) -> None:
        self.path = path
        self.environment = environment
        self.stale_seconds = stale_seconds
        self.token = secrets.token_hex(8)
        self.lost = threading.Event()
        self._stop_heartbeat = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        record = {**self.environment.to_dict(), "token": self.token, "heartbeat": time.time(),
                  "process_start": _process_start(self.environment.pid)}
        return json.dumps(record).encode()

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError):
            return {}  # half-written by a crashed holder: treat as stale

    def _holder_is_dead(self, holder: dict) -> str | None:
        """Why the holder is certainly gone, or None if it may be alive."""
        if not holder:
            return "the lease file is unreadable"
        me = self.environment
        if holder.get("job_id") and holder.get("job_id") == me.job_id and holder.get("pid") != me.pid:
            return f"it is an earlier run of this Slurm job {me.job_id} (requeued)"
        if holder.get("host") == me.host:
            pid = int(holder.get("pid", -1))
            if pid == me.pid:
                return "it is this process"
            start = _process_start(pid)
            if start is None or (holder.get("process_start") and start != holder["process_start"]):
                return f"process {pid} on this host has exited"
        age = time.time() - float(holder.get("heartbeat", 0))
        if age > self.stale_seconds:
            return f"its heartbeat is {age:.0f}s old (limit {self.stale_seconds:.0f}s)"
        return None

    def acquire(self) -> str | None:
        """Take the lease or raise SliceBusy naming the holder; returns why a dead holder's lease was taken."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return self._take_over()
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(self._record())
            handle.flush()
            os.fsync(handle.fileno())
        return None

    def _take_over(self) -> str:
        lock = _takeover_lock(self.path)
        try:
            holder = self._holder()
            if holder is None:  # released meanwhile
                write_atomic(self.path, self._record())
                return "the previous holder released it"
            reason = self._holder_is_dead(holder)
            if reason is None:
                raise SliceBusy(f"{self.path.name}: slice is being worked on by {_describe(holder)}; "
                                f"wait for it, or scancel it, or delete {self.path} if it is surely dead")
            write_atomic(self.path, self._record())
            return reason
        finally:
            lock.release()

    def refresh(self) -> None:
        """Renew the heartbeat; flags `lost` if someone else now holds the lease."""
        holder = self._holder()
        if not holder or holder.get("token") != self.token:
            self.lost.set()
            return
        write_atomic(self.path, self._record(), sync_dir=False)

    def start_heartbeat(self, interval: float) -> None:
        def beat() -> None:
            while not self._stop_heartbeat.wait(interval):
                self.refresh()
        self._thread = threading.Thread(target=beat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop_heartbeat.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = self._holder()
        if holder and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)
