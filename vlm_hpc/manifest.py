"""OUTPUT/manifest.json: what a run is over (dataset fingerprint, row count, slicing), fixed by its first start.

Every later worker or submission to the same output folder must agree with it, so that slice i always means
the same rows. It also lists rows whose key repeats an earlier row's key: those are recorded as failures
(`duplicate_key`) instead of silently overwriting the earlier caption.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from vlm_hpc.config import DataSection, RunConfig
from vlm_hpc.dataset import RowSource, dataset_fingerprint
from vlm_hpc.durable import fsync_dir
from vlm_hpc.errors import VlmHpcError
from vlm_hpc.layout import OutputLayout

_KEY_SCAN_CHUNK = 200_000


@dataclass
class RunManifest:
    dataset_fingerprint: str
    data_path: str
    num_rows: int
    num_slices: int
    output_format: str
    data: dict = field(default_factory=dict)  # the data section: path and column names
    created_at: float = field(default_factory=time.time)
    duplicate_rows: dict[str, int] = field(default_factory=dict)  # row -> first row with that key


_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "dataset_fingerprint": str, "data_path": str, "num_rows": int, "num_slices": int, "output_format": str,
    "data": dict, "created_at": (int, float), "duplicate_rows": dict,
}


def load_manifest(path: Path) -> RunManifest:
    """The manifest at `path`; one error naming the file and what is wrong when it is damaged."""
    def corrupt(problem: str) -> VlmHpcError:
        return VlmHpcError(f"{path} is corrupt: {problem}; if the dataset and slicing are unchanged, remove it "
                           f"(rm {shlex.quote(str(path))}) and submit again with the same --array to write it anew")
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise corrupt(f"invalid UTF-8 at byte {exc.start}") from None
    except json.JSONDecodeError as exc:
        raise corrupt(f"not JSON ({exc.msg} at byte {exc.pos})") from None
    if not isinstance(raw, dict):
        raise corrupt(f"a JSON {type(raw).__name__}, not an object")
    names = {f.name for f in fields(RunManifest)}
    if set(raw) - names or {"dataset_fingerprint", "num_rows", "num_slices", "output_format"} - set(raw):
        raise corrupt(f"its fields {sorted(raw)} are not a manifest's {sorted(names)}")
    for name, value in raw.items():
        expected = _FIELD_TYPES.get(name, object)
        if not isinstance(value, expected) or (isinstance(value, bool) and expected is int):
            raise corrupt(f"field {name!r} is {value!r:.60}")
    if raw["num_rows"] < 0 or raw["num_slices"] < 1 or raw["output_format"] not in ("json", "jsonl"):
        raise corrupt(f"num_rows {raw['num_rows']}, num_slices {raw['num_slices']}, "
                      f"output_format {raw['output_format']!r} are not a run's")
    data_fields = {f.name for f in fields(DataSection)}
    if set(raw.get("data", {})) - data_fields:
        raise corrupt(f"its data section {sorted(raw['data'])} has fields that are not {sorted(data_fields)}")
    if not all(isinstance(k, str) and isinstance(v, int) for k, v in raw.get("duplicate_rows", {}).items()):
        raise corrupt("duplicate_rows is not a map of row to row")
    return RunManifest(**raw)


def find_duplicate_keys(rows: RowSource) -> dict[str, int]:
    """One pass over the key column: rows repeating an earlier key (rows without a key are the worker's)."""
    first_row: dict[str, int] = {}
    duplicates: dict[str, int] = {}
    for start in range(0, rows.num_rows, _KEY_SCAN_CHUNK):
        for offset, key in enumerate(rows.keys(start, start + _KEY_SCAN_CHUNK)):
            row = start + offset
            if key is None or key == "":
                continue
            if key in first_row:
                duplicates[str(row)] = first_row[key]
            else:
                first_row[key] = row
    return duplicates


def ensure_manifest(layout: OutputLayout, rows: RowSource, config: RunConfig, num_slices: int) -> RunManifest:
    """Create the manifest on first use, else check that this run agrees with it."""
    fingerprint = dataset_fingerprint(rows, config.data)
    path = layout.manifest_file
    if path.exists():
        existing = load_manifest(path)
        problems = []
        if existing.dataset_fingerprint != fingerprint or existing.num_rows != rows.num_rows:
            problems.append(f"the dataset differs ({existing.data_path}, {existing.num_rows} rows then; "
                            f"{config.data.path}, {rows.num_rows} rows now)")
        if existing.num_slices != num_slices:
            problems.append(f"it was cut into {existing.num_slices} slices, not {num_slices}")
        if existing.output_format != config.output.format:
            problems.append(f"its output.format is {existing.output_format}, not {config.output.format}")
        if not problems:
            return existing
        raise VlmHpcError(f"{layout.root} belongs to another run: {'; '.join(problems)}; use a new output.dir, "
                          f"or pass --force to start over in this one")
    duplicates = find_duplicate_keys(rows)
    manifest = RunManifest(dataset_fingerprint=fingerprint, data_path=config.data.path, num_rows=rows.num_rows,
                           num_slices=num_slices, output_format=config.output.format,
                           data=asdict(config.data), duplicate_rows=duplicates)
    layout.root.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".manifest.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(asdict(manifest), indent=1))
    try:
        os.link(temporary, path)  # atomic create-if-absent, also on NFS: the first writer wins
    except FileExistsError:
        temporary.unlink()
        return ensure_manifest(layout, rows, config, num_slices)
    temporary.unlink()
    fsync_dir(layout.root)
    return manifest
