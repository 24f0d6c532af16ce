"""Many small shards: what the first start, a later worker's start, the key scan and reading cost, against the
seed's one datasets.save_to_disk folder holding the same rows.

    python benchmarks/shards.py [--shards 10000] [--rows-per-shard 4] [--slices 64] [--forms ...] [--json PATH]
    python benchmarks/shards.py --smoke                    # 50 shards: keeps CI honest

The same rows (key, one of 4 tiny JPEGs made once, caption) are written in four forms:
* datasets: the seed-style baseline, one datasets.save_to_disk folder (columns new_key, png, caption);
* parquet: N shards in img2dataset's parquet layout (`00000.parquet` with key, url, caption, status="success",
  error_message=null, width, height, ..., jpg; `00000_stats.json` beside it);
* arrow: N Arrow IPC stream files (new_key, png, caption), as datasets writes them;
* webdataset: N tars in img2dataset's webdataset layout (`00000.tar` holding `{key}.jpg`, `{key}.json`,
  `{key}.txt`, beside `00000.parquet` without the images and `00000_stats.json`).

For each form, in fresh processes with the run's input cache (OUTPUT/inputs/) as a worker uses it:
1. first start (a new output folder): opening the input (the shard list is made and recorded), creating the
   manifest (the full key scan: duplicate keys and every slice's fingerprint; for tars this also builds every
   tar's member index from its headers), and the first row of slice 0;
2. a later worker's start on the LAST of --slices slices: opening the input from the recorded shard list, its
   manifest check (the dataset fingerprint and its own slice's fingerprint), its first row; which shards it
   opened and read, and which of them lie outside its slice;
3. in that same process afterwards: the full key scan again (`scan_dataset`, with the tar indexes cached), then
   reading throughput: `reader.read` over all rows in windows of --read-rows rows, images as bytes, not decoded.

The worker's input steps are those of `slice_run.check_inputs` and `ensure_manifest`; the model folder check
(not an input cost) and Python's imports are done before the clock starts (each process's whole wall time,
imports included, is recorded as process_s). Files opened and read are counted by the kernel: inotify on the data
folder (and on OUTPUT/inputs/tar_index/), which sees every open by any code in the process, pyarrow's C++ opens
and memory maps included. A folder listing is an open of the folder itself. Reads through a memory map are page
faults, which inotify does not report (the Arrow forms show opens only). inotify merges identical consecutive
events, so open counts are lower bounds; the sets of files are exact unless events_lost is true.

The data is written just before it is read: it is in the page cache of a local disk, not on a parallel file system.
The last line printed is `N shards: last slice opens K of N shards (...), first row in X s (save_to_disk: Y s)`.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import io
import json
import os
import select
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from harness import Stopwatch, machine_info, run_info, write_results

FORMS = ("datasets", "parquet", "arrow", "webdataset")
BASELINE = "datasets"
IMAGE_SIZE = (40, 32)  # tiny JPEGs, as small as web thumbnails get


# -- the data ---------------------------------------------------------------------------------------------------

def tiny_jpegs(count: int = 4) -> list[bytes]:
    """`count` small JPEGs of noise, made once; every shard reuses their bytes."""
    images = []
    for seed in range(count):
        pixels = np.random.default_rng(seed).integers(0, 256, (IMAGE_SIZE[1], IMAGE_SIZE[0], 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def shard_rows(shard: int, rows: int, jpegs: list[bytes]) -> tuple[list[str], list[bytes], list[str]]:
    """Keys (img2dataset's: shard number then the sample's number in it), images and captions of one shard."""
    keys = [f"{shard:05d}{i:04d}" for i in range(rows)]
    return keys, [jpegs[i % len(jpegs)] for i in range(rows)], [f"caption {shard} {i}" for i in range(rows)]


def img2dataset_table(keys: list[str], images: list[bytes], captions: list[str], with_images: bool) -> pa.Table:
    """One shard's rows as img2dataset writes them (its .parquet: every attempted URL; with the jpg column in its
    parquet output format)."""
    count = len(keys)
    width, height = IMAGE_SIZE
    columns = {
        "caption": pa.array(captions, pa.string()),
        "url": pa.array([f"https://example.com/{k}.jpg" for k in keys], pa.string()),
        "key": pa.array(keys, pa.string()),
        "status": pa.array(["success"] * count, pa.string()),
        "error_message": pa.nulls(count, pa.string()),
        "width": pa.array([width] * count, pa.int32()),
        "height": pa.array([height] * count, pa.int32()),
        "original_width": pa.array([width] * count, pa.int32()),
        "original_height": pa.array([height] * count, pa.int32()),
        "exif": pa.array(["{}"] * count, pa.string()),
        "sha256": pa.array([hashlib.sha256(i).hexdigest() for i in images], pa.string()),
    }
    if with_images:
        columns["jpg"] = pa.array(images, pa.binary())
    return pa.table(columns)


def stats_json(count: int) -> bytes:
    """img2dataset's `{shard}_stats.json` of a shard whose downloads all succeeded."""
    return json.dumps({"count": count, "successes": count, "failed_to_download": 0, "failed_to_resize": 0,
                       "duration": 0.1, "start_time": 1.7e9, "end_time": 1.7e9 + 0.1,
                       "status_dict": {"success": count}}, indent=4).encode()


def write_tar(path: Path, table: pa.Table, images: list[bytes]) -> None:
    """A tar in img2dataset's webdataset layout: per sample `{key}.jpg`, `{key}.json` (its .parquet row),
    `{key}.txt` (the caption), in name order, read-only (tests/test_shards.py's write_tar)."""
    with tarfile.open(path, "w") as tar:
        for meta, image in zip(table.to_pylist(), images):
            members = {"jpg": image, "json": json.dumps(meta, indent=4).encode(), "txt": meta["caption"].encode()}
            for extension in sorted(members):
                info = tarfile.TarInfo(f"{meta['key']}.{extension}")
                info.size, info.mode, info.mtime = len(members[extension]), 0o444, 1_700_000_000
                info.uname = info.gname = "bigdata"
                tar.addfile(info, io.BytesIO(members[extension]))


def write_forms(data: Path, forms: list[str], shards: int, rows_per_shard: int) -> dict[str, float]:
    """Every form in `forms` under `data/<form>`; seconds each took to write."""
    jpegs = tiny_jpegs()
    seconds = {}
    for form in forms:
        folder = data / form
        watch = Stopwatch()
        if form == "datasets":
            keys, images, captions = [], [], []
            for shard in range(shards):
                k, i, c = shard_rows(shard, rows_per_shard, jpegs)
                keys += k
                images += i
                captions += c
            table = pa.table({"new_key": pa.array(keys, pa.string()), "png": pa.array(images, pa.binary()),
                              "caption": pa.array(captions, pa.string())})
            datasets.Dataset(table).save_to_disk(str(folder))
        else:
            folder.mkdir(parents=True)
            for shard in range(shards):
                keys, images, captions = shard_rows(shard, rows_per_shard, jpegs)
                name = f"{shard:05d}"
                if form == "arrow":
                    table = pa.table({"new_key": pa.array(keys, pa.string()), "png": pa.array(images, pa.binary()),
                                      "caption": pa.array(captions, pa.string())})
                    with pa.ipc.new_stream(str(folder / f"{name}.arrow"), table.schema) as writer:
                        writer.write_table(table)
                    continue
                table = img2dataset_table(keys, images, captions, with_images=form == "parquet")
                pq.write_table(table, str(folder / f"{name}.parquet"))
                (folder / f"{name}_stats.json").write_bytes(stats_json(len(keys)))
                if form == "webdataset":
                    write_tar(folder / f"{name}.tar", table, images)
        seconds[form] = watch.wall_s()
    return seconds


# -- counting opens ---------------------------------------------------------------------------------------------

class OpenWatch:
    """The kernel's record (inotify) of every open and read of a file in some folders, by any code in this
    process (pyarrow's C++ opens and memory maps count as much as Python's open()); drained by a thread so that
    the kernel's queue does not overflow."""

    IN_ACCESS, IN_OPEN, IN_Q_OVERFLOW = 0x1, 0x20, 0x4000

    def __init__(self, folders: dict[str, Path]) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self._labels: dict[int, str] = {}
        for label, folder in folders.items():
            watch = libc.inotify_add_watch(self._fd, os.fsencode(folder), self.IN_OPEN | self.IN_ACCESS)
            if watch < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {folder}")
            self._labels[watch] = label
        self._lock = threading.Lock()
        self._reset()
        self._stop_read, self._stop_write = os.pipe()
        self._thread = threading.Thread(target=self._drain_loop, daemon=True)
        self._thread.start()

    def _reset(self) -> None:
        self.opens: Counter[tuple[str, str]] = Counter()  # (folder label, file name; "" = the folder) -> events
        self.reads: Counter[tuple[str, str]] = Counter()
        self.lost = False

    def _drain(self) -> None:
        while True:
            try:
                data = os.read(self._fd, 1 << 20)
            except BlockingIOError:
                return
            offset = 0
            while offset < len(data):
                watch, mask, _cookie, length = struct.unpack_from("iIII", data, offset)
                name = data[offset + 16:offset + 16 + length].rstrip(b"\0").decode()
                offset += 16 + length
                if mask & self.IN_Q_OVERFLOW:
                    self.lost = True
                    continue
                item = (self._labels.get(watch, "?"), name)
                if mask & self.IN_OPEN:
                    self.opens[item] += 1
                if mask & self.IN_ACCESS:
                    self.reads[item] += 1

    def _drain_loop(self) -> None:
        while True:
            ready, _, _ = select.select([self._fd, self._stop_read], [], [])
            if self._stop_read in ready:
                return
            with self._lock:
                self._drain()

    def take(self) -> tuple[Counter, Counter, bool]:
        """What was opened and read since the last take (or the start), and whether events were lost."""
        with self._lock:
            self._drain()
            taken = (self.opens, self.reads, self.lost)
            self._reset()
        return taken

    def close(self) -> None:
        os.write(self._stop_write, b"x")
        self._thread.join()
        for fd in (self._fd, self._stop_read, self._stop_write):
            os.close(fd)


def read_chars() -> int:
    """Bytes this process has read through read() and friends (/proc/self/io rchar; memory maps excluded)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return -1


class Phases:
    """Times each step of a start and says which shards it opened and read."""

    def __init__(self, watch: OpenWatch) -> None:
        self.watch = watch
        self.shard_of: dict[tuple[str, str], int] = {}  # (label, file) -> shard number
        self.names: list[str] = []
        self.slice_shards: set[int] = set()
        self.results: dict[str, dict] = {}
        self.touched: dict[str, set[int]] = {"opened": set(), "read": set()}  # over every phase
        self.touched_files: dict[str, set[str]] = {"opened": set(), "read": set()}  # outside the slice
        self._clock, self._chars = Stopwatch(), read_chars()

    def know_shards(self, rows, start: int, stop: int) -> None:
        """Shard numbers of the reader's files and its tar indexes, and the shards rows [start, stop) lie in."""
        listed = rows.shards
        self.names = [shard.name for shard in listed.shards]
        for number, shard in enumerate(listed.shards):
            self.shard_of["data", Path(shard.name).name] = number
            self.shard_of["tar_index", f"{Path(shard.name).name}.parquet"] = number
            if shard.sidecar is not None:
                self.shard_of["data", Path(shard.sidecar).name] = number
        self.slice_shards = {index for index, _, _ in listed.spans(start, stop)}

    def mark(self, phase: str) -> dict:
        seconds, chars = self._clock.wall_s(), read_chars() - self._chars
        opens, reads, lost = self.watch.take()
        result = {"seconds": seconds, "read_chars": chars, "events_lost": lost,
                  "folder_listings": opens["data", ""]}
        for verb, events in (("opened", opens), ("read", reads)):
            files = {item for item in events if item[1]}
            shards = {self.shard_of[item] for item in files if item in self.shard_of and item[0] == "data"}
            outside = sorted(shards - self.slice_shards)
            self.touched[verb] |= shards
            self.touched_files[verb] |= {name for label, name in files if label == "data"
                                         and self.shard_of.get((label, name), -1) not in self.slice_shards}
            result.update({
                f"files_{verb}": len([item for item in files if item[0] == "data"]),
                f"{verb}_events": sum(n for item, n in events.items() if item[0] == "data" and item[1]),
                f"shards_{verb}": len(shards),
                f"shards_{verb}_outside_slice": len(outside),
                f"shards_{verb}_outside_slice_names": [self.names[i] for i in outside[:12]],
                f"tar_indexes_{verb}": len({item for item in files if item[0] == "tar_index"}),
                f"other_files_{verb}": sorted(name for label, name in files
                                              if label == "data" and (label, name) not in self.shard_of)[:12],
            })
        self.results[phase] = result
        self._clock, self._chars = Stopwatch(), read_chars()
        return result

    def totals(self) -> dict:
        """Shards opened and read over all phases, and those outside the slice."""
        totals = {}
        for verb, shards in self.touched.items():
            outside = sorted(shards - self.slice_shards)
            totals.update({f"shards_{verb}": len(shards), f"shards_{verb}_outside_slice": len(outside),
                           f"shards_{verb}_outside_slice_names": [self.names[i] for i in outside[:12]],
                           f"files_{verb}_outside_slice": sorted(self.touched_files[verb])[:12]})
        return totals


# -- the measured processes -------------------------------------------------------------------------------------

def child(args: argparse.Namespace) -> dict:
    """One start of a worker on `args.form` (`args.child`: first or later), measured; what the parent records."""
    from vlm_hpc.config import load_config
    from vlm_hpc.internvl.loading import inspect_model_folder
    from vlm_hpc.run.layout import OutputLayout
    from vlm_hpc.run.manifest import ensure_manifest, scan_dataset
    from vlm_hpc.run.pins import pinned_settings
    from vlm_hpc.run.readers import open_reader
    from vlm_hpc.run.slicing import slice_bounds

    work = Path(args.work)
    data, output = work / "data" / args.form, work / "out" / args.form
    config = load_config(None, [f"model.path={work / 'model'}", f"data.path={data}", f"data.format={args.form}",
                                f"output.dir={output}"])
    layout = OutputLayout(output)
    pins = pinned_settings(config, inspect_model_folder(config.model.path))  # the model's part of check_inputs
    slice_id = 0 if args.child == "first" else args.slices - 1
    folders = {"data": data}
    if (layout.inputs_dir / "tar_index").is_dir():
        folders["tar_index"] = layout.inputs_dir / "tar_index"
    watch = OpenWatch(folders)
    phases = Phases(watch)
    rows = open_reader(config.data, cache_dir=layout.inputs_dir)  # as check_inputs opens it
    start, stop = slice_bounds(rows.num_rows, slice_id, args.slices)
    phases.know_shards(rows, start, stop)
    phases.mark("open")
    ensure_manifest(layout, rows, config, args.slices, pins, slice_id=slice_id)
    phases.mark("manifest")
    first = rows.read(start, start + 1)
    phases.mark("first_row")
    watch.close()
    assert len(first) == 1 and first[0].image is not None, first
    result = {"form": args.form, "start": args.child, "slice": slice_id, "slice_rows": [start, stop],
              "num_rows": rows.num_rows, "num_shards": len(phases.names), "slice_shards": len(phases.slice_shards),
              "reader": rows.describe(), "phases": phases.results, "total": phases.totals(),
              "first_row_s": sum(p["seconds"] for p in phases.results.values())}
    if args.child == "first":
        index = layout.inputs_dir / "tar_index"
        result["tar_indexes_written"] = sum(1 for _ in index.rglob("*.parquet")) if index.is_dir() else 0
        return result
    watch = Stopwatch()
    duplicates, fingerprints = scan_dataset(rows, args.slices)
    result["key_scan"] = {"seconds": watch.wall_s(), "cpu_s": watch.cpu_s(), "duplicates": len(duplicates),
                          "slices": len(fingerprints)}
    result["read"] = read_all(rows, args.read_rows)
    return result


def read_all(rows, window: int) -> dict:
    """`rows.read` over every row in windows of `window` rows (images as bytes, not decoded)."""
    watch = Stopwatch()
    count = image_bytes = missing = 0
    for start in range(0, rows.num_rows, window):
        for row in rows.read(start, start + window):
            count += 1
            if row.image is None:
                missing += 1
            else:
                image_bytes += len(row.image)
    seconds = watch.wall_s()
    return {"seconds": seconds, "cpu_s": watch.cpu_s(), "rows": count, "window": window, "image_bytes": image_bytes,
            "missing_images": missing, "rows_per_s": count / seconds}


def run_child(script: Path, work: Path, form: str, start: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, str(script), "--child", start, "--form", form, "--work", str(work),
               "--slices", str(args.slices), "--read-rows", str(args.read_rows)]
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"the {start} start on {form} failed (exit status {done.returncode})")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - began
    return result


# -- the report -------------------------------------------------------------------------------------------------

def describe_first(form: str, result: dict) -> str:
    opened, manifest = result["phases"]["open"], result["phases"]["manifest"]
    tars = f", {result['tar_indexes_written']} tar indexes written" if form == "webdataset" else ""
    return (f"{form:>10} first start: shard list {opened['seconds']:.2f} s ({opened['files_opened']} files opened), "
            f"manifest/key scan {manifest['seconds']:.2f} s ({manifest['files_opened']} files opened{tars}), "
            f"first row {result['first_row_s']:.2f} s; process {result['process_s']:.1f} s")


def describe_later(form: str, result: dict) -> str:
    phases, total = result["phases"], result["total"]
    outside = total["files_opened_outside_slice"]
    where = f"files outside it: {', '.join(outside)}" if outside else "none outside it"
    return (f"{form:>10} last slice ({result['slice_shards']} shards): open {phases['open']['seconds']:.3f} s, "
            f"manifest check {phases['manifest']['seconds']:.3f} s, first row {phases['first_row']['seconds']:.3f} s "
            f"= {result['first_row_s']:.3f} s; opened {total['shards_opened']} of {result['num_shards']} shards "
            f"({where}), read from {total['shards_read']} ({total['shards_read_outside_slice']} outside); key scan "
            f"{result['key_scan']['seconds']:.2f} s; read {result['read']['rows_per_s']:.0f} rows/s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=10000)
    parser.add_argument("--rows-per-shard", type=int, default=4)
    parser.add_argument("--slices", type=int, default=64, help="the array's slices; the later start is the last")
    parser.add_argument("--read-rows", type=int, default=64, help="rows per reader.read in the throughput pass")
    parser.add_argument("--forms", nargs="+", choices=FORMS, default=list(FORMS))
    parser.add_argument("--smoke", action="store_true", help="50 shards: quick, for CI")
    parser.add_argument("--work-dir", type=Path, default=None, help="where the data is written (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the data and outputs")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", choices=("first", "later"), help=argparse.SUPPRESS)
    parser.add_argument("--form", choices=FORMS, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    datasets.disable_progress_bars()
    if args.child:
        print(json.dumps(child(args)))
        return 0
    if args.smoke:
        args.shards = 50
    forms = [BASELINE] + [f for f in args.forms if f != BASELINE]
    work = Path(tempfile.mkdtemp(prefix="vlm_hpc_shards_", dir=args.work_dir))
    try:
        from vlm_hpc.tiny_model import write_tiny_model
        write_tiny_model(work / "model")
        written = write_forms(work / "data", forms, args.shards, args.rows_per_shard)
        print(f"wrote {args.shards} shards x {args.rows_per_shard} rows in each form: "
              + ", ".join(f"{form} {seconds:.1f} s" for form, seconds in written.items()), flush=True)
        record: dict = {**run_info(), "machine": machine_info(pyarrow=pa.__version__, datasets=datasets.__version__),
                        "shards": args.shards, "rows_per_shard": args.rows_per_shard, "slices": args.slices,
                        "read_rows": args.read_rows, "write_s": written, "forms": {}}
        script = Path(__file__).resolve()
        for form in forms:
            first = run_child(script, work, form, "first", args)
            print(describe_first(form, first), flush=True)
            later = run_child(script, work, form, "later", args)
            print(describe_later(form, later), flush=True)
            record["forms"][form] = {"first": first, "later": later}
        check_same_rows(record["forms"])
        if args.json:
            write_results(args.json, record, indent=1)
        print(summary_line(record, forms))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def check_same_rows(results: dict) -> None:
    """Every form read the same number of rows and image bytes (the forms hold the same rows)."""
    seen = {(r["later"]["read"]["rows"], r["later"]["read"]["image_bytes"]) for r in results.values()}
    if len(seen) != 1:
        raise SystemExit(f"the forms read different rows: {results}")


def summary_line(record: dict, forms: list[str]) -> str:
    sharded = [f for f in forms if f != BASELINE]
    later = {form: record["forms"][form]["later"] for form in forms}
    opens = "/".join(str(later[f]["total"]["shards_opened"]) for f in sharded)
    needs = "/".join(str(later[f]["slice_shards"]) for f in sharded)
    times = "/".join(f"{later[f]['first_row_s']:.2f}" for f in sharded)
    baseline = f" (save_to_disk: {later[BASELINE]['first_row_s']:.2f} s)" if BASELINE in later else ""
    return (f"{record['shards']} shards: last slice opens {opens} of {record['shards']} shards "
            f"({'/'.join(sharded)}; its rows lie in {needs}), first row in {times} s{baseline}")


if __name__ == "__main__":
    sys.exit(main())
