"""What every benchmark here needs around its measurement: a stopwatch, the record of where and how a run
was made (command, date, machine), and writing the numbers as JSON (benchmarks/results/ by convention)."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch


class Stopwatch:
    """Wall (perf_counter) and process-CPU (process_time) seconds since it was made."""

    def __init__(self) -> None:
        self._wall_start, self._cpu_start = time.perf_counter(), time.process_time()

    def wall_s(self) -> float:
        return time.perf_counter() - self._wall_start

    def cpu_s(self) -> float:
        return time.process_time() - self._cpu_start


def run_info() -> dict[str, object]:
    """The command line and the UTC date of this run."""
    return {"command": sys.argv, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def machine_info(**versions: object) -> dict[str, object]:
    """CPU, Python, torch and platform; `versions` adds what a benchmark also depends on (libraries, paths)."""
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        **versions,
        "platform": platform.platform(),
    }


def write_results(path: Path, record: dict[str, object], indent: int = 2) -> None:
    """`record` as JSON at `path`, making its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=indent) + "\n")
