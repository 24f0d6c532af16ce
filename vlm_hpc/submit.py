"""`python -m vlm_hpc.submit --config FILE --array SPEC`: one Slurm job array, one slice per array task.

The only module that knows submitit. Array task ids are the slice ids as written (`scancel JOB_5` stops
slice 5), sparse ones too; a SPEC beyond the cluster's MaxArraySize becomes several arrays with index
offsets. Everything that can be checked is checked before sbatch; complete and running slices are skipped.
Without Slurm (no sbatch on PATH) the same array runs on submitit's local executor.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import shutil
import sys
import time
import uuid
from dataclasses import asdict, replace
from pathlib import Path

import submitit
from submitit.core import utils as submitit_utils
from submitit.slurm.slurm import SlurmJob

from vlm_hpc.cluster import slurm
from vlm_hpc.cluster.array_spec import ArraySpec, format_indices, parse_array, split_for_max_array_size
from vlm_hpc.config import RunConfig, load_config
from vlm_hpc.engines import engine_class
from vlm_hpc.errors import VlmHpcError, print_error
from vlm_hpc.run.checkpoint import CorruptCheckpoint, SliceCheckpoint
from vlm_hpc.run.failures import OutcomeCounts
from vlm_hpc.run.layout import OutputLayout
from vlm_hpc.run.lease import live_holder
from vlm_hpc.run.manifest import ensure_manifest, load_manifest
from vlm_hpc.run.readers import InputsChanged
from vlm_hpc.run.repair import repair_command
from vlm_hpc.run.slice_run import check_inputs, run_slice
from vlm_hpc.run.stop import StopRequest, resend_time_limit_warning
from vlm_hpc.run.submissions import SubmitCommand, command_of, record_submission
from vlm_hpc.status import collect, overall_line


class SliceJob(submitit.helpers.Checkpointable):
    """What each array task runs: its slice, to completion or to a graceful stop.

    Checkpointable so that on the time-limit warning submitit itself requeues the task (resuming is done
    by the slice index, so resubmitting the same call is the whole checkpoint).
    """

    def __init__(self, config: RunConfig, num_slices: int, accept_changes: bool = False) -> None:
        self.config = config
        self.num_slices = num_slices
        self.accept_changes = accept_changes

    def __call__(self, slice_id: int) -> dict:
        layout = OutputLayout(Path(self.config.output.dir))
        stop_request = StopRequest(layout.kill_file(slice_id), self.config.worker.grace_seconds)
        # Ours from here, not after run_slice's lease and checks (submitit's SIGTERM handler ignores the signal);
        # run_slice restores submitit's handlers when it returns, so its USR2 requeue below still works.
        stop_request.install()
        try:
            outcome = run_slice(self.config, slice_id, self.num_slices, stop_request=stop_request,
                                accept_changes=self.accept_changes)
        finally:
            stop_request.uninstall()
        summary = {"slice": slice_id, "status": outcome.status, "reason": outcome.reason,
                   "outcomes": asdict(outcome.checkpoint.outcomes())}
        under_slurm = submitit.JobEnvironment().cluster == "slurm"
        if outcome.status == "requeued" and under_slurm:
            resend_time_limit_warning()  # submitit's handler requeues this task and exits
        if outcome.status != "done" and under_slurm:
            sys.exit(0)  # no result pickle: the slice is not finished, whatever Slurm calls the task
        return summary


class SliceArrayExecutor(submitit.SlurmExecutor):
    """submitit's Slurm executor, but the array's task ids are given (sparse ones too) instead of 0..n-1.

    It mirrors submitit 1.5's private `submitit.slurm.slurm.SlurmExecutor._internal_process_submissions` (its
    array branch: pickle each delayed call, one sbatch for the array, a job per task) and calls its private
    `_submit_command`; so pyproject pins submitit below 1.6, and a new submitit means comparing that method with
    this one.
    """

    task_ids: tuple[int, ...] = ()
    throttle: int | None = None

    def _internal_process_submissions(self, delayed_submissions: list) -> list:
        folder = submitit_utils.JobPaths.get_first_id_independent_folder(self.folder)
        folder.mkdir(parents=True, exist_ok=True)
        pickles = []
        for delayed in delayed_submissions:
            path = folder / f"{uuid.uuid4().hex}.pkl"
            delayed.set_timeout(self.parameters.get("time", 5), self.max_num_timeout)
            delayed.dump(path)
            pickles.append(path)
        array = submitit.SlurmExecutor(self.folder, self.max_num_timeout)
        array.update_parameters(**self.parameters)
        array.parameters["map_count"] = len(delayed_submissions)  # %A_%a log names
        extra = dict(array.parameters.get("additional_parameters") or {})
        extra["array"] = format_indices(self.task_ids) + (f"%{self.throttle}" if self.throttle else "")
        array.parameters["additional_parameters"] = extra
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # submitit prints sbatch's refusal; ours is one line
                first = array._submit_command(self._submitit_command_str)
        except Exception:
            for path in pickles:  # a refused array leaves nothing of itself behind
                path.unlink(missing_ok=True)
            _remove_empty_folders(folder, stop_at=self.folder.parent)
            raise
        jobs = [SlurmJob(folder=self.folder, job_id=f"{first.job_id}_{task}", tasks=[0]) for task in self.task_ids]
        for job, path in zip(jobs, pickles):
            job.paths.move_temporary_file(path, "submitted_pickle")
        return jobs


def _remove_empty_folders(folder: Path, stop_at: Path) -> None:
    """Remove `folder` and its parents up to (not including) `stop_at` while they are empty."""
    while folder != stop_at and folder.is_relative_to(stop_at):
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


def slurm_settings(config: RunConfig) -> str:
    """The slurm section as key=value overrides (what sbatch was asked for), for messages."""
    return " ".join(f"slurm.{name}={value if not isinstance(value, dict) else json.dumps(value)}"
                    for name, value in vars(config.slurm).items() if value not in (None, {}))


def _grace_under_kill_wait(config: RunConfig) -> RunConfig:
    """Slurm SIGKILLs a task KillWait seconds after its SIGTERM: the worker's grace (and its commit) must end
    before that, or a scancel loses the stop record and the batch in flight."""
    kill_wait = slurm.kill_wait()
    grace = config.worker.grace_seconds
    if kill_wait is None:
        return config
    safe = max(1.0, kill_wait - max(3.0, 0.25 * kill_wait))
    if grace <= safe:
        return config
    print(f"worker.grace_seconds: {grace:g} s lowered to {safe:g} s for this submission: the cluster's KillWait is "
          f"{kill_wait} s (Slurm kills a task that long after its SIGTERM), and the worker needs the rest to commit")
    return replace(config, worker=replace(config.worker, grace_seconds=safe))


def _slurm_executor(config: RunConfig, folder: Path) -> SliceArrayExecutor:
    s = config.slurm
    executor = SliceArrayExecutor(folder=folder, max_num_timeout=1000)
    parameters = {"job_name": s.job_name, "time": s.time_min, "cpus_per_task": s.cpus_per_task,
                  "gpus_per_node": s.gpus_per_task, "signal_delay_s": s.signal_delay_s,
                  "additional_parameters": {"requeue": True, **s.extra_sbatch},
                  "setup": ["export PYTHONUNBUFFERED=1"]}
    optional = {"partition": s.partition, "account": s.account, "qos": s.qos, "constraint": s.constraint,
                "mem": f"{s.mem_gb}GB" if s.mem_gb else None}
    executor.update_parameters(**parameters, **{k: v for k, v in optional.items() if v is not None})
    return executor


def _pending_slices(layout: OutputLayout, spec: ArraySpec, stale_seconds: float) -> tuple[list[int], list[str]]:
    """Slices to submit, and lines about the ones skipped (complete, or running right now)."""
    todo, skipped = [], []
    for slice_id in spec.indices:
        try:
            state = SliceCheckpoint.load(layout.checkpoint_file(slice_id))
        except CorruptCheckpoint as exc:
            raise VlmHpcError(f"{exc}; rebuild it first: {repair_command(layout)}") from None
        if state is not None and state.complete:
            skipped.append(f"slice {slice_id}: complete")
            continue
        holder = live_holder(layout.lease_file(slice_id), stale_seconds)
        if holder:
            skipped.append(f"slice {slice_id}: running ({holder})")
            continue
        todo.append(slice_id)
    return todo, skipped


def _set_aside_previous_run(layout: OutputLayout) -> None:
    """--force on a folder of another run: keep its bookkeeping, out of the way."""
    suffix = time.strftime("%Y%m%d-%H%M%S")
    for path in layout.run_bookkeeping():
        if path.exists():
            path.rename(layout.set_aside(path, suffix))


def _refuse_changes_while_running(layout: OutputLayout, rows, config: RunConfig, count: int, pins) -> None:
    """Accepting new settings while slices run would let them go on with the old ones past the boundary."""
    try:
        ensure_manifest(layout, rows, config, count, pins, write=False)
        return  # nothing to accept
    except VlmHpcError:
        pass
    running = [slice_id for slice_id in range(count)
               if live_holder(layout.lease_file(slice_id), config.worker.stale_lease_seconds)]
    if running:
        raise VlmHpcError(f"--accept-changes: slices {format_indices(running)} of {layout.root} are running with the "
                          f"settings pinned now and would mix them past the boundary; stop them first (scancel, or "
                          f"touch {layout.root}/kill<N>.txt), then submit again")


def submit(config: RunConfig, spec: ArraySpec, num_slices: int | None, cluster: str, force: bool = False,
           accept_changes: bool = False, command: SubmitCommand | None = None) -> list:
    """Validate, then submit the incomplete slices of `spec`; returns the submitit jobs. `accept_changes`
    accepts settings that differ from those pinned in the manifest (here and in every array task). Nothing of
    the run is written before the cluster accepts the array (a --force set-aside excepted)."""
    layout = OutputLayout(Path(config.output.dir))
    manifest_path = layout.manifest_file
    previous = load_manifest(manifest_path).num_slices if manifest_path.exists() else None
    count = num_slices or previous or (max(spec.indices) + 1)
    if spec.indices[-1] >= count:
        raise VlmHpcError(f"--array {spec} names slice {spec.indices[-1]}, but the run has {count} slices "
                          f"(0..{count - 1}); pass --num-slices or a smaller --array")
    try:
        rows, layout, pins = check_inputs(config, spec.indices[0], count)
    except InputsChanged:
        if not (force and previous is not None):
            raise
        _set_aside_previous_run(layout)  # --force: the shard list of the run set aside is not this input's
        previous = None
        rows, layout, pins = check_inputs(config, spec.indices[0], count)
    # Local tasks run on this node, Slurm's on others (a login node's missing GPU says nothing); only an explicit
    # device can be missing (auto falls back), and importing the engine for the check costs seconds.
    if cluster != "slurm" and config.model.device == "cuda":
        engine_class(config.model.engine).check_device(config)
    if accept_changes and previous is not None:
        _refuse_changes_while_running(layout, rows, config, count, pins)
    if force and previous is not None:
        try:
            ensure_manifest(layout, rows, config, count, pins, accept_changes=accept_changes, write=False)
        except VlmHpcError:
            _set_aside_previous_run(layout)
            rows, layout, pins = check_inputs(config, spec.indices[0], count)  # without the set-aside shard list
    check = ensure_manifest(layout, rows, config, count, pins, accept_changes=accept_changes, write=False)
    todo, skipped = _pending_slices(layout, spec, config.worker.stale_lease_seconds)
    for line in skipped:
        print(f"skip {line}")
    for kill in layout.waiting_kill_files(todo):
        print(f"note: {kill} is waiting: that slice stops as soon as it starts; to let it run: rm {kill}")
    if not todo:
        print(f"nothing to submit: every slice of --array {spec} is complete or running in {layout.root}")
        return []
    folder = layout.submitit_dir
    jobs: list = []
    if cluster == "slurm":
        config = _grace_under_kill_wait(config)
        job = SliceJob(config, count, accept_changes)
        try:
            for offset, tasks in split_for_max_array_size(tuple(todo), slurm.max_array_size()):
                executor = _slurm_executor(config, folder)
                executor.task_ids, executor.throttle = tasks, spec.throttle
                jobs += executor.map_array(job, [offset + task for task in tasks])
        except submitit_utils.FailedJobError as exc:
            if jobs:  # an earlier array of a split submission went in: say which, so nothing runs unseen
                _record_submission(layout, cluster, spec, count, todo[:len(jobs)], jobs, command)
            said = " ".join(line.strip() for line in str(exc).splitlines() if "sbatch:" in line) or str(exc)
            raise VlmHpcError(f"sbatch refused the array: {said[:300]} (asked with: {slurm_settings(config)}); "
                              "change those settings (config or key=value) and submit again"
                              + (f"; slices {format_indices(todo[:len(jobs)])} were submitted" if jobs else "")
                              ) from None
    else:
        job = SliceJob(config, count, accept_changes)
        executor = (submitit.LocalExecutor if cluster == "local" else submitit.DebugExecutor)(folder=folder)
        if cluster == "local":
            executor.update_parameters(timeout_min=config.slurm.time_min)
        jobs = executor.map_array(job, todo)
    for note in ensure_manifest(layout, rows, config, count, pins, accept_changes=accept_changes,
                                planned=None if previous is not None else check.manifest).notes:
        print(f"manifest: {note}")
    _record_submission(layout, cluster, spec, count, todo, jobs, command)
    array_ids = sorted({slurm.array_job_of(str(j.job_id)) for j in jobs})
    slices = f"slice {todo[0]}" if len(todo) == 1 else f"slices {format_indices(todo)}"
    print(f"submitted {slices} (of {count}) on {cluster}: job {', '.join(array_ids)}")
    print(f"output: {layout.root}")
    print(f"watch:  python -m vlm_hpc.status {shlex.quote(str(layout.root))}" +
          (f"   |   squeue -j {','.join(array_ids)}" if cluster == "slurm" else ""))
    print(f"logs:   {layout.logs_dir}/slice_NNNNN.log")
    again = command.line() if command else "the same submit command"
    if cluster == "slurm":
        print(f"stop:   scancel {array_ids[0]}_N (slice N) or scancel {' '.join(array_ids)}; "
              f"resume: {again}")
    else:
        print(f"stop:   touch {layout.root}/killN.txt (slice N); resume: {again}")
    return jobs


def _record_submission(layout: OutputLayout, cluster: str, spec: ArraySpec, count: int, todo: list[int],
                       jobs: list, command: SubmitCommand | None) -> None:
    """One line in submissions.jsonl: status maps slices to their Slurm tasks and prints the resubmit command."""
    record_submission(layout, {"cluster": cluster, "array": str(spec), "num_slices": count,
                               "jobs": {str(slice_id): str(j.job_id) for slice_id, j in zip(todo, jobs)},
                               "command": command.to_dict() if command else None})


def _choose_cluster(asked: str | None, retry_locally: str) -> str:
    """--cluster as given; by default slurm where a controller answers, local where there is no sbatch."""
    if asked in ("local", "debug"):
        return asked
    if asked is None and not shutil.which("sbatch"):
        return "local"
    problem = slurm.controller_problem()
    if problem:
        raise VlmHpcError(f"no Slurm controller answers here ({problem}); check SLURM_CONF and the controller, or "
                          f"run the array on this machine: {retry_locally}")
    return "slurm"


def wait_for_jobs(jobs: list, output: Path, started: float, every_s: float = 10.0) -> int:
    """Print a progress line over the whole run until every job has ended, then each slice's outcome and a
    closing summary; the exit code: 0 when every job finished, 1 otherwise."""
    last = 0.0
    while not all(job.done() for job in jobs):
        if time.monotonic() - last >= every_s:
            last = time.monotonic()
            try:
                statuses, num_rows = collect(output)
                print(f"progress: {overall_line(statuses, num_rows)}", flush=True)
            except VlmHpcError as exc:
                print(f"progress: not readable yet ({exc})", flush=True)
        time.sleep(0.5)
    failed = 0
    for job in jobs:
        try:
            summary = job.result()
            print(f"slice {summary['slice']}: {summary['status']}: {OutcomeCounts(**summary['outcomes']).describe()}")
        except Exception as exc:  # a task that was stopped, cancelled or crashed
            failed += 1
            print(f"job {job.job_id}: not finished ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
    statuses, num_rows = collect(output)
    elapsed = time.strftime("%H:%M:%S", time.gmtime(time.time() - started))
    print(f"finished in {elapsed}: {overall_line(statuses, num_rows)}")
    print(f"output: {output}")
    print(f"check it: python -m vlm_hpc.verify {shlex.quote(str(output))}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlm_hpc.submit", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
    parser.add_argument("--array", required=True, help="slices to run, as Slurm writes it: 0-63, 0-63%%16, 3,7,10-12")
    parser.add_argument("--num-slices", type=int, default=None,
                        help="slices the dataset is cut into (default: largest index + 1, then fixed)")
    parser.add_argument("--cluster", choices=("slurm", "local", "debug"), default=None,
                        help="local: subprocesses, debug: in-process; default: slurm if sbatch is on PATH, else local")
    parser.add_argument("--force", action="store_true", help="reuse an output folder of another run")
    parser.add_argument("--accept-changes", action="store_true",
                        help="go on although settings pinned in OUTPUT/manifest.json changed (recorded there)")
    parser.add_argument("--wait", action="store_true", help="wait for the jobs and print how each slice ended")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides: generation.batch_size=8")
    args = parser.parse_args(argv)
    started = time.time()
    command = command_of(args.config, args.overrides, args.num_slices, args.cluster)
    try:
        local = replace(command, cluster="local").line(args.array)
        cluster = _choose_cluster(args.cluster, local)
        config = load_config(args.config, args.overrides)
        jobs = submit(config, parse_array(args.array), args.num_slices, cluster, args.force, args.accept_changes,
                      command)
    except VlmHpcError as exc:
        return print_error(exc)
    if not args.wait or not jobs:
        return 0
    return wait_for_jobs(jobs, Path(config.output.dir), started)


if __name__ == "__main__":
    sys.exit(main())
