"""sbatch_templates/caption_array.sbatch without a cluster: stand-ins for sbatch and scontrol record what it asks,
and a stand-in Python records the worker command line each array task would run."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vlm_hpc.config import SlurmSection

ROOT = Path(__file__).parent.parent
TEMPLATE = ROOT / "sbatch_templates" / "caption_array.sbatch"


def executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def place(tmp_path: Path) -> dict:
    """A clone with its .venv (whose python runs this one, except that the worker only prints its arguments), a
    config, and sbatch and scontrol stand-ins on PATH."""
    repo = tmp_path / "clone"
    (repo / "sbatch_templates").mkdir(parents=True)
    shutil.copy(TEMPLATE, repo / "sbatch_templates")
    python = executable(repo / ".venv" / "bin" / "python", f'#!/bin/bash\n[[ "$1 $2" == "-m vlm_hpc.worker" ]] && '
                        f'{{ echo "worker ${{*:3}}"; exit 0; }}\nexec {sys.executable} "$@"\n')
    bin_dir = tmp_path / "bin"
    executable(bin_dir / "sbatch", f'#!/bin/bash\nprintf "%s\\n" "$@" > {tmp_path}/sbatch.args\n'
                                   f'echo "$VLM_HPC_PYTHON" > {tmp_path}/sbatch.python\necho "Submitted batch job 5"\n')
    executable(bin_dir / "scontrol", f'#!/bin/bash\necho "JobId=$3 JobName=vlm_hpc"\n'
                                     f'echo "   Command={repo}/sbatch_templates/caption_array.sbatch"\n')
    config = tmp_path / "my.yaml"
    config.write_text(yaml.safe_dump({"output": {"dir": str(tmp_path / "out")}, "slurm": {
        "cpus_per_task": 3, "mem_gb": 5, "partition": "gpu", "extra_sbatch": {"exclude": "node1", "exclusive": True}}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "VLM_HPC_"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", PYTHONPATH=str(ROOT))
    return {"root": tmp_path, "template": repo / "sbatch_templates" / "caption_array.sbatch", "python": python,
            "config": config, "env": env, "logs": tmp_path / "out" / "logs"}


def test_run_by_hand_it_submits_itself_with_the_configs_resources_and_logs(place: dict) -> None:
    run = subprocess.run(["bash", str(place["template"]), "--array=0-3", "--dependency=afterok:1", str(place["config"]),
                          "generation.batch_size=2"], env=place["env"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert (place["root"] / "sbatch.args").read_text().splitlines() == [
        "--job-name=vlm_hpc", "--time=240", "--cpus-per-task=3", "--gres=gpu:1", "--signal=USR2@120",
        "--partition=gpu", "--mem=5G", f"--output={place['logs']}/sbatch_%A_%a.out", "--exclude=node1",
        "--exclusive", "--array=0-3", "--dependency=afterok:1", str(place["template"]), str(place["config"]),
        "generation.batch_size=2"]
    assert place["logs"].is_dir()  # sbatch does not make the --output folder
    assert (place["root"] / "sbatch.python").read_text().strip() == str(place["python"])
    assert run.stdout.splitlines()[-1].startswith(f"logs: {place['logs']}/")


@pytest.mark.parametrize(("arguments", "message"), [
    (["CONFIG"], "--array=SPEC is missing"),
    (["--array=0-3", "CONFIG", "slurm.cpu_per_task=2"], "did you mean 'cpus_per_task'"),
])
def test_a_bad_submission_submits_nothing(place: dict, arguments: list[str], message: str) -> None:
    arguments = [str(place["config"]) if a == "CONFIG" else a for a in arguments]
    run = subprocess.run(["bash", str(place["template"]), *arguments], env=place["env"], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode != 0 and message in run.stderr, run.stderr
    assert not (place["root"] / "sbatch.args").exists()


@pytest.mark.parametrize("how", ["from the template", "plain sbatch"])
def test_an_array_task_runs_the_worker_with_the_projects_python(place: dict, how: str) -> None:
    """As the template submits itself (VLM_HPC_PYTHON set, --output given), and as plain sbatch runs Slurm's copy of
    it with the #SBATCH --output=/dev/null: the original is found through scontrol, the output goes to OUTPUT/logs."""
    env = {**place["env"], "SLURM_JOB_ID": "9", "SLURM_ARRAY_JOB_ID": "5", "SLURM_ARRAY_TASK_ID": "2",
           "SLURM_ARRAY_TASK_MAX": "3"}
    if how == "from the template":
        env["VLM_HPC_PYTHON"] = str(place["python"])
        script, stdout = place["template"], subprocess.PIPE
    else:
        script, stdout = shutil.copy(place["template"], place["root"] / "slurm_script"), subprocess.DEVNULL
    run = subprocess.run(["bash", str(script), str(place["config"]), "tiling.max_num=4"], env=env, stdout=stdout,
                         stderr=subprocess.STDOUT, text=True, timeout=60)
    assert run.returncode == 0
    expected = f"worker --config {place['config']} --slice 2 --num-slices 4 tiling.max_num=4\n"
    log = place["logs"] / "sbatch_5_2.out"
    if how == "from the template":
        assert run.stdout == expected and not log.exists()
    else:
        assert log.read_text() == expected


def test_the_sbatch_defaults_are_the_configs() -> None:
    """Plain sbatch uses the #SBATCH lines as its resources: they are the slurm: section's defaults."""
    lines = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", TEMPLATE.read_text(), re.MULTILINE))
    s = SlurmSection()
    assert s.mem_gb is None and "mem" not in lines  # no memory asked: the cluster's default
    assert {k: lines[k] for k in ("job-name", "gres", "cpus-per-task", "time", "signal")} == {
        "job-name": s.job_name, "gres": f"gpu:{s.gpus_per_task}", "cpus-per-task": str(s.cpus_per_task),
        "time": str(s.time_min), "signal": f"USR2@{s.signal_delay_s}"}
