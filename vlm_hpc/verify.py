"""`python -m vlm_hpc.verify OUTPUT`: prove a run. Every row of every slice must be committed exactly once
or in the failure ledger; reports pending, lost, duplicate, orphan and corrupt outputs. Exit code 0 only
when the run is complete and all is well.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vlm_hpc.checkpoint import SliceIndex
from vlm_hpc.config import DataSection
from vlm_hpc.dataset import open_rows, slice_bounds
from vlm_hpc.errors import VlmHpcError
from vlm_hpc.layout import OutputLayout, relpath_to_key
from vlm_hpc.manifest import RunManifest

PROBLEMS = ("lost", "duplicate", "orphan", "corrupt")


@dataclass
class Report:
    rows: int = 0
    captioned: int = 0
    failed: int = 0
    pending: int = 0  # not finished yet (an incomplete slice), not an error in itself
    lost: list[str] = field(default_factory=list)  # committed, but the caption is not there
    duplicate: list[str] = field(default_factory=list)  # a key captioned more than once
    orphan: list[str] = field(default_factory=list)  # a caption for no row of the dataset
    corrupt: list[str] = field(default_factory=list)  # unreadable or incomplete output
    slices: dict[int, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.pending == 0 and not any(getattr(self, name) for name in PROBLEMS)


def _ledger(path: Path, committed_size: int) -> list[dict]:
    if not path.exists():
        return []
    with open(path, "rb") as handle:
        text = handle.read(committed_size).decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _caption_files(layout: OutputLayout) -> dict[str, Path]:
    """Every captions/**.json by key (one directory walk, no stat per key)."""
    found: dict[str, Path] = {}
    root = layout.captions_dir
    for folder, _dirs, files in os.walk(root):
        for name in files:
            if name.endswith(".json") and not name.startswith("."):
                relative = os.path.relpath(os.path.join(folder, name), root)[: -len(".json")]
                found[relpath_to_key(relative)] = Path(folder) / name
    return found


def _check_caption(body: object) -> bool:
    return (isinstance(body, dict) and isinstance(body.get("vlm_caption"), str) and body["vlm_caption"] != ""
            and "web_caption" in body)


def verify(output: str | Path) -> Report:
    """Check an output folder against its dataset; see the module docstring."""
    layout = OutputLayout(Path(output))
    if not layout.manifest_file.exists():
        raise VlmHpcError(f"verify: {layout.manifest_file} is missing; is {output} a vlm_hpc output folder?")
    manifest = RunManifest(**json.loads(layout.manifest_file.read_text()))
    rows = open_rows(DataSection(**manifest.data))
    report = Report(rows=manifest.num_rows)
    all_keys = set(rows.keys(0, rows.num_rows))
    files = _caption_files(layout) if manifest.output_format == "json" else {}
    captioned_keys: Counter[str] = Counter()
    for number in range(manifest.num_slices):
        start, stop = slice_bounds(manifest.num_rows, number, manifest.num_slices)
        index = SliceIndex.load(layout.index_file(number))
        if index is None:
            report.pending += stop - start
            report.slices[number] = "not started"
            continue
        report.slices[number] = index.status
        failed_rows = {line["row"] for line in _ledger(layout.failures_file(number), index.failures_offset)
                       if not line.get("captioned")}
        keys = rows.keys(start, stop)
        jsonl_keys: Counter[str] = Counter()
        if manifest.output_format == "jsonl":
            path = layout.caption_jsonl(number)
            data = path.read_bytes()[: index.captions_offset] if path.exists() else b""
            for line_number, line in enumerate(data.decode(errors="replace").splitlines(), start=1):
                try:
                    record = json.loads(line)
                    if not _check_caption(record):
                        raise ValueError("missing fields")
                    jsonl_keys[record["key"]] += 1
                    if record["key"] not in all_keys:
                        report.orphan.append(f"{path.name}:{line_number} key {record['key']!r}")
                except (ValueError, KeyError, TypeError) as exc:
                    report.corrupt.append(f"{path.name}:{line_number}: {exc}")
        for offset, key in enumerate(keys):
            row = start + offset
            if not index.is_done(row):
                report.pending += 1
            elif row in failed_rows:
                report.failed += 1
            elif manifest.output_format == "jsonl":
                if jsonl_keys.get(key, 0) == 0:
                    report.lost.append(f"row {row} key {key!r}")
                else:
                    report.captioned += 1
                    captioned_keys[key] += 1
            else:
                path = files.get(key)
                if path is None:
                    report.lost.append(f"row {row} key {key!r}")
                    continue
                try:
                    if not _check_caption(json.loads(path.read_text())):
                        raise ValueError("missing web_caption/vlm_caption")
                except (ValueError, OSError) as exc:
                    report.corrupt.append(f"{path}: {exc}")
                    continue
                report.captioned += 1
                captioned_keys[key] += 1
        report.duplicate += [f"key {k!r} in {n} lines of slice {number}" for k, n in jsonl_keys.items() if n > 1]
    report.duplicate += [f"key {k!r} committed by {n} rows" for k, n in captioned_keys.items() if n > 1]
    report.orphan += [f"{path}" for key, path in files.items() if key not in all_keys]
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlm_hpc.verify", description=__doc__.splitlines()[0])
    parser.add_argument("output", help="the run's output folder")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    try:
        report = verify(args.output)
    except VlmHpcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**asdict(report), "ok": report.ok}, ensure_ascii=False, indent=1))
    else:
        print(f"{args.output}: {report.rows} rows: {report.captioned} captioned, {report.failed} in the failure "
              f"ledger, {report.pending} pending; " + ", ".join(f"{len(getattr(report, n))} {n}" for n in PROBLEMS))
        for name in PROBLEMS:
            for item in getattr(report, name)[:20]:
                print(f"  {name}: {item}")
        print("OK" if report.ok else "NOT OK")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
