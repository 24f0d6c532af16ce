"""CPU cost of image preprocessing: the original (seed) pipeline against vlm_hpc's, on the same images.

    python benchmarks/preprocess.py --images DIR [--max-num 9] [--repeats 3] [--threads 1] [--json PATH]
                                    [--stages] [--golden tests/fixtures/golden/tiling_golden.json]

What it measures
* REFERENCE: the seed's steps, re-written from their semantics in `seed_reference.py` (`reference_preprocess`):
  ROVI's `process_types_of_img`, InternVL's `dynamic_preprocess`, then per tile torchvision's ToTensor +
  Normalize and `torch.stack`.
* OURS: `normalize(tile_image(decode_image(data).image, max_num))` from the package, and the same without
  `normalize` ("uint8" line), which is what a worker does when the engine normalizes on the GPU.

How
1. Every *.png/*.jpg/*.jpeg/*.webp in DIR is read into memory first, so disk time is not measured.
2. Every pipeline runs once on every image and its float32 output is compared with the reference's using
   `torch.equal` (uint8 outputs after the package's exact `normalize`). This is also the warm-up pass. The
   normalizers are also checked on all 3 x 256 (channel, value) inputs.
3. Each pipeline makes `--repeats` full passes over all images, interleaved (reference, ours float32, ours
   uint8, then again), so slow drifts of a shared machine hit all three alike. One torch thread, and the
   process is pinned to one CPU, so images/s is per core. Per pass we record wall time and process CPU time;
   CPU/wall well below 1 means another tenant took our core during that pass.
4. Optional `--stages`: ms per image for each stage of the pipelines (where the time goes).
   Optional `--golden`: sha256 of the reference's output against the golden file recorded by running the
   original code, which shows that the reference here is the seed's pipeline.

The last line printed is exactly `speedup X.XX identical=yes|no` (X.XX = reference / ours float32, medians).
Exit status 0 when every checked output is bit-identical, 1 otherwise.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image

from harness import Stopwatch, machine_info, run_info, write_results
from seed_reference import (
    reference_crop_tiles,
    reference_grid,
    reference_mode_handling,
    reference_open,
    reference_preprocess,
    reference_resize_to_grid,
    reference_thumbnail,
    reference_tile_transform,
    reference_truncation_setting,
)
from vlm_hpc.preprocess.decode import decode_image
from vlm_hpc.preprocess.resampling import resampler
from vlm_hpc.preprocess.tiling import normalize, tile_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")

# A pinned single-threaded pass that got less CPU than this share of its wall time was preempted.
PREEMPTED_CPU_OVER_WALL = 0.9

# ---------------------------------------------------------------------------------------------------------------
# Ours: the package's implementation, called exactly as the caption worker calls it.
# ---------------------------------------------------------------------------------------------------------------


def ours_preprocess(data: bytes, max_num: int) -> torch.Tensor:
    """vlm_hpc: image bytes -> float32 pixel_values, normalized on the CPU."""
    return normalize(tile_image(decode_image(data).image, max_num))


def ours_preprocess_uint8(data: bytes, max_num: int) -> torch.Tensor:
    """vlm_hpc as the engine uses it: uint8 tiles only; normalization happens later on the GPU."""
    return tile_image(decode_image(data).image, max_num)


@dataclass(frozen=True)
class Pipeline:
    name: str
    run: Callable[[bytes, int], torch.Tensor]
    output: str  # "float32": pixel_values; "uint8": tiles, checked through the package's exact `normalize`


def pipelines() -> list[Pipeline]:
    """The timed pipelines; the reference comes first, every speedup is relative to it."""
    return [
        Pipeline("reference", reference_preprocess, "float32"),
        Pipeline("ours float32", ours_preprocess, "float32"),
        Pipeline("ours uint8", ours_preprocess_uint8, "uint8"),
    ]


# ---------------------------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    names: list[str]
    blobs: list[bytes]

    @property
    def total_bytes(self) -> int:
        return sum(len(blob) for blob in self.blobs)


def load_corpus(directory: Path) -> Corpus:
    """Every image file in `directory` (not recursive), sorted by name, read fully into memory."""
    paths = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SystemExit(f"no {'/'.join(IMAGE_SUFFIXES)} files in {directory}")
    return Corpus(names=[p.name for p in paths], blobs=[p.read_bytes() for p in paths])


@dataclass
class Mismatch:
    pipeline: str
    image: str
    reference_shape: list[int]
    ours_shape: list[int]
    max_abs_diff: float | None  # None when the shapes differ


@dataclass
class IdentityReport:
    images: int
    tiles: int = 0
    identical: dict[str, int] = field(default_factory=dict)  # pipeline -> images bit-identical to the reference
    mismatches: list[Mismatch] = field(default_factory=list)


def check_identity(corpus: Corpus, max_num: int, chosen: list[Pipeline]) -> IdentityReport:
    """Run every pipeline on every image and compare its float32 output with the reference's, bit for bit.

    uint8 pipelines are compared after the package's `normalize`, which is exact (its own exhaustive check is
    `check_normalize_exhaustively`). This pass is also the warm-up of every pipeline.
    """
    reference, others = chosen[0], chosen[1:]
    report = IdentityReport(images=len(corpus.blobs), identical={p.name: 0 for p in others})
    for image_name, blob in zip(corpus.names, corpus.blobs, strict=True):
        expected = reference.run(blob, max_num)
        report.tiles += expected.shape[0]
        for pipeline in others:
            actual = pipeline.run(blob, max_num)
            if pipeline.output == "uint8":
                actual = normalize(actual)
            if expected.dtype == actual.dtype and torch.equal(expected, actual):
                report.identical[pipeline.name] += 1
                continue
            same_shape = expected.shape == actual.shape
            diff = (expected.double() - actual.double()).abs().max().item() if same_shape else None
            report.mismatches.append(
                Mismatch(pipeline.name, image_name, list(expected.shape), list(actual.shape), diff)
            )
    return report


def check_normalize_exhaustively(normalize_fn: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """normalize_fn(uint8 tiles) == ToTensor + Normalize for all 3 x 256 (channel, value) inputs.

    Normalization is element-wise, so these 768 inputs cover every possible input value."""
    values = torch.arange(256, dtype=torch.uint8).view(16, 16)
    planes = torch.stack([values.roll(85 * channel) for channel in range(3)])  # every value in every channel
    tile = Image.fromarray(planes.permute(1, 2, 0).numpy(), "RGB")
    expected = reference_tile_transform(tile)
    return torch.equal(normalize_fn(planes.unsqueeze(0))[0], expected)


@dataclass
class PassTimes:
    wall_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.wall_s)

    @property
    def best(self) -> float:
        return min(self.wall_s)

    @property
    def cpu_over_wall(self) -> float:
        return min(c / w for c, w in zip(self.cpu_s, self.wall_s, strict=True))


def time_pass(pipeline: Callable[[bytes, int], torch.Tensor], blobs: list[bytes], max_num: int) -> tuple[float, float]:
    """Wall and process-CPU seconds for one pass of `pipeline` over all images."""
    gc.collect()  # start every pass from the same collector state
    watch = Stopwatch()
    for blob in blobs:
        pipeline(blob, max_num)
    return watch.wall_s(), watch.cpu_s()


def time_pipelines(corpus: Corpus, max_num: int, repeats: int, chosen: list[Pipeline]) -> dict[str, PassTimes]:
    """`repeats` passes of every pipeline, interleaved so machine noise is shared out evenly."""
    times = {pipeline.name: PassTimes() for pipeline in chosen}
    for _ in range(repeats):
        for pipeline in chosen:
            wall, cpu = time_pass(pipeline.run, corpus.blobs, max_num)
            times[pipeline.name].wall_s.append(wall)
            times[pipeline.name].cpu_s.append(cpu)
    return times


# --- per-stage timing (--stages) -------------------------------------------------------------------------------


class StageClock:
    """Accumulates perf_counter seconds per stage name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def start(self) -> None:
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._last
        self._last = now


def reference_stages(blob: bytes, max_num: int, clock: StageClock) -> None:
    with reference_truncation_setting(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clock.start()
        image = reference_open(blob)
        clock.lap("decode (open+load)")
        image = reference_mode_handling(image)
        clock.lap("mode handling")
        grid = reference_grid(image, max_num)
        clock.lap("grid choice")
        resized = reference_resize_to_grid(image, grid)
        clock.lap("resize to grid")
        tiles = reference_crop_tiles(resized, grid)
        clock.lap("crop tiles")
        if len(tiles) != 1:
            tiles.append(reference_thumbnail(image))
        clock.lap("thumbnail resize")
        tensors = [reference_tile_transform(tile) for tile in tiles]
        clock.lap("ToTensor+Normalize")
        torch.stack(tensors)
        clock.lap("stack")


def ours_stages(blob: bytes, max_num: int, clock: StageClock) -> None:
    clock.start()
    image = decode_image(blob).image
    clock.lap("decode_image (open+load+mode)")
    tiles = tile_image(image, max_num)
    clock.lap("tile_image (2 resizes into tiles)")
    normalize(tiles)
    clock.lap("normalize (float32 ops)")


StageFunction = Callable[[bytes, int, StageClock], None]


def time_stages(corpus: Corpus, max_num: int, repeats: int) -> dict[str, dict[str, float]]:
    """Median over repeats of ms per image for every stage of each pipeline."""
    stage_functions: dict[str, StageFunction] = {"reference": reference_stages, "ours": ours_stages}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in stage_functions}
    for _ in range(repeats):
        for name, stages in stage_functions.items():
            clock = StageClock()
            gc.collect()
            for blob in corpus.blobs:
                stages(blob, max_num, clock)
            runs[name].append(clock.seconds)
    count = len(corpus.blobs)
    return {
        name: {stage: 1000 * statistics.median(run[stage] for run in passes) / count for stage in passes[0]}
        for name, passes in runs.items()
    }


# --- golden check (--golden) -----------------------------------------------------------------------------------


def check_golden(corpus: Corpus, max_num: int, golden_json: Path) -> dict[str, object]:
    """sha256 of the float32 outputs of both pipelines against pixel_values_sha256 recorded from the original code."""
    golden = json.loads(golden_json.read_text())
    file_to_key = {entry["file"]: entry["key"] for entry in golden["images"]}
    expected = {case["key"]: case["pixel_values_sha256"] for case in golden["cases"] if case["max_num"] == max_num}
    result: dict[str, object] = {"max_num": max_num, "checked": 0, "reference_match": 0, "ours_match": 0}
    if not expected:
        result["note"] = f"the golden file has no cases for max_num {max_num} (it has {golden['max_nums']})"
        return result
    for name, blob in zip(corpus.names, corpus.blobs, strict=True):
        key = file_to_key.get(name)
        if key not in expected:
            continue
        result["checked"] += 1
        for label, pipeline in (("reference", reference_preprocess), ("ours", ours_preprocess)):
            digest = hashlib.sha256(pipeline(blob, max_num).contiguous().numpy().tobytes()).hexdigest()
            result[f"{label}_match"] += int(digest == expected[key])
    return result


# ---------------------------------------------------------------------------------------------------------------
# Environment, report, main
# ---------------------------------------------------------------------------------------------------------------


def pin_to_one_cpu(cpu: int | None) -> int | None:
    """Pin this process to one CPU (default: the last one we may use); returns it, or None where unsupported."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    chosen = allowed[-1] if cpu is None else cpu
    os.sched_setaffinity(0, {chosen})
    return chosen


def load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def print_report(
    corpus: Corpus, args: argparse.Namespace, cpu: int | None, identity: IdentityReport, times: dict[str, PassTimes]
) -> float:
    """Print the table; returns the float32 speedup (reference median / ours float32 median)."""
    count = len(corpus.blobs)
    pinned = f"pinned to CPU {cpu}" if cpu is not None else "not pinned"
    print(
        f"corpus: {count} images, {corpus.total_bytes / 1e6:.1f} MB, from {args.images}; max_num {args.max_num}; "
        f"{identity.tiles} tiles/pass ({identity.tiles / count:.2f}/image); {args.repeats} repeats; "
        f"{args.threads} torch thread(s), {pinned}; bicubic resize by {resampler()}"
    )
    header = (
        f"{'pipeline':<15} {'median s':>9} {'min s':>8} {'ms/img':>8} {'img/s/core':>11} "
        f"{'speedup med':>12} {'speedup min':>12} {'cpu/wall':>9} {'identical':>10}"
    )
    print(header)
    print("-" * len(header))
    reference = times["reference"]
    for name, result in times.items():
        same = f"{identity.identical[name]}/{identity.images}" if name in identity.identical else "-"
        print(
            f"{name:<15} {result.median:>9.3f} {result.best:>8.3f} {1000 * result.median / count:>8.2f} "
            f"{count / result.median / args.threads:>11.2f} {reference.median / result.median:>11.2f}x "
            f"{reference.best / result.best:>11.2f}x {result.cpu_over_wall:>9.3f} {same:>10}"
        )
    print("(ms/img and img/s/core from the median pass; cpu/wall is the lowest over the passes, well below 1.0")
    print(" means another process took our core; identical = images whose float32 output equals the reference's")
    print(" bit for bit (torch.equal), uint8 pipelines through the package's exact normalize)")
    preempted = sum(
        cpu / wall < PREEMPTED_CPU_OVER_WALL
        for result in times.values()
        for cpu, wall in zip(result.cpu_s, result.wall_s, strict=True)
    )
    if preempted:
        print(
            f"warning: {preempted} pass(es) ran with cpu/wall < {PREEMPTED_CPU_OVER_WALL}: the machine was busy; "
            "compare medians with care or run again"
        )
    for mismatch in identity.mismatches:
        print(
            f"  MISMATCH {mismatch.pipeline} on {mismatch.image}: reference {mismatch.reference_shape}, "
            f"ours {mismatch.ours_shape}, max |diff| {mismatch.max_abs_diff}"
        )
    return reference.median / times["ours float32"].median


def print_stages(stages: dict[str, dict[str, float]]) -> None:
    for name, per_stage in stages.items():
        total = sum(per_stage.values())
        print(f"stages, {name} (median ms/image): total {total:.2f}")
        for stage, ms in per_stage.items():
            print(f"  {stage:<32} {ms:>8.2f}  {100 * ms / total:>5.1f}%")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True, help="folder of *.png/*.jpg/*.jpeg/*.webp files")
    parser.add_argument("--max-num", type=int, default=9, help="maximum number of grid tiles (default 9)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per pipeline (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 1 also pins one CPU)")
    parser.add_argument("--cpu", type=int, default=None, help="CPU to pin to (default: the last allowed one)")
    parser.add_argument("--stages", action="store_true", help="also time each stage of the pipelines")
    parser.add_argument("--golden", type=Path, default=None, help="tiling_golden.json to check sha256 against")
    parser.add_argument("--json", type=Path, default=None, help="write all numbers to this JSON file")
    args = parser.parse_args(argv)
    if args.max_num < 1 or args.repeats < 1 or args.threads < 1:
        parser.error("--max-num, --repeats and --threads must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cpu = pin_to_one_cpu(args.cpu) if args.threads == 1 else None
    corpus = load_corpus(args.images)
    chosen = pipelines()
    load_before = load_average()

    normalize_exact = {"package normalize": check_normalize_exhaustively(normalize)}
    identity = check_identity(corpus, args.max_num, chosen)
    times = time_pipelines(corpus, args.max_num, args.repeats, chosen)
    stages = time_stages(corpus, args.max_num, args.repeats) if args.stages else None
    golden = check_golden(corpus, args.max_num, args.golden) if args.golden else None

    speedup = print_report(corpus, args, cpu, identity, times)
    print(
        "exhaustive normalize check (3 x 256 inputs): "
        + ", ".join(f"{name} {'exact' if ok else 'NOT EXACT'}" for name, ok in normalize_exact.items())
    )
    if stages:
        print_stages(stages)
    if golden:
        print(
            f"golden ({args.golden.name}, max_num {args.max_num}): {golden['checked']} images checked, "
            f"reference sha256 match {golden['reference_match']}, ours {golden['ours_match']}"
            + (f"; {golden['note']}" if "note" in golden else "")
        )
    identical = not identity.mismatches and all(normalize_exact.values())
    if args.json:
        count = len(corpus.blobs)
        record = {
            **run_info(),
            "images_dir": str(args.images),
            "images": count,
            "corpus_bytes": corpus.total_bytes,
            "max_num": args.max_num,
            "repeats": args.repeats,
            "threads": args.threads,
            "pinned_cpu": cpu,
            "tiles_per_pass": identity.tiles,
            "machine": machine_info(pillow=PIL.__version__, numpy=np.__version__, resampler=resampler()),
            "ld_library_path": os.environ.get("LD_LIBRARY_PATH"),
            "load_average_before": load_before,
            "load_average_after": load_average(),
            "pipelines": {
                name: {
                    "wall_s": result.wall_s,
                    "cpu_s": result.cpu_s,
                    "median_s": result.median,
                    "min_s": result.best,
                    "ms_per_image": 1000 * result.median / count,
                    "images_per_s_per_core": count / result.median / args.threads,
                    "speedup_median": times["reference"].median / result.median,
                    "speedup_min": times["reference"].best / result.best,
                    "identical_images": identity.identical.get(name),
                }
                for name, result in times.items()
            },
            "speedup": speedup,
            "identical": identical,
            "normalize_exhaustive": normalize_exact,
            "mismatches": [asdict(m) for m in identity.mismatches],
            "stages_ms_per_image": stages,
            "golden": golden,
        }
        write_results(args.json, record)
    print(f"speedup {speedup:.2f} identical={'yes' if identical else 'no'}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
