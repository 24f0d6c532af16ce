"""`python -m vlm_hpc.export OUTPUT --to datasets|parquet DEST`: write a run as a table with one row per input row.

Each row, in input order: `row` (the input row number), `key`, `status` (captioned, failed, or pending: not
captioned yet, only with --partial), `web_caption` (the input's), `vlm_caption` (null unless captioned),
`failure` and `failure_detail` (the failure ledger's reason and detail, null when the row has no ledger line; a
truncated image is captioned and still has the reason "truncated"), then the input columns named by --columns.

It streams: one slice at a time (that slice's committed outputs, as verify reads them), its rows written
--batch-rows at a time as one shard per slice (`DEST/part-NNNNN.parquet`; for --to datasets, Arrow parts from
which `datasets.save_to_disk` then builds the dataset in DEST). Each shard is written to a temporary name and
renamed; `DEST/_export.json` records the run, the options and each complete shard with the state of the slice it
was made from. Run again, it keeps every shard whose slice has not changed and writes the others, so an
interrupted export resumes and an export with --partial is brought up to date. DEST is complete when
`_export.json` says "complete": true. The run's captions folder stays the run's output; this is a copy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock, Timeout

from vlm_hpc.config import DataSection
from vlm_hpc.errors import VlmHpcError, io_problem, print_error
from vlm_hpc.run.checkpoint import CorruptCheckpoint, SliceCheckpoint
from vlm_hpc.run.committed import read_slice_outputs
from vlm_hpc.run.durable import fsync_dir, write_json_atomic
from vlm_hpc.run.layout import ExportLayout, OutputLayout
from vlm_hpc.run.manifest import RunManifest, load_manifest
from vlm_hpc.run.outputs import output_format
from vlm_hpc.run.outputs.base import SliceKeys
from vlm_hpc.run.readers import RowReader, open_reader
from vlm_hpc.run.repair import load_checkpoint, repair_command
from vlm_hpc.run.slicing import slice_bounds

TARGETS = ("datasets", "parquet")
RECORD_VERSION = 1
# The columns every export has; --columns adds input columns after them.
EXPORT_SCHEMA = pa.schema([
    pa.field("row", pa.int64()), pa.field("key", pa.string()), pa.field("status", pa.string()),
    pa.field("web_caption", pa.string()), pa.field("vlm_caption", pa.string()), pa.field("failure", pa.string()),
    pa.field("failure_detail", pa.string()),
])


@dataclass(frozen=True)
class ExportRequest:
    """What the command line asks for."""

    output: Path
    to: str
    dest: Path
    columns: list[str] = field(default_factory=list)
    partial: bool = False
    batch_rows: int = 10_000


@dataclass
class SliceRows:
    """One slice's rows as the export writes them, resolved from its committed outputs (held for one slice only)."""

    start: int
    keys: list[str | None]
    status: list[str]
    web_caption: list[str | None]  # the stored one for captioned rows; None to be read from the input
    vlm_caption: list[str | None]
    failure: list[str | None]
    failure_detail: list[str | None]

    def counts(self) -> dict[str, object]:
        """What the shard holds, for the export record and the summary."""
        return {"rows": len(self.keys), **{s: self.status.count(s) for s in ("captioned", "failed", "pending")},
                "reasons": dict(sorted(Counter(r for r in self.failure if r).items()))}


@dataclass
class Run:
    """The run being exported: its folder, manifest and input."""

    layout: OutputLayout
    manifest: RunManifest
    reader: RowReader

    @property
    def run_id(self) -> str:
        """Identifies the run, not where its folder lies: a run started afresh (submit --force) is another."""
        m = self.manifest
        text = json.dumps([m.dataset_fingerprint, m.created_at, m.num_rows, m.num_slices, m.output_format])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def bounds(self, slice_id: int) -> tuple[int, int]:
        return slice_bounds(self.manifest.num_rows, slice_id, self.manifest.num_slices)


def open_run(output: Path) -> Run:
    """The run in `output`, its input opened as its manifest records it; one error line when either is wrong."""
    layout = OutputLayout(output)
    if not layout.manifest_file.exists():
        raise VlmHpcError(f"export: {layout.manifest_file} is missing; is {output} a vlm_hpc output folder?")
    manifest = load_manifest(layout.manifest_file)
    reader = open_reader(DataSection(**manifest.data))
    if reader.num_rows != manifest.num_rows or reader.fingerprint() != manifest.dataset_fingerprint:
        raise VlmHpcError(f"export: the input {reader.describe()} is not the one run {output} captioned (its rows or "
                          "keys changed since); restore the run's input at data.path to export it")
    return Run(layout, manifest, reader)


def slice_state(checkpoint: SliceCheckpoint | None) -> str | None:
    """What a shard was made from: the slice's committed rows and file offsets (None: never started). A shard whose
    slice still has this state holds the same rows."""
    if checkpoint is None:
        return None
    committed = [checkpoint.done, checkpoint.captions, checkpoint.failures, checkpoint.captions_offset,
                 checkpoint.failures_offset, len(checkpoint.repairs)]
    return hashlib.sha256(json.dumps(committed).encode()).hexdigest()[:16]


def load_checkpoints(run: Run) -> dict[int, SliceCheckpoint | None]:
    """Every slice's index; one error naming the repair when one is damaged (nothing can be exported from it)."""
    checkpoints, count = {}, run.manifest.num_slices
    for slice_id in range(count):
        try:
            checkpoints[slice_id] = load_checkpoint(run.layout, slice_id, count, *run.bounds(slice_id))
        except CorruptCheckpoint as exc:
            raise VlmHpcError(f"export: {exc}; rebuild it with: {repair_command(run.layout)}") from None
    return checkpoints


def check_finished(run: Run, checkpoints: dict[int, SliceCheckpoint | None], partial: bool) -> int:
    """The number of rows not captioned yet; one error when there are some and `partial` was not given."""
    unfinished = {s: run.bounds(s)[1] - run.bounds(s)[0] - (c.finished_rows if c else 0)
                  for s, c in checkpoints.items()}
    unfinished = {s: rows for s, rows in unfinished.items() if rows > 0}
    pending = sum(unfinished.values())
    if pending and not partial:
        named = ", ".join(map(str, list(unfinished)[:10])) + (", ..." if len(unfinished) > 10 else "")
        raise VlmHpcError(f"export: {len(unfinished)} of {run.manifest.num_slices} slices of {run.layout.root} are "
                          f"not done (slices {named}; {pending} rows pending); wait until they are (python -m "
                          f"vlm_hpc.status {run.layout.root}), or pass --partial to export those rows as pending")
    return pending


def resolve_slice(run: Run, slice_id: int, checkpoint: SliceCheckpoint | None) -> SliceRows:
    """Each row of the slice: captioned (with its ledger reason, if any), failed, or pending; one error when a
    committed row has neither an intact caption nor an intact ledger line (verify names it as lost or corrupt)."""
    start, stop = run.bounds(slice_id)
    keys = run.reader.keys(start, stop)
    count = stop - start
    rows = SliceRows(start, keys, ["pending"] * count, [None] * count, [None] * count, [None] * count, [None] * count)
    if checkpoint is None:
        return rows
    output = output_format(run.manifest.output_format, run.layout, slice_id)
    outputs = read_slice_outputs(output, SliceKeys(start, keys, run.manifest.duplicate_rows), checkpoint)
    lost = []
    for offset, key in enumerate(keys):
        row = start + offset
        if not checkpoint.is_done(row):
            continue
        record, line = outputs.captions.records.get(row), outputs.ledger_lines.get(row)
        if record is not None:
            rows.status[offset] = "captioned"
            rows.web_caption[offset], rows.vlm_caption[offset] = record.web_caption, record.vlm_caption
        elif row in outputs.failed:
            rows.status[offset] = "failed"
        else:
            lost.append(f"row {row} key {key!r}")
            continue
        if line is not None:
            rows.failure[offset] = line.record["reason"]
            detail = line.record.get("detail")
            rows.failure_detail[offset] = detail if isinstance(detail, str) else None
    if lost:
        raise VlmHpcError(f"export: slice {slice_id} of {run.layout.root} has {len(lost)} committed rows whose caption "
                          f"or ledger line is lost or damaged ({', '.join(lost[:3])}{', ...' if len(lost) > 3 else ''})"
                          f"; see what python -m vlm_hpc.verify {run.layout.root} reports and mend it before exporting")
    return rows


def extra_schema(run: Run, columns: list[str]) -> pa.Schema:
    """The export's schema with the input columns `columns` appended; one error for a column that cannot be."""
    clashes = [name for name in columns if name in EXPORT_SCHEMA.names]
    if clashes:
        raise VlmHpcError(f"export: --columns names {clashes[0]!r}, a column the export writes itself "
                          f"({', '.join(EXPORT_SCHEMA.names)}); leave it out")
    repeated = [name for name, n in Counter(columns).items() if n > 1]
    if repeated:
        raise VlmHpcError(f"export: --columns names {repeated[0]!r} twice; name each column once")
    if not columns:
        return EXPORT_SCHEMA
    empty = run.reader.columns(0, 0, columns)  # checks the names before anything is written
    return pa.schema([*EXPORT_SCHEMA, *(empty.schema.field(name).remove_metadata() for name in columns)])


def slice_batches(run: Run, rows: SliceRows, schema: pa.Schema, columns: list[str],
                  batch_rows: int) -> Iterator[pa.Table]:
    """The slice's rows as tables of at most `batch_rows` rows: only one batch's input columns are read at once."""
    for first in range(0, len(rows.keys), batch_rows):
        last = min(len(rows.keys), first + batch_rows)
        a, b = rows.start + first, rows.start + last
        web = rows.web_caption[first:last]
        if any(status != "captioned" for status in rows.status[first:last]):  # only the input has their caption
            from_input = run.reader.web_captions(a, b)
            web = [stored if status == "captioned" else read
                   for stored, read, status in zip(web, from_input, rows.status[first:last])]
        arrays = [pa.array(range(a, b), pa.int64()), pa.array(rows.keys[first:last], pa.string()),
                  pa.array(rows.status[first:last], pa.string()), pa.array(web, pa.string()),
                  pa.array(rows.vlm_caption[first:last], pa.string()),
                  pa.array(rows.failure[first:last], pa.string()),
                  pa.array(rows.failure_detail[first:last], pa.string())]
        if columns:
            extra = run.reader.columns(a, b, columns)
            arrays += [extra.column(name) for name in columns]
        yield pa.Table.from_arrays(arrays, schema=schema)


def write_shard(path: Path, to: str, schema: pa.Schema, batches: Iterator[pa.Table]) -> int:
    """Write the shard to its temporary name, make it durable, rename it into place; its size in bytes."""
    temporary = ExportLayout.temporary(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(temporary, "wb") as handle:
            if to == "parquet":
                with pq.ParquetWriter(handle, schema) as writer:
                    for table in batches:
                        writer.write_table(table, row_group_size=max(1, table.num_rows))
            else:  # the Arrow stream format, as datasets stores its data
                with pa.ipc.new_stream(handle, schema) as writer:
                    for table in batches:
                        writer.write_table(table)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path.stat().st_size


def build_dataset(dest: ExportLayout, parts: list[Path]) -> None:
    """The Arrow parts, memory-mapped and concatenated, saved by datasets into DEST: built in DEST/.building, then
    moved in with state.json last, so that DEST never loads as a mix of two builds."""
    import datasets  # only --to datasets needs it

    datasets.disable_progress_bars()
    shutil.rmtree(dest.building_dir, ignore_errors=True)
    pieces = [datasets.Dataset.from_file(str(path)) for path in parts]
    dataset = datasets.concatenate_datasets(pieces) if len(pieces) > 1 else pieces[0]
    dataset.save_to_disk(str(dest.building_dir), num_shards=1 if len(dataset) == 0 else None)
    for path in [dest.dataset_state_file, dest.dataset_info_file, *dest.dataset_data_files(dest.root)]:
        path.unlink(missing_ok=True)
    fsync_dir(dest.root)
    for path in [*dest.dataset_data_files(dest.building_dir), dest.building_dir / dest.dataset_info_file.name,
                 dest.building_dir / dest.dataset_state_file.name]:
        os.replace(path, dest.root / path.name)
    fsync_dir(dest.root)


def read_record(dest: ExportLayout) -> dict | None:
    """DEST's export record, None if there is none; one error when it is damaged."""
    try:
        record = json.loads(dest.record_file.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        problem = getattr(exc, "strerror", None) or str(exc)
        raise VlmHpcError(f"export: {dest.record_file} is damaged ({problem}); remove {dest.root} and export "
                          "again") from None
    problem = record_problem(record)
    if problem:
        raise VlmHpcError(f"export: {dest.record_file} is not an export record ({problem}); remove {dest.root} and "
                          "export again")
    return record


def record_problem(record: object) -> str | None:
    """What is wrong with an export record as read back, or None (so that nothing later trips over a value)."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    if record.get("version") != RECORD_VERSION:
        return f"version {record.get('version')!r}, not {RECORD_VERSION}"
    expected = {"run": str, "to": str, "columns": list, "shards": dict, "complete": bool}
    wrong = [name for name, kind in expected.items() if not isinstance(record.get(name), kind)]
    if wrong:
        return f"{wrong[0]} is missing or not a {expected[wrong[0]].__name__}"
    for slice_id, shard in record["shards"].items():
        counts = ("bytes", "rows", "captioned", "failed", "pending")
        if not (isinstance(shard, dict) and all(isinstance(shard.get(n), int) for n in counts)
                and isinstance(shard.get("reasons"), dict)
                and all(isinstance(n, int) for n in shard["reasons"].values())
                and isinstance(shard.get("slice_state"), (str, type(None)))):
            return f"the entry of shard {slice_id} is damaged"
    return None


def claim_dest(request: ExportRequest, run: Run) -> dict:
    """DEST's record when DEST is this export's (a fresh one when DEST is new or empty); one error when DEST
    belongs to another run or export, or holds something else."""
    dest = ExportLayout(request.dest)
    wanted = {"run": run.run_id, "to": request.to, "columns": request.columns}
    record = read_record(dest)
    if record is None:
        others = sorted(p.name for p in dest.root.iterdir() if p != dest.lock_file)
        if others:
            raise VlmHpcError(f"export: {dest.root} is not empty ({', '.join(others[:5])}) and holds no export; "
                              "choose a new or empty folder")
        return {"version": RECORD_VERSION, **wanted, "output": str(run.layout.root.resolve()),
                "num_rows": run.manifest.num_rows, "num_slices": run.manifest.num_slices, "shards": {},
                "complete": False}
    found = {name: record.get(name) for name in wanted}
    if found != wanted:
        columns = f" --columns {','.join(map(str, found['columns']))}" if found["columns"] else ""
        raise VlmHpcError(f"export: {dest.root} holds another export (of run {found['run']} in "
                          f"{record.get('output')}, --to {found['to']}{columns}), not of run {run.run_id} in "
                          f"{run.layout.root} with these options; choose another DEST, or remove that one first")
    return record


def kept(dest: ExportLayout, record: dict, slice_id: int, state: str | None, to: str) -> bool:
    """Whether the shard of `slice_id` is complete and was made from the slice as it is now."""
    shard = record["shards"].get(str(slice_id))
    if not isinstance(shard, dict) or shard.get("slice_state") != state:
        return False
    path = dest.parquet_shard(slice_id) if to == "parquet" else dest.arrow_part(slice_id)
    return path.exists() and path.stat().st_size == shard.get("bytes")


def up_to_date(dest: ExportLayout, record: dict, states: dict[int, str | None], to: str) -> bool:
    """Whether a complete export still matches every slice (a built dataset no longer has its parts)."""
    if not record.get("complete") or len(record["shards"]) != len(states):
        return False
    if to == "datasets":
        return dest.dataset_state_file.exists() and dest.dataset_info_file.exists() and all(
            isinstance(record["shards"].get(str(s)), dict) and record["shards"][str(s)].get("slice_state") == state
            for s, state in states.items())
    return all(kept(dest, record, s, state, to) for s, state in states.items())


def progress(line: str) -> None:
    """A line about one shard, on stderr (stdout has the summary alone)."""
    print(line, file=sys.stderr)


def export(request: ExportRequest, log: Callable[[str], None] = progress) -> dict:
    """Export the run of `request.output` to `request.dest` (see the module docstring); the export record."""
    run = open_run(request.output)
    checkpoints = load_checkpoints(run)
    pending = check_finished(run, checkpoints, request.partial)
    schema = extra_schema(run, request.columns)
    dest = ExportLayout(request.dest)
    if dest.root.exists() and not dest.root.is_dir():
        raise VlmHpcError(f"export: {dest.root} is a file; name a folder (new or empty) as DEST")
    if dest.root.resolve().is_relative_to(run.layout.root.resolve()):
        raise VlmHpcError(f"export: {dest.root} lies inside the run's folder {run.layout.root}; choose a DEST "
                          "outside it")
    dest.root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(dest.lock_file), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise VlmHpcError(f"export: another export is writing {dest.root} ({dest.lock_file.name} is held); wait "
                          "for it to end") from None
    try:
        record = claim_dest(request, run)
        states = {s: slice_state(c) for s, c in checkpoints.items()}
        if up_to_date(dest, record, states, request.to):
            log(f"{dest.root} is up to date with {run.layout.root}: nothing to do")
            return record
        record["complete"] = False  # from here until the last shard and the dataset are in place
        write_json_atomic(dest.record_file, record)
        for path in [*dest.root.glob(".part-*.tmp"), *dest.parts_dir.glob(".part-*.tmp")]:
            path.unlink()  # what an export killed while writing a shard left
        for slice_id, checkpoint in checkpoints.items():
            path = dest.parquet_shard(slice_id) if request.to == "parquet" else dest.arrow_part(slice_id)
            if kept(dest, record, slice_id, states[slice_id], request.to):
                log(f"slice {slice_id}: {path.name} kept (written before from the same rows)")
                continue
            record["shards"].pop(str(slice_id), None)
            rows = resolve_slice(run, slice_id, checkpoint)
            size = write_shard(path, request.to, schema,
                               slice_batches(run, rows, schema, request.columns, request.batch_rows))
            counts = rows.counts()
            record["shards"][str(slice_id)] = {"file": str(path.relative_to(dest.root)), "bytes": size,
                                               "slice_state": states[slice_id], **counts}
            write_json_atomic(dest.record_file, record)
            log(f"slice {slice_id}: wrote {path.name} ({counts['rows']} rows: {counts['captioned']} captioned, "
                f"{counts['failed']} failed, {counts['pending']} pending)")
        if request.to == "datasets":
            build_dataset(dest, [dest.arrow_part(s) for s in checkpoints])
        record.update(complete=True, pending=pending, updated_at=time.time())
        write_json_atomic(dest.record_file, record)
        if request.to == "datasets":  # the dataset holds their rows now
            shutil.rmtree(dest.parts_dir, ignore_errors=True)
            shutil.rmtree(dest.building_dir, ignore_errors=True)
        return record
    finally:
        lock.release()


def summary(request: ExportRequest, record: dict) -> str:
    """One line over what DEST holds."""
    shards = record["shards"].values()
    total = {name: sum(s[name] for s in shards) for name in ("rows", "captioned", "failed", "pending")}
    reasons = Counter()
    for shard in shards:
        reasons.update(shard["reasons"])
    why = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items()))
    return (f"exported {total['rows']} rows of {request.output} to {request.dest} ({request.to}, {len(shards)} "
            f"shards): {total['captioned']} captioned, {total['failed']} failed, {total['pending']} pending"
            + (f"; ledger reasons: {why}" if why else ""))


def parse_columns(text: str) -> list[str]:
    """`url,width,height` as names."""
    return [name.strip() for name in text.split(",") if name.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlm_hpc.export", description=__doc__.splitlines()[0])
    parser.add_argument("output", help="the run's output folder")
    parser.add_argument("--to", required=True, choices=TARGETS,
                        help="datasets: a folder datasets.load_from_disk opens; parquet: part-NNNNN.parquet files")
    parser.add_argument("dest",
                        help="the export's folder: new, empty, or an earlier export of the same run and options")
    parser.add_argument("--columns", type=parse_columns, default=[], metavar="A,B",
                        help="input columns to add, comma-separated (e.g. url,width,height)")
    parser.add_argument("--partial", action="store_true",
                        help="export a run whose slices are not all done: rows not captioned yet get status pending")
    parser.add_argument("--batch-rows", type=int, default=ExportRequest.batch_rows, metavar="N",
                        help="rows read and written at once: a Parquet row group, an Arrow record batch (10000)")
    args = parser.parse_args(argv)
    request = ExportRequest(Path(args.output), args.to, Path(args.dest), args.columns, args.partial, args.batch_rows)
    try:
        if args.batch_rows < 1:
            raise VlmHpcError(f"export: --batch-rows is {args.batch_rows}; give a positive number of rows")
        record = export(request)
    except VlmHpcError as exc:
        return print_error(exc)
    except OSError as exc:
        named = exc.filename or request.dest
        return print_error(VlmHpcError(f"export: {io_problem(exc)} on {named}: {exc.strerror}; mend that (free "
                                       "space, permissions) and run the same command again: complete shards are "
                                       "kept"))
    print(summary(request, record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
