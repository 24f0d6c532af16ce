"""The worker's own overhead, with the model and the image work taken out.

`python benchmarks/overhead.py [--rows N] [--resume-rows N] [--json PATH]` measures:
1. rows/s through `run_slice` with a null engine (instant captions) and a null preparation step (no
   decoding or tiling, measured separately by preprocess.py), for output.format json and jsonl: reading
   rows from the memory-mapped dataset, the DataLoader, committing outputs durably and the index;
2. resume start-up: a slice of N rows of which all but the last batch are committed, timed from the call
   to `run_slice` until the engine would be loaded (it must not grow with captions already written).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import datasets
import torch

import vlm_hpc.run.prefetch as prefetch
import vlm_hpc.run.slice_run as worker
from harness import Stopwatch, run_info, write_results
from vlm_hpc.config import load_config
from vlm_hpc.engines.base import Caption, Engine
from vlm_hpc.run.checkpoint import SliceCheckpoint
from vlm_hpc.run.layout import OutputLayout
from vlm_hpc.run.manifest import ensure_manifest
from vlm_hpc.tiny_model import write_tiny_model


class NullEngine(Engine):
    """Captions instantly; what the worker needs of an engine and nothing more."""

    @classmethod
    def from_config(cls, config) -> NullEngine:
        return cls()

    def prompt(self, num_tiles: int) -> str:
        return f"null prompt with {num_tiles} tiles"

    def caption(self, tiles, settings=None, poll=None) -> list[Caption]:
        return [Caption(text=f"caption of a {t.shape[0]}-tile image", token_ids=[1, 2], stopped=True) for t in tiles]

    def describe(self) -> dict[str, str]:
        return {"device": "none", "dtype": "none", "system_message": "null"}


def null_prepare(row, max_num, skip_truncated, duplicate_of, is_sample):
    """Stands in for decode + tile: one empty 'tile', so the engine path is taken."""
    return prefetch.PreparedRow(row.row, row.key, row.web_caption, tiles=torch.zeros(1, 3, 1, 1, dtype=torch.uint8))


def make_dataset(folder: Path, rows: int) -> Path:
    table = {"new_key": [f"key_{i:08d}" for i in range(rows)], "png": [b"\x89PNG-not-decoded"] * rows,
             "caption": [f"web caption {i}" for i in range(rows)]}
    datasets.Dataset.from_dict(table).save_to_disk(str(folder), max_shard_size="2GB")
    return folder


def throughput(work: Path, model: Path, data: Path, rows: int, output_format: str, batch_size: int) -> float:
    output = work / f"out_{output_format}"
    config = load_config(None, [f"model.path={model}", f"data.path={data}", f"output.dir={output}",
                                f"output.format={output_format}", f"generation.batch_size={batch_size}",
                                "worker.loader_workers=2", "output.max_sample_images=1"])
    watch = Stopwatch()
    outcome = worker.run_slice(config, 0, 1, engine_factory=lambda _: NullEngine())
    seconds = watch.wall_s()
    assert outcome.status == "done" and outcome.checkpoint.captions == rows, outcome
    return rows / seconds


def resume_startup(work: Path, model: Path, data: Path, rows: int, batch_size: int) -> float:
    """Seconds from run_slice() to the engine factory on a slice with rows - batch_size rows committed."""
    output = work / "out_resume"
    config = load_config(None, [f"model.path={model}", f"data.path={data}", f"output.dir={output}",
                                f"generation.batch_size={batch_size}", "worker.loader_workers=0"])
    layout = OutputLayout(output)
    rows_source, layout, pins = worker.check_inputs(config, 0, 1)
    ensure_manifest(layout, rows_source, config, 1, pins)  # made once by the first start; not part of a resume
    layout.state_dir.mkdir(parents=True, exist_ok=True)
    SliceCheckpoint(slice=0, num_slices=1, start=0, stop=rows, done=[[0, rows - batch_size]],
                    captions=rows - batch_size, status="stopped").save(layout.checkpoint_file(0))
    reached: list[float] = []
    watch = Stopwatch()

    def factory(_config):
        reached.append(watch.wall_s())
        return NullEngine()

    worker.run_slice(config, 0, 1, engine_factory=factory)
    return reached[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000, help="rows for the throughput runs")
    parser.add_argument("--resume-rows", type=int, default=1_000_000, help="committed rows for the resume run")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    prefetch.prepare_row = null_prepare  # the benchmark's one substitution: no image work
    work = Path(tempfile.mkdtemp(prefix="vlm_hpc_overhead_"))
    try:
        model = write_tiny_model(work / "model")
        data = make_dataset(work / "data", args.rows)
        results = {**run_info(), "rows": args.rows, "batch_size": args.batch_size, "machine": platform.platform(),
                   "python": platform.python_version()}
        for output_format in ("json", "jsonl"):
            results[f"{output_format}_rows_per_s"] = throughput(work, model, data, args.rows, output_format,
                                                                args.batch_size)
            print(f"{output_format:>5}: {results[f'{output_format}_rows_per_s']:.0f} rows/s "
                  f"({args.rows} rows, batch {args.batch_size}, 2 loader workers)", flush=True)
        big = make_dataset(work / "big", args.resume_rows)
        results["resume_rows"] = args.resume_rows
        results["resume_startup_s"] = resume_startup(work, model, big, args.resume_rows, args.batch_size)
        print(f"resume start-up with {args.resume_rows} committed rows: {results['resume_startup_s']:.2f} s")
        if args.json:
            write_results(args.json, results, indent=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
