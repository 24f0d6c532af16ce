"""OUTPUT/manifest.json: what a run is over and how it captions, fixed by its first start.

Every later worker or submission to the same output folder must agree with it, so that slice i always means
the same rows and every caption of the run was made the same way. It holds the dataset's cheap global
fingerprint, a content fingerprint per slice (checked by that slice's worker only: cost in proportion to the
slice), the pinned settings (`vlm_hpc.run.pins`), the changes accepted with --accept-changes, and the rows whose
key repeats an earlier row's key: those are recorded as failures (`duplicate_key`) instead of silently
overwriting the earlier caption.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from filelock import FileLock, Timeout

from vlm_hpc.config import DataSection, RunConfig
from vlm_hpc.errors import VlmHpcError
from vlm_hpc.run.checkpoint import SliceCheckpoint
from vlm_hpc.run.durable import fsync_dir, write_atomic
from vlm_hpc.run.layout import OutputLayout
from vlm_hpc.run.outputs import OUTPUT_FORMATS
from vlm_hpc.run.pins import PinnedSettings, compare_pins
from vlm_hpc.run.readers import RowReader, slice_fingerprint
from vlm_hpc.run.slicing import slice_bounds

_LOCK_SECONDS = 300.0


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
    # Absent from manifests written before they existed: filled in by the next start (see ensure_manifest).
    slice_fingerprints: dict[str, str] = field(default_factory=dict)  # slice -> slice_fingerprint of its rows
    pinned: dict = field(default_factory=dict)  # PinnedSettings.to_dict()
    accepted_changes: list[dict] = field(default_factory=list)  # {time, slice, differences, finished_rows}
    input_shards: str = ""  # RowReader.shard_list_digest of a sharded input ("": one file, or an older manifest)


@dataclass(frozen=True)
class ManifestCheck:
    """The manifest this start agreed with, and what it changed in it."""

    manifest: RunManifest
    accepted: list[str]  # differences accepted by this start (--accept-changes)
    notes: list[str]  # lines for the log: what was recorded now for lack of an earlier record


def scan_dataset(rows: RowReader, num_slices: int) -> tuple[dict[str, int], dict[str, str]]:
    """One pass over the keys: rows repeating an earlier key (rows without a key are the worker's), and each
    slice's content fingerprint."""
    first_row: dict[str, int] = {}
    duplicates: dict[str, int] = {}

    def keys_seen(start: int, keys: list[str | None]) -> None:
        for offset, key in enumerate(keys):
            if key is None or key == "":
                continue
            if key in first_row:
                duplicates[str(start + offset)] = first_row[key]
            else:
                first_row[key] = start + offset

    fingerprints = {str(s): slice_fingerprint(rows, *slice_bounds(rows.num_rows, s, num_slices), keys_seen)
                    for s in range(num_slices)}
    return duplicates, fingerprints


_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "dataset_fingerprint": str, "data_path": str, "num_rows": int, "num_slices": int, "output_format": str,
    "data": dict, "created_at": (int, float), "duplicate_rows": dict, "slice_fingerprints": dict, "pinned": dict,
    "accepted_changes": list, "input_shards": str,
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
    if raw["num_rows"] < 0 or raw["num_slices"] < 1 or raw["output_format"] not in OUTPUT_FORMATS:
        raise corrupt(f"num_rows {raw['num_rows']}, num_slices {raw['num_slices']}, "
                      f"output_format {raw['output_format']!r} are not a run's")
    data_fields = {f.name for f in fields(DataSection)}
    if set(raw.get("data", {})) - data_fields:
        raise corrupt(f"its data section {sorted(raw['data'])} has fields that are not {sorted(data_fields)}")
    if not all(isinstance(k, str) and isinstance(v, int) for k, v in raw.get("duplicate_rows", {}).items()):
        raise corrupt("duplicate_rows is not a map of row to row")
    return RunManifest(**raw)


def _load(layout: OutputLayout) -> RunManifest:
    return load_manifest(layout.manifest_file)


def _check_same_run(layout: OutputLayout, existing: RunManifest, rows: RowReader, config: RunConfig,
                    num_slices: int) -> None:
    """Refuse a folder whose rows, slicing or layout are another run's: no flag can make those agree."""
    problems = []
    if existing.dataset_fingerprint != rows.fingerprint() or existing.num_rows != rows.num_rows:
        problems.append(f"the dataset differs ({existing.data_path}, {existing.num_rows} rows then; "
                        f"{config.data.path}, {rows.num_rows} rows now)")
    shards = rows.shard_list_digest() or ""
    if existing.input_shards and existing.input_shards != shards:
        problems.append(f"its shards differ (shard list {existing.input_shards} then, {shards or 'none'} now: a shard "
                        "was added, removed, resized or re-counted)")
    if existing.output_format != config.output.format:
        problems.append(f"its output.format is {existing.output_format}, not {config.output.format}")
    if existing.num_slices != num_slices and not problems:  # the same run, asked with another slice count
        raise VlmHpcError(f"{layout.root} was cut into {existing.num_slices} slices, not {num_slices}: pass "
                          f"--num-slices {existing.num_slices} (the sbatch template: set "
                          f"VLM_HPC_NUM_SLICES={existing.num_slices})")
    if existing.num_slices != num_slices:
        problems.append(f"it was cut into {existing.num_slices} slices, not {num_slices}")
    if problems:
        raise VlmHpcError(f"{layout.root} belongs to another run: {'; '.join(problems)}; use a new output.dir "
                          "(output.dir=NEW_FOLDER), or start over in this one with vlm_hpc.submit's --force")


def _check_slice_rows(layout: OutputLayout, existing: RunManifest, slice_id: int, fingerprint: str,
                      bounds: tuple[int, int]) -> None:
    recorded = existing.slice_fingerprints.get(str(slice_id))
    if recorded is not None and recorded != fingerprint:
        raise VlmHpcError(f"{layout.root}: the rows of slice {slice_id} [{bounds[0]}, {bounds[1]}) changed since the "
                          f"run began (a key or an image's byte length differs; fingerprint {recorded} then, "
                          f"{fingerprint} now); restore the dataset, or use a new output.dir")


def _refuse_changes(layout: OutputLayout, changed: list[str]) -> VlmHpcError:
    return VlmHpcError(f"{layout.root} was captioned with other settings: {'; '.join(changed)}; use a new "
                       f"output.dir, or rerun with --accept-changes to go on with the new settings from here "
                       f"(the boundary is recorded in {layout.manifest_file.name})")


def _finished_rows(layout: OutputLayout, num_slices: int) -> dict[str, int]:
    """Rows finished by each slice that has started, as its index says now."""
    finished = {}
    for slice_id in range(num_slices):
        state = SliceCheckpoint.load(layout.checkpoint_file(slice_id))
        if state is not None:
            finished[str(slice_id)] = state.finished_rows
    return finished


def _update(layout: OutputLayout, rows: RowReader, config: RunConfig, num_slices: int, pins: PinnedSettings,
            slice_id: int | None, fingerprint: str | None, accept_changes: bool) -> ManifestCheck:
    """Record what is missing and what was accepted, re-reading the manifest under its lock so that slices
    updating it at once keep each other's records."""
    try:
        with FileLock(str(layout.manifest_lock), timeout=_LOCK_SECONDS):
            existing = _load(layout)
            _check_same_run(layout, existing, rows, config, num_slices)
            comparison = compare_pins(existing.pinned, pins)
            if comparison.changed and not accept_changes:
                raise _refuse_changes(layout, comparison.changed)
            notes = []
            if comparison.not_pinned:
                notes.append(f"{layout.manifest_file.name} did not pin {', '.join(comparison.not_pinned)} "
                             "(written before they were pinned): pinned now as this start's settings")
            if fingerprint is not None and str(slice_id) not in existing.slice_fingerprints:
                existing.slice_fingerprints[str(slice_id)] = fingerprint
                notes.append(f"{layout.manifest_file.name} had no content fingerprint of slice {slice_id}: "
                             "recorded it now")
            if comparison.changed:
                existing.accepted_changes.append({
                    "time": time.time(), "slice": slice_id, "differences": comparison.changed,
                    "finished_rows": _finished_rows(layout, num_slices)})
                notes.append(f"accepted changed settings (--accept-changes): {'; '.join(comparison.changed)}")
            existing.pinned = pins.to_dict()
            write_atomic(layout.manifest_file, json.dumps(asdict(existing), indent=1).encode())
            return ManifestCheck(existing, comparison.changed, notes)
    except Timeout:
        raise VlmHpcError(f"{layout.manifest_lock} has been locked for {_LOCK_SECONDS:.0f} s; if no vlm_hpc "
                          f"process is updating the manifest, delete it: rm {layout.manifest_lock}") from None


def planned_manifest(layout: OutputLayout, rows: RowReader, config: RunConfig, num_slices: int,
                     pins: PinnedSettings) -> RunManifest:
    """The manifest a first start would write (one pass over the keys), written nowhere yet."""
    duplicates, fingerprints = scan_dataset(rows, num_slices)
    return RunManifest(dataset_fingerprint=rows.fingerprint(), data_path=config.data.path,
                       num_rows=rows.num_rows, num_slices=num_slices, output_format=config.output.format,
                       data=asdict(config.data), duplicate_rows=duplicates, slice_fingerprints=fingerprints,
                       pinned=pins.to_dict(), input_shards=rows.shard_list_digest() or "")


def _create(layout: OutputLayout, manifest: RunManifest) -> RunManifest | None:
    """Write the manifest if there is none; None when another start wrote it first."""
    layout.root.mkdir(parents=True, exist_ok=True)
    temporary = layout.manifest_temporary(os.getpid())
    temporary.write_text(json.dumps(asdict(manifest), indent=1))
    try:
        os.link(temporary, layout.manifest_file)  # atomic create-if-absent, also on NFS: the first writer wins
    except FileExistsError:
        return None
    finally:
        temporary.unlink()
    fsync_dir(layout.root)
    return manifest


def ensure_manifest(layout: OutputLayout, rows: RowReader, config: RunConfig, num_slices: int,
                    pins: PinnedSettings, slice_id: int | None = None, accept_changes: bool = False,
                    write: bool = True, planned: RunManifest | None = None) -> ManifestCheck:
    """Create the manifest on first use, else check that this start agrees with it: the same run (dataset,
    slicing, output format: always refused otherwise), the same rows in slice `slice_id` (a worker; a submission
    passes None), the same pinned settings (refused otherwise unless `accept_changes`).

    `write=False` checks all of that and writes nothing (a submission, before sbatch has accepted the array);
    `planned` is the manifest such a check planned, written now without reading the keys again."""
    if not layout.manifest_file.exists():
        fresh = planned or planned_manifest(layout, rows, config, num_slices, pins)
        if not write:
            return ManifestCheck(fresh, [], [])
        created = _create(layout, fresh)
        if created is not None:
            return ManifestCheck(created, [], [])
    existing = _load(layout)
    _check_same_run(layout, existing, rows, config, num_slices)
    fingerprint = None
    if slice_id is not None:
        bounds = slice_bounds(rows.num_rows, slice_id, num_slices)
        fingerprint = slice_fingerprint(rows, *bounds)
        _check_slice_rows(layout, existing, slice_id, fingerprint, bounds)
    comparison = compare_pins(existing.pinned, pins)
    if comparison.changed and not accept_changes:
        raise _refuse_changes(layout, comparison.changed)
    if not write:
        return ManifestCheck(existing, comparison.changed, [])
    if comparison.changed or comparison.not_pinned or (
            fingerprint is not None and str(slice_id) not in existing.slice_fingerprints):
        return _update(layout, rows, config, num_slices, pins, slice_id, fingerprint, accept_changes)
    return ManifestCheck(existing, [], [])
