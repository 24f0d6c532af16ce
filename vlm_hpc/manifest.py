"""OUTPUT/manifest.json: what a run is over (dataset fingerprint, row count, slicing), fixed by its first start.

Every later worker or submission to the same output folder must agree with it, so that slice i always means
the same rows. It also lists rows whose key repeats an earlier row's key: those are recorded as failures
(`duplicate_key`) instead of silently overwriting the earlier caption.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field

from vlm_hpc.config import RunConfig
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
        existing = RunManifest(**json.loads(path.read_text()))
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
