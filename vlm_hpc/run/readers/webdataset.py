"""data.format webdataset: tar shards as img2dataset writes them (`00000.tar` holding `{key}.jpg`, `{key}.txt`,
`{key}.json`, beside `00000.parquet` and `00000_stats.json`); one tar, a folder of them or a pattern (`shards`).

A sample is the consecutive members sharing a key prefix (webdataset's rule: the member's path up to the first
dot of its base name); its image is its first member with an extension in data.image_extensions, its web
caption its `.txt` member (or the field data.caption_json_field of its `.json`), its key the sample name.

Each tar's member index (key, extension, data offset and size of every member) is read once from the tar
headers alone, never from member data, and kept in the input cache (OUTPUT/inputs/tar_index/), so that a worker
seeks straight to its rows. A truncated tar is refused by name when its index is made.

Rows and img2dataset's failed downloads: img2dataset writes only the successful samples into the tar, and one
row per attempted URL (successes and failures, with `status` and `error_message`) into the `.parquet` beside
it, in the same order. Where that file is there, the shard's rows are its rows in its order (so its row count
comes from its footer): a success is mapped to its tar sample by key, a row whose status is not `success`
goes to the failure ledger as `not_downloaded` with img2dataset's error message, and a success whose sample is
not in the tar as `missing`; a tar sample that file does not list is an error naming both. Without that file
the rows are the tar's samples in tar order, and a sample whose `.json` has a status other than `success` is
`not_downloaded` too.
"""

from __future__ import annotations

import json
import tarfile
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlm_hpc.config import DataSection
from vlm_hpc.errors import VlmHpcError
from vlm_hpc.run.durable import write_atomic
from vlm_hpc.run.layout import InputCache
from vlm_hpc.run.readers.base import Row, RowReader, download_failure
from vlm_hpc.run.readers.shards import Shard, expand_shards, is_pattern, shard_list, stat_shard

_BLOCK = 512  # a tar block: headers and the end-of-archive marker are whole blocks
_KEPT_SHARDS = 8  # shards whose rows are kept planned per process
_NONE = (-1, -1)  # (offset, size) of a member a sample does not have
_INDEX_SCHEMA = pa.schema([("key", pa.string()), ("ext", pa.string()), ("offset", pa.int64()), ("size", pa.int64())])


def member_key(name: str) -> tuple[str, str] | None:
    """(sample key, extension) of a member name by webdataset's rule: the path up to the first dot of the base
    name, and what follows that dot; None for a name without one (webdataset skips those)."""
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{folder}/{stem}" if folder else stem), extension


def tar_members(path: Path) -> pa.Table:
    """Every file member of tar `path` with a sample key, in tar order: key, extension, data offset and size,
    from the headers alone (tarfile seeks over the data). One error naming the file when it is truncated or
    is not an uncompressed tar."""
    length = path.stat().st_size
    rows: dict[str, list] = {name: [] for name in _INDEX_SCHEMA.names}

    def truncated(where: str) -> VlmHpcError:
        return VlmHpcError(f"data: {path} is truncated ({where}; the file has {length} bytes): the shard was cut "
                           "short (an interrupted download or copy); copy or write it again")
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                if info.offset_data + info.size > length:
                    raise truncated(f"member {info.name} ends at byte {info.offset_data + info.size}")
                named = member_key(info.name)
                if named is None:
                    continue
                for column, value in zip(_INDEX_SCHEMA.names, (*named, info.offset_data, info.size)):
                    rows[column].append(value)
            end = tar.offset
    except tarfile.TarError as exc:
        if "unexpected end of data" in str(exc):
            raise truncated("it ends inside a member") from None
        raise VlmHpcError(f"data: {path} is not an uncompressed tar file ({exc}); webdataset shards are plain "
                          ".tar files") from None
    # A complete tar ends with a zero block; one cut at a member boundary lacks it (tarfile stops quietly there).
    with open(path, "rb") as handle:
        handle.seek(end)
        marker = handle.read(_BLOCK)
    if len(marker) < _BLOCK or marker.count(0) != _BLOCK:
        raise truncated(f"no end-of-archive block after its last member, at byte {end}")
    return pa.table(rows, schema=_INDEX_SCHEMA)


@dataclass(frozen=True)
class _TarRows:
    """A shard's rows, planned from its index (and img2dataset's .parquet beside it): each row's key, the
    (offset, size) of its image, .txt and .json members, and the .parquet's status, error and caption."""

    keys: list[str | None]
    image: np.ndarray  # (rows, 2) int64; (-1, -1): no image member
    text: np.ndarray
    meta: np.ndarray
    status: list[str | None] | None = None
    errors: list[str | None] | None = None
    captions: list[str | None] | None = None


class WebDatasetReader(RowReader):
    """Rows of webdataset tar shards (see the module docstring for what a row is)."""

    format = "webdataset"
    caches_inputs = True

    def __init__(self, config: DataSection, cache_dir: Path | None = None) -> None:
        self.config = config
        root, files = expand_shards(config.path, (".tar",), "webdataset .tar")
        self.single = len(files) == 1
        self.path = files[0]
        self.extensions = {e.lower().lstrip(".") for e in config.image_extensions}
        self.cache = InputCache(Path(cache_dir)) if cache_dir is not None else None
        self._planned: OrderedDict[int, _TarRows] = OrderedDict()
        # The last shards planned while the list is made (their tars were read for their row counts), by name.
        self._described: OrderedDict[str, _TarRows] | None = OrderedDict()
        self.shards = shard_list(self.format, root, files, self.cache, {"sidecar": "parquet"},
                                 lambda path: self._describe_shard(path, root))
        numbers = {shard.name: number for number, shard in enumerate(self.shards.shards)}
        self._planned.update((numbers[name], planned) for name, planned in self._described.items())
        self._described = None
        super().__init__(config, self.shards.total_rows)

    @classmethod
    def claims(cls, path: Path) -> bool:
        if path.is_dir():
            return any(p.suffix == ".tar" for p in path.iterdir())
        return path.suffix == ".tar" and (path.is_file() or is_pattern(str(path)))

    def describe(self) -> str:
        if self.single:
            return str(self.path)
        return f"{len(self.shards.shards)} webdataset shards in {self.shards.root} (data.path {self.config.path})"

    def shard_list_digest(self) -> str | None:
        return self.shards.digest(self.format)

    @staticmethod
    def sidecar(path: Path) -> Path | None:
        """img2dataset's .parquet of every attempted URL beside tar `path`, if it is there."""
        beside = path.with_suffix(".parquet")
        if not beside.is_file():
            return None
        try:
            names = pq.read_schema(str(beside)).names
        except (OSError, pa.ArrowInvalid) as exc:
            raise VlmHpcError(f"data: cannot read {beside}, the .parquet beside {path.name}: {exc}; restore it, or "
                              "move it away to read the tar alone") from None
        return beside if {"key", "status"} <= set(names) else None

    def _describe_shard(self, path: Path, root: Path) -> Shard:
        beside = self.sidecar(path)
        if beside is not None:
            return stat_shard(path, root, pq.ParquetFile(str(beside)).metadata.num_rows, beside)
        shard = stat_shard(path, root, 0)
        planned = self._plan(path, None, self._build_index(path, shard))
        if self._described is not None:  # making the list: keep the last ones planned, not all 10,000
            self._described[shard.name] = planned
            if len(self._described) > _KEPT_SHARDS:
                self._described.popitem(last=False)
        return replace(shard, rows=len(planned.keys))

    def _build_index(self, path: Path, shard: Shard) -> pa.Table:
        """The tar's members from its headers, recorded in the input cache with the tar's size and mtime."""
        index = tar_members(path)
        if self.cache is not None:
            stamped = index.replace_schema_metadata({"tar_size": str(shard.size), "tar_mtime_ns": str(shard.mtime_ns)})
            sink = pa.BufferOutputStream()
            pq.write_table(stamped, sink)
            try:
                write_atomic(self.cache.tar_index(shard.name), sink.getvalue().to_pybytes())
            except OSError as exc:
                raise VlmHpcError(f"output: cannot write the tar index {self.cache.tar_index(shard.name)} ({exc}); "
                                  "set output.dir to a writable folder") from None
        return index

    def _index(self, index: int, path: Path) -> pa.Table:
        """Shard `index`'s member index: the recorded one when it is of this tar as listed, else made now."""
        shard = self.shards.shards[index]
        if self.cache is not None:
            recorded = self.cache.tar_index(shard.name)
            try:
                table = pq.read_table(str(recorded))
                stamp = table.schema.metadata or {}
                if (stamp.get(b"tar_size"), stamp.get(b"tar_mtime_ns")) == (str(shard.size).encode(),
                                                                            str(shard.mtime_ns).encode()):
                    return table
            except (OSError, pa.ArrowInvalid):
                pass  # not made yet, or damaged: a cache, made again
        return self._build_index(path, shard)

    def _plan(self, path: Path, beside: Path | None, index: pa.Table) -> _TarRows:
        """The rows of tar `path`: its samples, or the rows of the .parquet beside it mapped to them by key."""
        samples: list[str] = []
        members: list[dict[str, tuple[int, int]]] = []
        for key, extension, offset, size in zip(*(index.column(n).to_pylist() for n in _INDEX_SCHEMA.names)):
            if not samples or samples[-1] != key:  # consecutive members with one key are one sample
                samples.append(key)
                members.append({})
            members[-1].setdefault(extension, (offset, size))
        image = np.array([next((where for ext, where in found.items() if ext.lower() in self.extensions), _NONE)
                          for found in members], np.int64).reshape(-1, 2)
        text = np.array([found.get("txt", _NONE) for found in members], np.int64).reshape(-1, 2)
        meta = np.array([found.get("json", _NONE) for found in members], np.int64).reshape(-1, 2)
        if beside is None:
            return _TarRows(samples, image, text, meta)
        names = pq.read_schema(str(beside)).names
        wanted = [c for c in ("key", "status", "error_message", self.config.caption_column) if c in names]
        listed = pq.read_table(str(beside), columns=list(dict.fromkeys(wanted)))
        keys = [None if k is None else str(k) for k in listed.column("key").to_pylist()]
        position = {}
        for number, key in enumerate(samples):
            position.setdefault(key, number)
        unlisted = set(position) - set(keys)
        if unlisted:
            raise VlmHpcError(f"data: {path} holds sample {sorted(unlisted)[0]!r} that {beside.name} beside it does "
                              f"not list ({len(unlisted)} such samples): they are not one img2dataset shard; restore "
                              f"the pair, or move {beside.name} away to read the tar alone")
        rows = np.array([position.get(k, -1) for k in keys], np.int64)  # each row's sample; -1: not in the tar
        found = rows >= 0

        def pick(where: np.ndarray) -> np.ndarray:
            chosen = np.full((len(rows), 2), -1, np.int64)
            chosen[found] = where[rows[found]]
            return chosen

        def column(name: str) -> list | None:
            return listed.column(name).to_pylist() if name in listed.column_names else None
        return _TarRows(keys, pick(image), pick(text), pick(meta), column("status"), column("error_message"),
                        column(self.config.caption_column))

    def _rows_of(self, index: int) -> tuple[Path, _TarRows]:
        """Shard `index`'s path (checked against the shard list) and its planned rows."""
        path = self.shards.checked_path(index)
        if index in self._planned:
            self._planned.move_to_end(index)
            return path, self._planned[index]
        sidecar = self.shards.shards[index].sidecar
        beside = None if sidecar is None else self.shards.root / sidecar
        planned = self._plan(path, beside, self._index(index, path))
        self._planned[index] = planned
        if len(self._planned) > _KEPT_SHARDS:
            self._planned.popitem(last=False)
        return path, planned

    def _read(self, start: int, stop: int) -> list[Row]:
        rows = []
        for index, first, end in self.shards.spans(start, stop):
            path, planned = self._rows_of(index)
            row = self.shards.offsets[index] + first
            with open(path, "rb") as tar:
                for local in range(first, end):
                    rows.append(self._row(tar, planned, local, row + local - first))
        return rows

    def _row(self, tar: Any, planned: _TarRows, local: int, row: int) -> Row:
        image = _member(tar, planned.image[local])
        meta: dict = {}
        sidecar = planned.status is not None
        if planned.meta[local][0] >= 0 and (self.config.caption_json_field or not sidecar):
            try:
                loaded = json.loads(_member(tar, planned.meta[local]))
                meta = loaded if isinstance(loaded, dict) else {}
            except ValueError:
                meta = {}
        if self.config.caption_json_field:
            value = meta.get(self.config.caption_json_field)
            caption = None if value is None else str(value)
        else:
            text = _member(tar, planned.text[local])
            caption = None if text is None else text.decode("utf-8", "replace")
        if caption is None and planned.captions is not None and planned.image[local][0] < 0:
            value = planned.captions[local]  # a failed download: its caption is only in the .parquet
            caption = None if value is None else str(value)
        if sidecar:
            verdict = download_failure(planned.status[local], planned.errors[local] if planned.errors else None)
        else:
            verdict = download_failure(meta.get("status"), meta.get("error_message"))
        return Row(row, planned.keys[local], image, caption, **verdict)

    def _key_array(self, start: int, stop: int) -> pa.ChunkedArray:
        parts = [pa.array(self._rows_of(i)[1].keys[a:b], pa.string()) for i, a, b in self.shards.spans(start, stop)]
        return pa.chunked_array(parts, pa.string())

    def _image_sizes(self, start: int, stop: int) -> np.ndarray:
        parts = [self._rows_of(i)[1].image[a:b, 1] for i, a, b in self.shards.spans(start, stop)]
        return np.concatenate(parts).astype(np.int64, copy=False) if parts else np.zeros(0, np.int64)


def _member(tar: Any, where: np.ndarray) -> bytes | None:
    """The bytes of the member at (offset, size) of open tar `tar`; None where there is no member."""
    offset, size = int(where[0]), int(where[1])
    if offset < 0:
        return None
    tar.seek(offset)
    return tar.read(size)
