"""One worker per slice, and only the current one writes: a lease with a fencing check on every write.

The lease file `state/slice_{I}.lease` names its holder (host, pid and its start time, Slurm job) with a
random token and a generation that grows by one at every change of holder. Every change of the file and every
fenced write of the slice's outputs happens under the lease lock (`slice_{I}.lease.lock`, flock; lock-file
semantics where the file system refuses flock). A write first checks, under that lock, that the file still
carries this worker's token; so a holder that was suspended, hung or cut off while another worker took over
writes nothing once it runs again, whatever its heartbeat thread believes.

Who may take a lease over from a holder that has not released it:
- same host: only when the holder's process is gone (its pid is dead, or reused: another start time), however
  old its heartbeat; two starts in one Slurm allocation therefore refuse each other;
- a later restart of the same Slurm job (higher SLURM_RESTART_COUNT): Slurm ends a job before restarting it;
- another host: only when the heartbeat is older than `stale_seconds` and stays unchanged for a further
  confirmation window of two heartbeat intervals (a holder resumed from SIGSTOP within it refreshes and keeps
  the slice). A holder resumed later finds another token at its next fenced write and stops: at most the batch
  it was computing is lost work, no committed output is touched.
"""

from __future__ import annotations

import json
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, SoftFileLock, Timeout

from vlm_hpc.cluster import slurm
from vlm_hpc.cluster.environment import JobEnvironment
from vlm_hpc.errors import VlmHpcError
from vlm_hpc.run.committed import parse_record
from vlm_hpc.run.durable import write_atomic

LOCK_TIMEOUT_S = 30.0


class SliceBusy(VlmHpcError):
    """Another live worker holds the slice."""


class LeaseLost(VlmHpcError):
    """Another worker holds the slice now: this one must write nothing more."""


def _process_start(pid: int) -> str | None:
    """Start time of a local process (tells a live holder from a reused pid)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _holder_task(holder: dict) -> str | None:
    """The holder's Slurm task id (ARRAYJOB_TASK, or a plain job id), if it ran under Slurm."""
    return slurm.task_id(holder.get("job_id"), holder.get("array_job_id"), holder.get("array_task_id"))


def _heartbeat_age(holder: dict) -> float:
    try:
        return time.time() - float(holder.get("heartbeat", 0))
    except (TypeError, ValueError):
        return float("inf")


def _describe(holder: dict) -> str:
    slurm = _holder_task(holder)
    return (f"host {holder.get('host')} pid {holder.get('pid')}" + (f" (Slurm job {slurm})" if slurm else "")
            + f", heartbeat {_heartbeat_age(holder):.0f}s ago")


def _is_holder(record: dict | None) -> bool:
    """A record naming a holder (not absent, unreadable or released)."""
    return bool(record) and not record.get("released") and bool(record.get("token"))


def read_lease(path: Path) -> dict | None:
    """The lease record; None if there is none, {} if it cannot be read (half-written, garbage)."""
    try:
        record = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def live_holder(path: Path, stale_seconds: float) -> str | None:
    """Who holds a slice right now (for status and submit), or None if nobody alive does."""
    holder = read_lease(path)
    if not _is_holder(holder):
        return None
    same_host = holder.get("host") == socket.gethostname()
    try:
        pid = int(holder.get("pid", -1))
    except (TypeError, ValueError):
        pid = -1
    if same_host:
        start = _process_start(pid)
        if start is None or (holder.get("process_start") and start != holder["process_start"]):
            return None
        return _describe(holder)  # a live local process holds it, however late its heartbeat
    if _heartbeat_age(holder) > stale_seconds:
        return None
    task = _holder_task(holder)
    if task and not slurm.task_alive(task):
        return None
    return _describe(holder)


def _record_problem(record: object) -> str | None:
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    if record.get("released") is True:  # a released lease keeps its generation
        expected = {"generation": (int,)}
    else:
        # Held leases written before generations existed have none: not corrupt.
        expected = {"host": (str,), "pid": (int,), "heartbeat": (int, float), "token": (str,)}
    wrong = [name for name, types in expected.items()
             if not isinstance(record.get(name), types) or isinstance(record.get(name), bool)]
    return f"fields {wrong} are missing or of the wrong type" if wrong else None


def lease_file_problem(path: Path) -> str | None:
    """What is wrong with a slice's lease file (for verify), None when it is absent or sound."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    return parse_record(data, _record_problem)[1]


def heartbeat_age(record: dict | None) -> float | None:
    """Seconds since the record's holder last beat; None when the record names no holder."""
    if not _is_holder(record):
        return None
    age = _heartbeat_age(record)  # type: ignore[arg-type]
    return None if age == float("inf") else age


@contextmanager
def lease_lock(path: Path, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """The lock that serialises every change of the lease and every fenced write of the slice."""
    lock_path = str(path) + ".lock"
    try:
        lock: FileLock | SoftFileLock = FileLock(lock_path, timeout=timeout)
        lock.acquire()
    except OSError:  # flock unsupported (some NFS mounts): lock-file semantics instead
        lock = SoftFileLock(lock_path, timeout=timeout)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


class SliceLease:
    """The right to work on one slice, held by one process at a time; `fenced` guards every write."""

    def __init__(self, path: Path, environment: JobEnvironment, stale_seconds: float,
                 heartbeat_seconds: float = 10.0, failing_seconds: float | None = None,
                 log: Callable[[str], None] = lambda message: None) -> None:
        self.path = path
        self.environment = environment
        self.stale_seconds = stale_seconds
        self.heartbeat_seconds = heartbeat_seconds
        # A heartbeat that cannot be written for this long gives the lease up: others may take it soon.
        self.failing_seconds = failing_seconds if failing_seconds is not None else stale_seconds / 2
        self.log = log
        self.token = secrets.token_hex(8)
        self.generation = 0
        self.lost = threading.Event()
        self.lost_reason: str | None = None
        self._stop_heartbeat = threading.Event()
        self._thread: threading.Thread | None = None
        self._process_start = _process_start(environment.pid)

    def _record(self) -> bytes:
        record = {**self.environment.to_dict(), "token": self.token, "generation": self.generation,
                  "heartbeat": time.time(), "process_start": self._process_start}
        return json.dumps(record).encode()

    def _holder_is_dead(self, holder: dict) -> str | None:
        """Why the holder is certainly gone, or None if it may be alive (see the module docstring)."""
        me = self.environment
        try:
            pid = int(holder.get("pid", -1))
            restarts = int(holder.get("restart_count") or 0)
        except (TypeError, ValueError):
            return "the lease file names no valid process"
        if holder.get("host") == me.host:
            if pid == me.pid and holder.get("process_start") == self._process_start:
                return "it is this process"
            start = _process_start(pid)
            if start is None or (holder.get("process_start") and start != holder["process_start"]):
                return f"process {pid} on this host has exited"
            return None
        if holder.get("job_id") and holder.get("job_id") == me.job_id and restarts < me.restart_count:
            return f"it is an earlier run (restart {restarts}) of this Slurm job {me.job_id}, now at restart " \
                   f"{me.restart_count}"
        return None  # another host: only a stale heartbeat, confirmed in `acquire`, lets it go

    def _write_mine(self, previous: dict | None) -> None:
        self.generation = int((previous or {}).get("generation") or 0) + 1
        write_atomic(self.path, self._record())

    def acquire(self) -> str | None:
        """Take the lease or raise SliceBusy naming the holder; returns why a holder's lease was taken over."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        needs_confirmation = None
        with self._locked_for_takeover():
            holder = read_lease(self.path)
            if not _is_holder(holder):
                self._write_mine(holder)
                return None if holder is None or holder.get("released") else "the lease file was unreadable"
            reason = self._holder_is_dead(holder)
            if reason is not None:
                self._write_mine(holder)
                return reason
            if holder.get("host") == self.environment.host or _heartbeat_age(holder) <= self.stale_seconds:
                raise self._busy(holder)
            needs_confirmation = holder
        # Another host, stale heartbeat: give a holder resumed from SIGSTOP two heartbeats to show it lives.
        time.sleep(2 * self.heartbeat_seconds)
        with self._locked_for_takeover():
            holder = read_lease(self.path)
            if holder != needs_confirmation and _is_holder(holder):
                raise self._busy(holder)
            self._write_mine(holder)
            return f"its heartbeat is {_heartbeat_age(needs_confirmation):.0f}s old (limit " \
                   f"{self.stale_seconds:.0f}s) and did not move for {2 * self.heartbeat_seconds:.0f}s more"

    def _busy(self, holder: dict) -> SliceBusy:
        return SliceBusy(f"{self.path.name}: slice is being worked on by {_describe(holder)}; wait for it, or "
                         f"scancel it, or kill that process and run this again")

    @contextmanager
    def _locked_for_takeover(self) -> Iterator[None]:
        try:
            with lease_lock(self.path):
                yield
        except Timeout:
            raise SliceBusy(f"{self.path}.lock: held for over {LOCK_TIMEOUT_S:.0f}s by another worker of this "
                            "slice (one that is committing, or suspended while committing); try again later") from None

    def confirm(self) -> None:
        """Raise LeaseLost unless the lease file still carries this worker's token (call under `fenced`)."""
        if self.lost.is_set():
            raise LeaseLost(self.lost_reason or "the slice lease was lost")
        holder = read_lease(self.path)
        if not holder or holder.get("token") != self.token:
            who = _describe(holder) if _is_holder(holder) else "nobody (the lease file was removed or damaged)"
            self._mark_lost(f"another worker took over this slice: the lease now names {who}")
            raise LeaseLost(self.lost_reason)

    @contextmanager
    def fenced(self) -> Iterator[None]:
        """Hold the lease lock and check the token: what runs inside is a write by the current holder only."""
        if self.lost.is_set():
            raise LeaseLost(self.lost_reason or "the slice lease was lost")
        try:
            with lease_lock(self.path):
                self.confirm()
                yield
        except Timeout:
            raise LeaseLost(f"{self.path}.lock stayed locked for {LOCK_TIMEOUT_S:.0f}s (another worker of this "
                            "slice holds it); not writing") from None

    def _mark_lost(self, reason: str) -> None:
        if not self.lost.is_set():
            self.lost_reason = reason
            self.lost.set()

    def refresh(self) -> None:
        """Renew the heartbeat under the lock; flags `lost` if someone else now holds the lease."""
        with lease_lock(self.path, timeout=max(self.heartbeat_seconds, 1.0)):
            holder = read_lease(self.path)
            if not holder or holder.get("token") != self.token:
                who = _describe(holder) if _is_holder(holder) else "nobody"
                self._mark_lost(f"another worker took over this slice: the lease now names {who}")
                return
            write_atomic(self.path, self._record(), sync_dir=False)

    def _taken_over(self) -> bool:
        """Whether the lease file (read without the lock: it is replaced atomically) names another holder; then
        the lease is marked lost with that reason."""
        holder = read_lease(self.path)
        if holder and _is_holder(holder) and holder.get("token") != self.token:
            self._mark_lost(f"another worker took over this slice: the lease now names {_describe(holder)}")
            return True
        return False

    def start_heartbeat(self) -> None:
        """Refresh every heartbeat interval; a failed refresh is retried sooner, and one failing for longer
        than `failing_seconds` gives the lease up (the worker stops at its next poll)."""
        def beat() -> None:
            last_success = time.monotonic()
            wait = self.heartbeat_seconds
            while not self._stop_heartbeat.wait(wait) and not self.lost.is_set():
                try:
                    self.refresh()
                    last_success, wait = time.monotonic(), self.heartbeat_seconds
                except (OSError, Timeout) as exc:
                    failing = time.monotonic() - last_success
                    if self._taken_over():  # e.g. resumed from a suspension while the new holder commits
                        continue
                    if failing > self.failing_seconds:
                        self._mark_lost(f"the lease heartbeat could not be written for {failing:.0f}s ({exc})")
                    else:
                        self.log(f"lease heartbeat failed ({exc}); retrying")
                    wait = min(self.heartbeat_seconds, 1.0)
        self._thread = threading.Thread(target=beat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and mark the lease released (kept, so that the generation keeps counting)."""
        self._stop_heartbeat.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            with lease_lock(self.path, timeout=5):
                holder = read_lease(self.path)
                if holder and holder.get("token") == self.token:
                    write_atomic(self.path, json.dumps({"released": True, "generation": self.generation,
                                                        "released_at": time.time()}).encode())
        except (OSError, Timeout) as exc:
            self.log(f"could not release the slice lease {self.path} ({exc}); the next worker recovers it")
