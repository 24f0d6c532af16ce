"""`python -m vlm_hpc.verify OUTPUT [--repair]`: prove a run complete; exit code 0 only when it is and all is well.

Every row of every slice must be committed exactly once or in the failure ledger; it reports pending, lost,
duplicate, orphan and corrupt outputs (any damaged index, ledger, lease, manifest or caption file, named).
`--repair` first rebuilds each missing or corrupt slice index from the slice's intact outputs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vlm_hpc.cluster.environment import JobEnvironment
from vlm_hpc.config import DataSection, WorkerSection
from vlm_hpc.errors import VlmHpcError, print_error
from vlm_hpc.run.checkpoint import CorruptCheckpoint
from vlm_hpc.run.committed import read_slice_outputs
from vlm_hpc.run.failures import OutcomeCounts
from vlm_hpc.run.layout import OutputLayout
from vlm_hpc.run.lease import SliceBusy, SliceLease, lease_file_problem
from vlm_hpc.run.manifest import RunManifest, load_manifest
from vlm_hpc.run.outputs import OUTPUT_FORMATS, output_format
from vlm_hpc.run.outputs.base import OutputFormat, SliceKeys
from vlm_hpc.run.readers import RowReader, open_reader
from vlm_hpc.run.repair import load_checkpoint, rebuild_checkpoint, repair_command
from vlm_hpc.run.slicing import slice_bounds

PROBLEMS = ("lost", "duplicate", "orphan", "corrupt")


@dataclass
class Report(OutcomeCounts):
    """What verify found: the finished rows by outcome (counted as the slice indexes count them), what is
    pending, and every problem."""

    rows: int = 0
    pending: int = 0  # not finished yet (an incomplete slice), not an error in itself
    lost: list[str] = field(default_factory=list)  # committed, but the caption is not there
    duplicate: list[str] = field(default_factory=list)  # a key captioned more than once
    orphan: list[str] = field(default_factory=list)  # a caption for no row of the dataset
    corrupt: list[str] = field(default_factory=list)  # unreadable or incomplete output
    slices: dict[int, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.pending == 0 and not any(getattr(self, name) for name in PROBLEMS)


def _open_run(output: str | Path) -> tuple[OutputLayout, RunManifest, RowReader]:
    layout = OutputLayout(Path(output))
    if not layout.manifest_file.exists():
        raise VlmHpcError(f"verify: {layout.manifest_file} is missing; is {output} a vlm_hpc output folder?")
    manifest = load_manifest(layout.manifest_file)
    return layout, manifest, open_reader(DataSection(**manifest.data), cache_dir=layout.inputs_dir)


def _has_outputs(output: OutputFormat, rows: SliceKeys) -> bool:
    """Whether a slice without an index wrote anything (then its index was lost, not never written)."""
    ledger = output.layout.failures_file(output.slice_id)
    return (ledger.exists() and ledger.stat().st_size > 0) or output.has_outputs(rows)


def verify(output: str | Path) -> Report:
    """Check an output folder against its dataset; see the module docstring."""
    layout, manifest, rows = _open_run(output)

    def named(path: Path) -> str:
        return str(path.relative_to(layout.root)) if path.is_relative_to(layout.root) else str(path)
    report = Report(rows=manifest.num_rows)
    all_keys = set(rows.keys(0, rows.num_rows))
    captioned_keys: Counter[str] = Counter()
    for slice_id in range(manifest.num_slices):
        start, stop = slice_bounds(manifest.num_rows, slice_id, manifest.num_slices)
        keys = SliceKeys(start, rows.keys(start, stop), manifest.duplicate_rows)
        output = output_format(manifest.output_format, layout, slice_id)
        lease_problem = lease_file_problem(layout.lease_file(slice_id))
        if lease_problem:
            report.corrupt.append(f"{named(layout.lease_file(slice_id))}: {lease_problem}")
        try:
            checkpoint = load_checkpoint(layout, slice_id, manifest.num_slices, start, stop)
        except CorruptCheckpoint as exc:
            report.corrupt.append(f"{named(exc.path)}: {exc.problem}")
            report.pending += stop - start
            report.slices[slice_id] = "corrupt index"
            continue
        if checkpoint is None:
            report.pending += stop - start
            report.slices[slice_id] = "not started"
            if _has_outputs(output, keys):
                report.corrupt.append(f"{named(layout.checkpoint_file(slice_id))}: missing while the slice has outputs")
            continue
        report.slices[slice_id] = checkpoint.status
        outputs = read_slice_outputs(output, keys, checkpoint)
        line_damage = [d for d in outputs.captions.damage if not d.whole_file]
        report.corrupt += [d.describe(named(d.path)) for d in line_damage]
        report.corrupt += [f"{named(outputs.ledger.path)} {item}" for item in outputs.ledger.damage]
        report.corrupt += [d.describe(named(d.path)) for d in outputs.captions.damage if d.whole_file]
        report.orphan += outputs.foreign_lines
        report.duplicate += outputs.repeated_lines
        finished = []
        for offset, key in enumerate(keys.keys):
            row = start + offset
            if not checkpoint.is_done(row):
                report.pending += 1
            elif row in outputs.failed:
                finished.append(row)
            elif row in outputs.captioned:
                finished.append(row)
                captioned_keys[key] += 1
            else:
                report.lost.append(f"row {row} key {key!r}")
        report.merge(outputs.outcomes(finished))
    report.duplicate += [f"key {k!r} committed by {n} rows" for k, n in captioned_keys.items() if n > 1]
    report.orphan += OUTPUT_FORMATS[manifest.output_format].orphans(layout, all_keys)  # the manifest checked it
    return report


def repair(output: str | Path, stale_seconds: float) -> tuple[list[str], bool]:
    """Rebuild every missing (with outputs) or corrupt index from the slice's intact outputs, skipping slices a
    live worker holds; what was done, one line each, and whether every such index was rebuilt."""
    layout, manifest, rows = _open_run(output)
    lines, complete = [], True
    for slice_id in range(manifest.num_slices):
        start, stop = slice_bounds(manifest.num_rows, slice_id, manifest.num_slices)
        path = layout.checkpoint_file(slice_id)
        try:
            if load_checkpoint(layout, slice_id, manifest.num_slices, start, stop) is not None:
                continue
            why = "missing"
        except CorruptCheckpoint as exc:
            why = exc.problem
        keys = rows.keys(start, stop)
        output = output_format(manifest.output_format, layout, slice_id)
        if why == "missing" and not _has_outputs(output, SliceKeys(start, keys, manifest.duplicate_rows)):
            continue
        # Take the slice's lease for the rebuild, so that no worker starts on the slice while it runs.
        lease = SliceLease(layout.lease_file(slice_id), JobEnvironment.current(), stale_seconds)
        try:
            lease.acquire()
        except SliceBusy as exc:
            lines.append(f"not repaired: {path} ({why}): {exc}; run this again when it has stopped")
            complete = False
            continue
        try:
            with lease.fenced():
                checkpoint = rebuild_checkpoint(output, manifest.num_slices, start, keys, manifest.duplicate_rows, why)
        finally:
            lease.release()
        done = f"{checkpoint.finished_rows}/{checkpoint.total} rows done"
        lines.append(f"rebuilt {path} ({why}) from its outputs: {done}, {checkpoint.outcomes().describe()}")
    return lines, complete


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlm_hpc.verify", description=__doc__.splitlines()[0])
    parser.add_argument("output", help="the run's output folder")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--repair", action="store_true",
                        help="first rebuild each missing or corrupt slice index from the slice's intact outputs")
    parser.add_argument("--stale-seconds", type=float, default=WorkerSection.stale_lease_seconds,
                        help="a lease older than this is a dead worker's (as worker.stale_lease_seconds)")
    args = parser.parse_args(argv)
    repaired = True
    try:
        if args.repair:
            lines, repaired = repair(args.output, args.stale_seconds)
            for line in lines:
                print(line, file=sys.stderr)
        report = verify(args.output)
    except VlmHpcError as exc:
        return print_error(exc)
    if args.json:
        print(json.dumps({**asdict(report), "ok": report.ok}, ensure_ascii=False, indent=1))
    else:
        print(f"{args.output}: {report.rows} rows: {report.describe()}, {report.pending} pending; "
              + ", ".join(f"{len(getattr(report, n))} {n}" for n in PROBLEMS))
        for name in PROBLEMS:
            for item in getattr(report, name)[:20]:
                print(f"  {name}: {item}")
        print("OK" if report.ok else "NOT OK")
        if any(s == "corrupt index" for s in report.slices.values()) or any(
                "missing while" in item for item in report.corrupt):
            print(f"rebuild the damaged indexes with: {repair_command(OutputLayout(Path(args.output)))}")
    return 0 if report.ok and repaired else 1


if __name__ == "__main__":
    sys.exit(main())
