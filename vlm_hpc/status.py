"""`python -m vlm_hpc.status OUTPUT [--json] [--watch [SECONDS]]`: where every slice of a run stands.

Per slice: state (see `SliceState`), rows done/total, failed rows, rate, ETA and heartbeat age; then one line
over the whole run (rows, images/s, ETA), kill files still waiting, and the submit command that resubmits what
is incomplete (a slice that crashed on an error a resubmission repeats is listed apart: fix it first). Slurm is
asked once per call (one squeue), never per task.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from vlm_hpc.cluster import slurm
from vlm_hpc.cluster.array_spec import format_indices
from vlm_hpc.errors import VlmHpcError, print_error
from vlm_hpc.run.checkpoint import WILL_CRASH_AGAIN, CheckpointStatus, CorruptCheckpoint, SliceCheckpoint
from vlm_hpc.run.failures import OutcomeCounts
from vlm_hpc.run.layout import OutputLayout
from vlm_hpc.run.lease import heartbeat_age, read_lease
from vlm_hpc.run.manifest import load_manifest
from vlm_hpc.run.repair import repair_command
from vlm_hpc.run.slicing import slice_bounds
from vlm_hpc.run.submissions import SubmitCommand, read_submissions

STALLED_AFTER_S = 300  # a running slice whose lease heartbeat is older than this is flagged

# A checkpoint's status, or what status finds on top: "stalled" (running, heartbeat old), "killed" (Slurm ended
# the task and no stop was recorded), "corrupt" (the checkpoint is damaged).
SliceState = Literal[CheckpointStatus, "stalled", "killed", "corrupt"]
# States in which a slice will not move again by itself: `--watch` ends when every slice is in one.
SETTLED: tuple[SliceState, ...] = ("done", "crashed", "killed", "stopped", "corrupt")


@dataclass
class SliceStatus:
    slice: int
    state: SliceState
    rows_done: int
    rows_total: int
    outcomes: OutcomeCounts  # its finished rows: captioned (warned among them) and failed, by reason
    rate: float | None  # rows/s of the current or last attempt
    eta_s: float | None
    heartbeat_age_s: float | None
    slurm: str | None  # the Slurm state of its latest array task, when it has one
    reason: str | None
    will_crash_again: bool = False  # crashed on an error a resubmission repeats (the reason says which)


@dataclass(frozen=True)
class LoggedCrash:
    """A crash as the slice log records it."""

    reason: str
    time: float | None  # when it was logged, in seconds since the epoch

    @property
    def will_crash_again(self) -> bool:
        return self.reason.startswith(WILL_CRASH_AGAIN)


# Lines of the slice log that say how an attempt began or ended; the last of them is the slice's latest news.
_EVENTS = (" | start: ", " | crashed: ", " | done: ", " | stopped (", " | requeued (", " | stopping: ")


def _logged_time(line: str) -> float | None:
    """When a log line was written: its asctime prefix, local time as the worker wrote it."""
    try:
        return time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + int(line[20:23]) / 1000
    except ValueError:
        return None


def _crash_in_log(path: Path) -> LoggedCrash | None:
    """The slice log's "crashed: REASON" line (REASON: the exception line, or what to fix), when it is the log's
    last event: a later start, stop or end means the slice went on."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, handle.seek(0, 2) - 65536))
            lines = handle.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    events = [i for i, line in enumerate(lines) if any(event in line for event in _EVENTS)]
    if not events:
        return None
    last = lines[events[-1]]
    if " | crashed: " not in last:
        return None
    return LoggedCrash(last.split(" | crashed: ", 1)[1].strip(), _logged_time(last))


def _last_log_line(path: Path) -> str | None:
    """The last line of a slice log, without its time stamp."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, handle.seek(0, 2) - 4096))
            lines = handle.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return None
    return lines[-1].split(" | ", 1)[-1][:300] if lines else None


def collect(output: str | Path) -> tuple[list[SliceStatus], int]:
    """Status of every slice of the run in `output`, and the number of rows."""
    layout = OutputLayout(Path(output))
    if not layout.manifest_file.exists():
        raise VlmHpcError(f"status: {layout.manifest_file} is missing; no run has started in {output}")
    manifest = load_manifest(layout.manifest_file)
    count, num_rows = manifest.num_slices, manifest.num_rows
    slurm_states = read_submissions(layout).slurm_states()
    now = time.time()
    statuses = []
    for slice_id in range(count):
        start, stop = slice_bounds(num_rows, slice_id, count)
        total = stop - start
        slurm_state = slurm_states.get(slice_id)
        killed = slurm_state in slurm.KILLED_STATES
        try:
            state = SliceCheckpoint.load(layout.checkpoint_file(slice_id))
        except CorruptCheckpoint as exc:
            statuses.append(SliceStatus(slice_id, "corrupt", 0, total, OutcomeCounts(), None, None, None,
                                        slurm_state, f"{exc.problem}; run: {repair_command(layout)}"))
            continue
        lease = read_lease(layout.lease_file(slice_id))
        heartbeat = heartbeat_age(lease)
        unheld = lease is None or bool(lease.get("released"))
        crash = _crash_in_log(layout.log_file(slice_id)) if unheld and (state is None or state.status != "done") \
            else None
        # A start refused before it could write the checkpoint (config, device) is recorded in the log alone; its
        # crash is news when it came after the checkpoint's last write and no task of the slice is queued or running.
        refused = crash is not None and slurm_state not in ("PENDING", "RUNNING") and (
            state is None or (crash.time or 0) > (state.updated_at or 0))
        if state is None:
            if killed:
                name, reason, again = "killed", f"Slurm {slurm_state} before the slice started", False
            elif refused:
                name, reason, again = "crashed", crash.reason, crash.will_crash_again
            else:
                name, reason, again = "running" if slurm_state == "RUNNING" else "pending", None, False
            statuses.append(SliceStatus(slice_id, name, 0, total, OutcomeCounts(), None, None, heartbeat, slurm_state,
                                        reason, again))
            continue
        name, reason, again = state.status, state.stop_reason, state.will_crash_again
        if name == "running" and killed:
            # Slurm ended the task (SIGKILL after KillWait, a node failure, the OOM killer) before it could
            # record a stop: say so now, not once the heartbeat is stale.
            last = _last_log_line(layout.log_file(slice_id))
            name, reason = "killed", f"Slurm {slurm_state}" + (f"; last log line: {last}" if last else "")
        elif name == "running" and unheld:
            # The worker ended without recording why (its checkpoint could not be written): its log may say.
            name, reason, again = "crashed", crash.reason if crash else "ended without recording why", \
                crash is not None and crash.will_crash_again
        elif refused:
            name, reason, again = "crashed", crash.reason, crash.will_crash_again
        elif name == "running" and (heartbeat is None or heartbeat > STALLED_AFTER_S):
            name = "stalled" if slurm_state in (None, "RUNNING") else "crashed"
        if slurm_state == "PENDING" and name != "done":
            name = "requeued" if state.attempts else "pending"
        elapsed = (state.updated_at or now) - (state.started_at or now)
        done_this_attempt = state.finished_rows - state.rows_at_start
        rate = done_this_attempt / elapsed if elapsed > 0 and done_this_attempt > 0 else None
        eta = (state.total - state.finished_rows) / rate if rate and name == "running" else None
        statuses.append(SliceStatus(slice_id, name, state.finished_rows, state.total, state.outcomes(), rate, eta,
                                    heartbeat, slurm_state, reason, again and name == "crashed"))
    return statuses, num_rows


def _clock(seconds: float) -> str:
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"


def overall_line(statuses: list[SliceStatus], num_rows: int) -> str:
    """One line over the whole run: rows done, failed, images/s of the running slices, ETA, slices by state."""
    done_rows = sum(s.rows_done for s in statuses)
    rate = sum(s.rate for s in statuses if s.state == "running" and s.rate)
    left = num_rows - done_rows
    counts: dict[str, int] = {}
    for s in statuses:
        counts[s.state] = counts.get(s.state, 0) + 1
    outcomes = OutcomeCounts()
    for s in statuses:
        outcomes.merge(s.outcomes)
    speed = f", {rate:.2f} images/s, ETA {_clock(left / rate)}" if rate and left > 0 else ""
    return (f"{done_rows}/{num_rows} rows ({100 * done_rows / max(num_rows, 1):.1f}%): {outcomes.describe()}"
            f"{speed}; slices: " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())))


def render(statuses: list[SliceStatus], num_rows: int, layout: OutputLayout | None = None,
           command: SubmitCommand | None = None) -> str:
    lines = [f"{'slice':>5} {'state':<9} {'rows':>15} {'failed':>6} {'rows/s':>7} {'ETA':>9} {'heartbeat':>9}  slurm"]
    for s in statuses:
        eta = _clock(s.eta_s) if s.eta_s is not None else "-"
        beat = f"{s.heartbeat_age_s:.0f}s" if s.heartbeat_age_s is not None else "-"
        rate = f"{s.rate:.2f}" if s.rate is not None else "-"
        note = f"  ({s.reason})" if s.reason and s.state not in ("done", "running") else ""
        lines.append(f"{s.slice:>5} {s.state:<9} {f'{s.rows_done}/{s.rows_total}':>15} {s.outcomes.failed:>6} "
                     f"{rate:>7} {eta:>9} {beat:>9}  {s.slurm or '-'}{note}")
    lines.append(f"total: {overall_line(statuses, num_rows)}")
    if layout is not None:
        for kill in layout.waiting_kill_files(s.slice for s in statuses if s.state != "done"):
            lines.append(f"waiting kill file: {kill} (stops its slice at the next batch or start; rm it to let "
                         "the slice run)")
    incomplete = resubmit_indices(statuses)
    if incomplete:
        spec = format_indices(incomplete)
        hint = command.line(spec) if command else f"python -m vlm_hpc.submit --config CONFIG --array {spec}"
        lines.append(f"resubmit what is incomplete: {hint}")
    fix_first = [s.slice for s in statuses if s.will_crash_again]
    if fix_first:
        spec = format_indices(fix_first)
        hint = command.line(spec) if command else f"python -m vlm_hpc.submit --config CONFIG --array {spec}"
        lines.append(f"crashed on an error a resubmission repeats (their reason says what to fix); once fixed: {hint}")
    return "\n".join(lines)


def resubmit_indices(statuses: list[SliceStatus]) -> list[int]:
    """Slices that are neither done nor running or queued, nor crashed on an error a resubmission repeats."""
    return [s.slice for s in statuses if s.state not in ("done", "running") and s.slurm not in ("PENDING", "RUNNING")
            and not s.will_crash_again]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlm_hpc.status", description=__doc__.splitlines()[0])
    parser.add_argument("output", help="the run's output folder (output.dir)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (slices, num_rows, resubmit)")
    parser.add_argument("--watch", nargs="?", type=float, const=10.0, default=None, metavar="SECONDS",
                        help="print the report again every SECONDS (default 10) until interrupted")
    args = parser.parse_args(argv)
    layout = OutputLayout(Path(args.output))
    while True:
        try:
            statuses, num_rows = collect(args.output)
        except VlmHpcError as exc:
            return print_error(exc)
        command = read_submissions(layout).command
        if args.json:
            print(json.dumps({"slices": [asdict(s) for s in statuses], "num_rows": num_rows,
                              "resubmit": format_indices(resubmit_indices(statuses)),
                              "fix_first": format_indices([s.slice for s in statuses if s.will_crash_again]),
                              "overall": overall_line(statuses, num_rows)}))
        else:
            print(render(statuses, num_rows, layout, command), flush=True)
            if layout.report_file.exists():  # the page of `python -m vlm_hpc.report`, as of when it was written
                print(f"report: {layout.report_file}", flush=True)
        if args.watch is None:
            return 0
        if all(s.state in SETTLED for s in statuses):
            settled = "every slice is done" if all(s.state == "done" for s in statuses) else "no slice is running"
            print(f"\n{settled}: {overall_line(statuses, num_rows)}; check it: python -m vlm_hpc.verify "
                  f"{shlex.quote(str(layout.root))}")
            return 0
        time.sleep(args.watch)
        print()


if __name__ == "__main__":
    sys.exit(main())
