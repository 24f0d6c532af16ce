"""Where this process runs: host, pid and, under Slurm, which job array task (read from SLURM_* variables)."""

from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass

from vlm_hpc.cluster import slurm


@dataclass(frozen=True)
class JobEnvironment:
    host: str
    pid: int
    job_id: str | None  # SLURM_JOB_ID: stays the same across requeues of one array task
    array_job_id: str | None
    array_task_id: str | None
    restart_count: int
    cuda_visible_devices: str | None  # set per task by Slurm's gres plugin

    @classmethod
    def current(cls) -> JobEnvironment:
        env = os.environ
        return cls(
            host=socket.gethostname(), pid=os.getpid(), job_id=env.get("SLURM_JOB_ID"),
            array_job_id=env.get("SLURM_ARRAY_JOB_ID"), array_task_id=env.get("SLURM_ARRAY_TASK_ID"),
            restart_count=int(env.get("SLURM_RESTART_COUNT", "0") or 0),
            cuda_visible_devices=env.get("CUDA_VISIBLE_DEVICES"),
        )

    @property
    def slurm_task(self) -> str | None:
        """The id `scancel`/`scontrol requeue` take for this task: ARRAYJOB_TASK, or the plain job id."""
        return slurm.task_id(self.job_id, self.array_job_id, self.array_task_id)

    def describe(self) -> str:
        job = f", Slurm job {self.slurm_task} (restart {self.restart_count})" if self.slurm_task else ""
        gpus = f", CUDA_VISIBLE_DEVICES={self.cuda_visible_devices}" if self.cuda_visible_devices is not None else ""
        return f"host {self.host} pid {self.pid}{job}{gpus}"

    def to_dict(self) -> dict:
        return asdict(self)

