"""OUTPUT/submissions.jsonl: which Slurm task runs which slice, and the command that submitted it.

`vlm_hpc.submit` appends one line per submission; a worker started by the sbatch template appends one line at
its start, naming its array job (whose task ids are the slice ids), so status sees that array's queued tasks
too. Status reads the latest job of each slice and the latest command, to print a resubmit hint that runs as
printed.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vlm_hpc.cluster import slurm
from vlm_hpc.run.layout import OutputLayout


@dataclass(frozen=True)
class SubmitCommand:
    """A submit command line as the user gave it, to print again with another --array."""

    config: str | None  # absolute path of --config, None for the built-in defaults
    overrides: list[str] = field(default_factory=list)  # key=value, as given
    num_slices: int | None = None
    cluster: str | None = None  # --cluster when given

    def line(self, array: str | None = None) -> str:
        """`python -m vlm_hpc.submit ...`, with `array` as --array (or the placeholder SLICES)."""
        words = ["python", "-m", "vlm_hpc.submit"]
        if self.config:
            words += ["--config", self.config]
        words += ["--array", array or "SLICES"]
        if self.num_slices is not None:
            words += ["--num-slices", str(self.num_slices)]
        if self.cluster:
            words += ["--cluster", self.cluster]
        return shlex.join(words + self.overrides)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: object) -> SubmitCommand | None:
        if not isinstance(record, dict):
            return None
        try:
            return cls(config=record.get("config"), overrides=[str(o) for o in record.get("overrides") or []],
                       num_slices=record.get("num_slices"), cluster=record.get("cluster"))
        except (TypeError, ValueError):
            return None


@dataclass
class Submissions:
    """What submissions.jsonl says now: each slice's latest Slurm task, arrays whose tasks are slices, the latest
    command."""

    jobs: dict[int, str] = field(default_factory=dict)
    slice_arrays: set[str] = field(default_factory=set)  # sbatch-template arrays: task id == slice id
    command: SubmitCommand | None = None

    def slurm_states(self) -> dict[int, str]:
        """Each slice's Slurm state, asked once (one squeue for every array)."""
        arrays = {slurm.array_job_of(task) for task in self.jobs.values()} | self.slice_arrays
        states = slurm.array_task_states(arrays)
        by_slice = {slice_id: states[task] for slice_id, task in self.jobs.items() if task in states}
        for task, state in states.items():
            array, _, index = task.partition("_")
            if array in self.slice_arrays and index.isdigit() and int(index) not in self.jobs:
                by_slice[int(index)] = state
        return by_slice


def read_submissions(layout: OutputLayout) -> Submissions:
    """The submissions of the run in `layout`; torn or foreign lines are skipped (their jobs are not shown)."""
    found = Submissions()
    path = layout.submissions_file
    if not path.exists():
        return found
    for line in path.read_bytes().decode(errors="replace").splitlines():
        try:
            record = json.loads(line)
            if record.get("cluster") == "slurm":
                found.jobs.update({int(k): str(v) for k, v in record["jobs"].items()})
                if record.get("slice_array"):
                    found.slice_arrays.add(str(record["slice_array"]))
            found.command = SubmitCommand.from_dict(record.get("command")) or found.command
        except (ValueError, AttributeError, TypeError, KeyError):
            continue
    return found


def record_submission(layout: OutputLayout, record: dict) -> None:
    """Append one record (a submission, or a template worker's start) to submissions.jsonl."""
    with open(layout.submissions_file, "a") as handle:
        handle.write(json.dumps({"time": time.time(), **record}) + "\n")


def record_template_task(layout: OutputLayout, slice_id: int, task: str | None, array_job: str | None) -> None:
    """A worker under Slurm that no submit recorded (the sbatch template): its task and its array."""
    if not task:
        return
    known = read_submissions(layout)
    if known.jobs.get(slice_id) == task:
        return  # submitted by vlm_hpc.submit (or recorded at an earlier start of this task)
    record: dict = {"cluster": "slurm", "source": "worker", "jobs": {str(slice_id): task}}
    if array_job:
        record["slice_array"] = array_job
    record_submission(layout, record)


def command_of(path: Path | None, overrides: list[str], num_slices: int | None, cluster: str | None) -> SubmitCommand:
    """The SubmitCommand of a submit call (its --config made absolute, so the hint runs from anywhere)."""
    return SubmitCommand(str(Path(path).resolve()) if path else None, list(overrides), num_slices, cluster)
