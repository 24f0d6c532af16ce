"""Every way a slice is asked to stop, and the only module that touches signal handlers.

- SIGTERM (plain `scancel`, preemption, the second half of a time limit): stop, no requeue.
- SIGUSR2 (the time-limit warning set with `--signal=USR2@N`): stop, then requeue this array task.
- SIGINT (Ctrl-C when run by hand): stop, no requeue.
- `OUTPUT/kill{I}.txt` (the seed's kill files): stop, no requeue.

A stop lets the batch in flight finish if it can within `grace_seconds`, else abandons it (it is simply not
committed); then the worker commits and exits. Handlers are idempotent: SIGCONT accompanies SIGTERM, and a
time limit sends SIGTERM twice. A signal that comes before a StopRequest is installed (while torch imports, say)
is recorded by `record_stop_signals` and acted on at the install. DataLoader workers ignore these signals so that
only the main process acts, and die with it however it dies (`kill -9`, the OOM killer), so that none is left
behind outside Slurm's cgroup.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)
_REASONS = {signal.SIGTERM: "sigterm", signal.SIGUSR2: "time_limit", signal.SIGINT: "interrupt"}


class BatchAbandoned(Exception):
    """The batch in flight could not finish within the grace period after a stop."""


_signals_before_install: list[tuple[int, float]] = []  # (signal, monotonic time) seen by `record_stop_signals`


def record_stop_signals() -> None:
    """From a command's first instant, before its heavy imports: record the stop signals until a StopRequest
    installs and acts on them (the default action would kill the process, and an early time-limit warning
    would then mean no requeue)."""
    for number in STOP_SIGNALS:
        signal.signal(number, _record_signal)


def _record_signal(number: int, _frame) -> None:
    _signals_before_install.append((number, time.monotonic()))


class StopRequest:
    """Collects stop requests; the worker polls it between batches and the engine during generation."""

    def __init__(self, kill_file: Path | None, grace_seconds: float) -> None:
        self.kill_file = kill_file
        self.grace_seconds = grace_seconds
        self.reason: str | None = None
        self.requeue = False
        self.deadline: float | None = None
        self.on_request: Callable[[str], None] | None = None  # told the first request, as it arrives (the log)
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Route the stop signals here (remembering the previous handlers for `uninstall`), then act on those
        that `record_stop_signals` saw first. Installing again is a no-op: the caller that installed first
        and the callee that installs for itself can both call it."""
        if self._previous:
            return
        for number in STOP_SIGNALS:
            self._previous[number] = signal.signal(number, self._on_signal)
        while _signals_before_install:
            number, at = _signals_before_install.pop(0)
            self._signal(number, at)

    def uninstall(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _on_signal(self, number: int, _frame) -> None:
        self._signal(number, time.monotonic())

    def _signal(self, number: int, at: float) -> None:
        self.request(_REASONS.get(number, f"signal {number}"), requeue=number == signal.SIGUSR2, at=at)

    def request(self, reason: str, requeue: bool = False, at: float | None = None) -> None:
        """Record a stop (made at monotonic time `at`, default now); the first one sets the deadline, a later
        SIGTERM cancels a pending requeue."""
        if self.reason is None:
            self.reason = reason
            self.deadline = (time.monotonic() if at is None else at) + self.grace_seconds
            self.requeue = requeue
            if self.on_request is not None:
                self.on_request(f"stop requested ({reason}): the batch in flight gets {self.grace_seconds:g} s, "
                                f"then what is computed is committed" + (" and the task requeued" if requeue else ""))
        elif reason == "sigterm" and self.reason == "time_limit":
            pass  # the time limit's own SIGTERM after its warning: still requeue
        elif reason in ("sigterm", "interrupt", "kill_file"):
            self.requeue = False

    @property
    def requested(self) -> bool:
        if self.reason is None and self.kill_file is not None and self.kill_file.exists():
            self.request("kill_file")
        return self.reason is not None

    def past_deadline(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def check_deadline(self) -> None:
        """Called during generation: abandon the batch once the grace period is over."""
        if self.past_deadline():
            raise BatchAbandoned(f"stop ({self.reason}) and the batch did not finish within "
                                 f"{self.grace_seconds:.0f}s")


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """Slurm signals every process of the task; only the main process acts on it."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)


def loader_process_init(creator_pid: int, _worker_id: int) -> None:
    """DataLoader worker_init_fn: ignore the stop signals and end with `creator_pid`, the process that made the
    loader (bind it with functools.partial before the loader forks or spawns)."""
    ignore_stop_signals()
    end_with_parent(creator_pid)


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
PARENT_POLL_SECONDS = 1.0


def end_with_parent(creator_pid: int) -> None:
    """SIGKILL this process when its parent dies: armed in the kernel on Linux, else watched by a thread.

    `creator_pid`, taken before the fork or spawn, is the parent, or the grandparent through
    multiprocessing's fork server. PR_SET_PDEATHSIG fires when the *thread* that forked us exits: DataLoader
    forks its workers in the thread that creates its iterator, run_slice's main thread, which ends with the
    process (under the fork server the forking thread is the server's, which exits when its creator dies).
    """
    if not _set_parent_death_signal(signal.SIGKILL):
        watch_parent(creator_pid)
    elif not _started_by(creator_pid):  # it died before prctl ran: the kernel will not tell us
        _die()


def watch_parent(creator_pid: int) -> threading.Thread:
    """Where prctl does not exist: a daemon thread that kills this process once `creator_pid` is no longer its
    parent (it died and we were reparented), which works while the main thread is blocked in a pipe write."""
    def watch() -> None:
        while _started_by(creator_pid):
            time.sleep(PARENT_POLL_SECONDS)
        _die()
    thread = threading.Thread(target=watch, name="vlm_hpc parent watch", daemon=True)
    thread.start()
    return thread


def _set_parent_death_signal(number: int) -> bool:
    """prctl(PR_SET_PDEATHSIG, number); False where there is no prctl (not Linux) or it fails."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, number, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _started_by(creator_pid: int) -> bool:
    """Whether `creator_pid` is still our parent, or our parent's parent (the fork server's case)."""
    parent = os.getppid()
    return parent == creator_pid or _parent_of(parent) == creator_pid


def _parent_of(pid: int) -> int | None:
    """The parent pid of `pid` from /proc (Linux), or None where it cannot be read."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def resend_time_limit_warning() -> None:
    """Deliver the time-limit warning again, to whatever handler is installed now (submitit's, which
    requeues the task), once our own handlers are uninstalled and the slice is committed."""
    signal.raise_signal(signal.SIGUSR2)
