"""Where everything lives in an output folder: the one module that knows the file names.

    OUTPUT/captions/{key}.json     {"web_caption", "vlm_caption"} (output.format json, the seed's layout)
    OUTPUT/captions/slice_{I}.jsonl  one line per caption (output.format jsonl)
    OUTPUT/images/                 up to output.max_sample_images sample images for the whole run
    OUTPUT/queries/query.txt       the prompt
    OUTPUT/end{I}.txt              completion marker of slice I (the seed's), with a timestamp
    OUTPUT/kill{I}.txt             touch it to stop slice I gracefully (the seed's kill file)
    OUTPUT/kill{I}.done            a kill file once obeyed (renamed, with the time), so a resubmission runs
    OUTPUT/state/slice_{I}.json    checkpoint index; state/slice_{I}.lease: who runs it (+ .lease.lock)
    OUTPUT/state/slice_{I}.reserve 64 KiB kept free for recording a crash on a full disk
    OUTPUT/state/.write_probe      written and removed by the start-up check that the folder is writable
    OUTPUT/failures/slice_{I}.jsonl  rows that could not be captioned, with the reason
    OUTPUT/tmp/slice_{I}/          files being written (renamed into place when complete; cleared on resume)
    OUTPUT/stamps/slice_{I}.json   reproducibility stamp of each attempt
    OUTPUT/logs/slice_{I}.log      the worker's log (appended across requeues)
    OUTPUT/logs/submitit/          submitit's pickles and its own logs of each array task
    OUTPUT/logs/sbatch_{job}_{I}.out  Slurm's output of an array task of sbatch_templates/caption_array.sbatch
    OUTPUT/manifest.json           dataset and slice fingerprints, slicing, pinned settings, fixed at the first run
    OUTPUT/.manifest.{pid}.tmp     the first start's manifest, linked into place (the first writer wins)
    OUTPUT/manifest.lock           held while a start updates the manifest
    OUTPUT/submissions.jsonl       one line per submit: cluster, --array, and each slice's job id
    OUTPUT/report.html             the run's self-contained web page (python -m vlm_hpc.report)
    OUTPUT/inputs/shards.json      the input's shard list (name, size, mtime, rows), made by the first start
    OUTPUT/inputs/tar_index/{shard}.parquet  a webdataset tar's members (name, offset, size) from its headers
    OUTPUT/inputs/files.parquet    an image folder's files in row order, listed by the first start
    OUTPUT/{state,failures,manifest.json,inputs}.previous-{time}  another run's bookkeeping, set aside by
                                   submit --force

An export of a run (`python -m vlm_hpc.export`) writes its own folder, DEST, named by `ExportLayout` below.

Keys are untrusted. A key that is a plain safe file name is used as is; any other key is percent-encoded
behind a leading "%" (so the encoding is reversible and cannot collide with a plain key), and encoded names
longer than 200 bytes are split into nested folders. Nothing can land outside OUTPUT.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

_SAFE_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,199}\Z")
_SEGMENT = 200  # bytes; file systems allow 255 per name


def key_to_relpath(key: str) -> str:
    """A relative path (no leading /, no '..') that names `key` reversibly."""
    if _SAFE_KEY.match(key):
        return key
    encoded = "%" + quote(key, safe="-_", errors="surrogatepass").replace(".", "%2E")
    segments = [encoded[i:i + _SEGMENT] for i in range(0, len(encoded), _SEGMENT)]
    # A folder named like a segment ends in "~" so that it can never equal a plain key or a file name.
    return "/".join([s + "~" for s in segments[:-1]] + [segments[-1]])


def relpath_to_key(relpath: str) -> str:
    """Inverse of key_to_relpath."""
    if not relpath.startswith("%"):
        return relpath
    parts = relpath.split("/")
    encoded = "".join([part[:-1] for part in parts[:-1]] + [parts[-1]])
    return unquote(encoded[1:], errors="surrogatepass")


@dataclass(frozen=True)
class InputCache:
    """What readers learn of the input once and keep (OUTPUT/inputs/ of a run): later starts read it instead of
    opening every shard."""

    root: Path

    @property
    def shard_list(self) -> Path:
        return self.root / "shards.json"

    def tar_index(self, shard: str) -> Path:
        """The member index of tar `shard` (its name relative to the shards' folder)."""
        return self.root / "tar_index" / f"{key_to_relpath(shard)}.parquet"

    @property
    def file_list(self) -> Path:
        return self.root / "files.parquet"


@dataclass(frozen=True)
class OutputLayout:
    """Paths inside one output folder."""

    root: Path

    @staticmethod
    def slice_name(slice_id: int) -> str:
        return f"slice_{slice_id:05d}"

    @property
    def captions_dir(self) -> Path:
        return self.root / "captions"

    def caption_json(self, key: str) -> Path:
        return self.captions_dir / f"{key_to_relpath(key)}.json"

    def caption_jsonl(self, slice_id: int) -> Path:
        return self.captions_dir / f"{self.slice_name(slice_id)}.jsonl"

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    def sample_image(self, key: str, extension: str) -> Path:
        return self.images_dir / f"{key_to_relpath(key)}.{extension}"

    @property
    def query_file(self) -> Path:
        return self.root / "queries" / "query.txt"

    def end_marker(self, slice_id: int) -> Path:
        return self.root / f"end{slice_id}.txt"

    def kill_file(self, slice_id: int) -> Path:
        return self.root / f"kill{slice_id}.txt"

    def obeyed_kill_file(self, slice_id: int) -> Path:
        return self.root / f"kill{slice_id}.done"

    def waiting_kill_files(self, slice_ids: Iterable[int]) -> list[Path]:
        """The kill files of `slice_ids` that no worker has obeyed yet."""
        return [path for path in map(self.kill_file, slice_ids) if path.exists()]

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def checkpoint_file(self, slice_id: int) -> Path:
        return self.state_dir / f"{self.slice_name(slice_id)}.json"

    def lease_file(self, slice_id: int) -> Path:
        return self.state_dir / f"{self.slice_name(slice_id)}.lease"

    def reserve_file(self, slice_id: int) -> Path:
        """Space kept for recording a crash when the disk is full (deleted to make that room)."""
        return self.state_dir / f"{self.slice_name(slice_id)}.reserve"

    @property
    def write_probe(self) -> Path:
        """A file the start-up check writes and removes: the folder is writable before any work starts."""
        return self.state_dir / ".write_probe"

    def temp_dir(self, slice_id: int) -> Path:
        return self.root / "tmp" / self.slice_name(slice_id)

    @property
    def failures_dir(self) -> Path:
        return self.root / "failures"

    def failures_file(self, slice_id: int) -> Path:
        return self.failures_dir / f"{self.slice_name(slice_id)}.jsonl"

    def stamp_file(self, slice_id: int) -> Path:
        return self.root / "stamps" / f"{self.slice_name(slice_id)}.json"

    def slice_temporaries(self, slice_id: int) -> list[tuple[Path, str]]:
        """(folder, glob) of the temporary files an interrupted atomic write of slice `slice_id` can leave."""
        name = self.slice_name(slice_id)
        return [(self.state_dir, f".{name}.*.tmp"), (self.root / "stamps", f".{name}.*.tmp")]

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    def log_file(self, slice_id: int) -> Path:
        return self.logs_dir / f"{self.slice_name(slice_id)}.log"

    @property
    def submitit_dir(self) -> Path:
        """submitit's folder: the pickled jobs and submitit's own logs of each array task."""
        return self.logs_dir / "submitit"

    @property
    def submissions_file(self) -> Path:
        """One JSON line per submission (status reads the latest Slurm job of each slice from it)."""
        return self.root / "submissions.jsonl"

    @property
    def report_file(self) -> Path:
        """The page `python -m vlm_hpc.report` writes (status names it when it exists)."""
        return self.root / "report.html"

    @property
    def manifest_file(self) -> Path:
        return self.root / "manifest.json"

    def manifest_temporary(self, pid: int) -> Path:
        """Where process `pid` writes the first manifest before linking it into place."""
        return self.root / f".manifest.{pid}.tmp"

    @property
    def manifest_lock(self) -> Path:
        return self.root / "manifest.lock"

    @property
    def inputs_dir(self) -> Path:
        """The input cache (`InputCache`): shard list, tar indexes, an image folder's file list."""
        return self.root / "inputs"

    @property
    def input_cache(self) -> InputCache:
        return InputCache(self.inputs_dir)

    def run_bookkeeping(self) -> list[Path]:
        """What ties the folder to one run: set aside, not deleted, when submit --force reuses it for another."""
        return [self.state_dir, self.failures_dir, self.manifest_file, self.inputs_dir]

    @staticmethod
    def set_aside(path: Path, suffix: str) -> Path:
        """Where `path` of a previous run is kept (`suffix`: when it was set aside)."""
        return path.with_name(f"{path.name}.previous-{suffix}")


@dataclass(frozen=True)
class ExportLayout:
    """Paths inside an export's destination folder (DEST of `python -m vlm_hpc.export`). Bookkeeping names begin
    with "_" or ".", which readers of the folder skip (pyarrow's dataset discovery; datasets.load_from_disk reads
    only what state.json lists).

        DEST/part-{I}.parquet           slice I's rows, one per input row (--to parquet)
        DEST/data-*.arrow, dataset_info.json, state.json
                                        the dataset as datasets.save_to_disk writes it (--to datasets)
        DEST/.parts/part-{I}.arrow      slice I's rows (--to datasets) until the dataset is built from them
        DEST/.building/                 datasets.save_to_disk's folder, its files moved into DEST once complete
        DEST/.part-{I}.parquet.tmp, DEST/.parts/.part-{I}.arrow.tmp
                                        a shard being written, renamed into place when complete
        DEST/_export.json               the run and options exported, which shards are complete, whether all is
        DEST/_export.lock               held while an export writes DEST
    """

    root: Path

    @staticmethod
    def shard_name(slice_id: int, extension: str) -> str:
        return f"part-{slice_id:05d}.{extension}"

    def parquet_shard(self, slice_id: int) -> Path:
        return self.root / self.shard_name(slice_id, "parquet")

    @property
    def parts_dir(self) -> Path:
        return self.root / ".parts"

    def arrow_part(self, slice_id: int) -> Path:
        return self.parts_dir / self.shard_name(slice_id, "arrow")

    @staticmethod
    def temporary(path: Path) -> Path:
        """Where `path` is written before it is renamed into place."""
        return path.with_name(f".{path.name}.tmp")

    @property
    def building_dir(self) -> Path:
        return self.root / ".building"

    @property
    def dataset_info_file(self) -> Path:
        return self.root / "dataset_info.json"

    @property
    def dataset_state_file(self) -> Path:
        return self.root / "state.json"

    @staticmethod
    def dataset_data_files(folder: Path) -> list[Path]:
        """The Arrow files datasets.save_to_disk wrote in `folder`, in order."""
        return sorted(folder.glob("data-*-of-*.arrow"))

    @property
    def record_file(self) -> Path:
        return self.root / "_export.json"

    @property
    def lock_file(self) -> Path:
        return self.root / "_export.lock"
