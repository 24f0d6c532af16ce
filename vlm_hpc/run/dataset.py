"""The input rows: a memory-mapped dataset, cut into contiguous slices identical on every node.

Accepts `datasets.save_to_disk` folders (the seed's input), `.arrow` files and `.parquet` files. The image
column holds raw bytes or a `datasets` Image feature; keys and web captions are read as text.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vlm_hpc.config import DataSection
from vlm_hpc.errors import VlmHpcError


def slice_bounds(num_rows: int, index: int, count: int) -> tuple[int, int]:
    """Rows [start, stop) of slice `index` of `count`: contiguous, sizes differ by at most one."""
    if count < 1 or not 0 <= index < count:
        raise VlmHpcError(f"slice {index} of {count} does not exist; slices are numbered 0..{count - 1}")
    base, extra = divmod(num_rows, count)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


@dataclass(frozen=True)
class Row:
    """One input row: its global index, web key, raw image bytes (None if the cell is empty) and web caption."""

    index: int
    key: str | None
    image: bytes | None
    caption: str | None


class RowSource:
    """Random access to rows [start, stop) of a table; only the requested rows are read into memory."""

    def __init__(self, table_reader, num_rows: int, config: DataSection, description: str,
                 size_reader: Callable[[int, int], np.ndarray]) -> None:
        self._read = table_reader
        self._sizes = size_reader
        self.num_rows = num_rows if config.limit is None else min(num_rows, config.limit)
        self.config = config
        self.description = description

    def read(self, start: int, stop: int) -> list[Row]:
        """Rows [start, stop) (clipped to the dataset), decoded from Arrow to Python only for these rows."""
        stop = min(stop, self.num_rows)
        if start >= stop:
            return []
        table = self._read(start, stop)
        keys = table.column(self.config.key_column).to_pylist()
        images = table.column(self.config.image_column).to_pylist()
        captions = table.column(self.config.caption_column).to_pylist()
        return [Row(start + i, None if k is None else str(k), _image_bytes(img), None if c is None else str(c))
                for i, (k, img, c) in enumerate(zip(keys, images, captions))]

    def keys(self, start: int, stop: int) -> list[str | None]:
        """Only the key column of rows [start, stop): cheap, for verification."""
        return [None if k is None else str(k) for k in self.key_array(start, stop).to_pylist()]

    def key_array(self, start: int, stop: int) -> pa.ChunkedArray:
        """The key column of rows [start, stop) as Arrow data, not converted to Python."""
        stop = min(stop, self.num_rows)
        if start >= stop:
            return pa.chunked_array([], pa.string())
        return self._read(start, stop, [self.config.key_column]).column(self.config.key_column)

    def image_sizes(self, start: int, stop: int) -> np.ndarray:
        """Image byte lengths that describe rows [start, stop) without reading any image (int64): one per
        row for Arrow (-1: no image), (first row, rows, bytes) per overlapping row group for Parquet."""
        stop = min(stop, self.num_rows)
        return self._sizes(start, stop) if start < stop else np.zeros(0, np.int64)


def _image_bytes(cell) -> bytes | None:
    """Raw bytes, or the bytes of a datasets Image feature ({"bytes": ..., "path": ...})."""
    if cell is None or isinstance(cell, bytes):
        return cell
    if isinstance(cell, dict):
        if cell.get("bytes") is not None:
            return cell["bytes"]
        if cell.get("path"):
            try:
                return Path(cell["path"]).read_bytes()
            except OSError:
                return None
    if isinstance(cell, (bytearray, memoryview)):
        return bytes(cell)
    return None


def _arrow_files(folder: Path) -> list[Path]:
    state = folder / "state.json"
    try:
        files = [folder / item["filename"] for item in json.loads(state.read_text())["_data_files"]]
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise VlmHpcError(f"data: {folder} is not a datasets.save_to_disk folder ({state.name}: {exc}); "
                          "pass such a folder or a .parquet/.arrow file") from None
    return files


def _memory_mapped_table(files: list[Path]) -> pa.Table:
    tables = []
    for path in files:
        try:
            source = pa.memory_map(str(path), "r")
            try:
                tables.append(pa.ipc.open_stream(source).read_all())
            except pa.ArrowInvalid:
                tables.append(pa.ipc.open_file(source).read_all())
        except (OSError, pa.ArrowInvalid) as exc:
            raise VlmHpcError(f"data: cannot read Arrow file {path}: {exc}") from None
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def _check_columns(names: list[str], config: DataSection, where: str) -> None:
    for role in ("key_column", "image_column", "caption_column"):
        column = getattr(config, role)
        if column not in names:
            raise VlmHpcError(f"data: column {column!r} (data.{role}) is not in {where}; its columns are "
                              f"{', '.join(names)}; set data.{role}")


def open_rows(config: DataSection) -> RowSource:
    """Open the configured dataset memory-mapped (Arrow) or row-group-wise (Parquet), checking columns."""
    path = Path(config.path)
    if not path.exists():
        raise VlmHpcError(f"data: {path} does not exist; set data.path to a datasets.save_to_disk folder "
                          "or a .parquet/.arrow file")
    if path.is_dir() or path.suffix == ".arrow":
        table = _memory_mapped_table(_arrow_files(path) if path.is_dir() else [path])
        _check_columns(table.column_names, config, str(path))

        def read(start: int, stop: int, columns: list[str] | None = None) -> pa.Table:
            part = table.slice(start, stop - start)
            return part.select(columns) if columns else part

        def sizes(start: int, stop: int) -> np.ndarray:
            return _byte_lengths(table.column(config.image_column).slice(start, stop - start), config)

        return RowSource(read, table.num_rows, config, str(path), sizes)
    if path.suffix == ".parquet":
        try:
            parquet = pq.ParquetFile(str(path))
        except (OSError, pa.ArrowInvalid) as exc:
            raise VlmHpcError(f"data: cannot read Parquet file {path}: {exc}") from None
        _check_columns(parquet.schema_arrow.names, config, str(path))
        offsets = [0]
        for group in range(parquet.num_row_groups):
            offsets.append(offsets[-1] + parquet.metadata.row_group(group).num_rows)

        def read(start: int, stop: int, columns: list[str] | None = None) -> pa.Table:
            groups = [g for g in range(parquet.num_row_groups) if offsets[g] < stop and offsets[g + 1] > start]
            wanted = columns or [config.key_column, config.image_column, config.caption_column]
            part = parquet.read_row_groups(groups, columns=wanted)
            return part.slice(start - offsets[groups[0]], stop - start)

        def sizes(start: int, stop: int) -> np.ndarray:
            # Per-row lengths are not in Parquet's metadata and reading them means reading the images: each
            # overlapping row group's image-column chunk size (uncompressed: independent of the codec) stands in.
            described = []
            for group in range(bisect.bisect_right(offsets, start) - 1, parquet.num_row_groups):
                if offsets[group] >= stop:
                    break
                if offsets[group + 1] > start:
                    meta = parquet.metadata.row_group(group)
                    size = sum(meta.column(c).total_uncompressed_size for c in range(meta.num_columns)
                               if meta.column(c).path_in_schema.split(".")[0] == config.image_column)
                    described += [offsets[group], meta.num_rows, size]
            return np.array(described, np.int64)

        return RowSource(read, offsets[-1], config, str(path), sizes)
    raise VlmHpcError(f"data: {path} is neither a datasets folder nor a .parquet/.arrow file")


def _byte_lengths(column: pa.ChunkedArray, config: DataSection) -> np.ndarray:
    """Each image's byte length (-1: none), from the Arrow offsets alone: no image byte is touched."""
    if pa.types.is_struct(column.type) and column.type.get_field_index("bytes") >= 0:
        column = pc.struct_field(column, "bytes")  # a datasets Image: {"bytes", "path"}
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)
            or pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise VlmHpcError(f"data: column {config.image_column!r} (data.image_column) holds {column.type}, not "
                          "image bytes; set data.image_column to a binary column or a datasets Image feature")
    return pc.binary_length(column).fill_null(-1).to_numpy().astype(np.int64, copy=False)


def _update_with_text(lengths: Any, content: Any, column: pa.ChunkedArray) -> None:
    """Feed each value's byte length (-1: null) to `lengths` and its bytes to `content`, straight from the
    Arrow buffers (a memory-mapped dataset is not copied into Python objects)."""
    if not any(check(column.type) for check in (pa.types.is_string, pa.types.is_large_string,
                                                pa.types.is_binary, pa.types.is_large_binary)):
        column = column.cast(pa.string())  # e.g. integer keys: they are read as text everywhere
    lengths.update(pc.binary_length(column).fill_null(-1).to_numpy().astype(np.int64, copy=False).tobytes())
    wide = pa.types.is_large_string(column.type) or pa.types.is_large_binary(column.type)
    for chunk in column.chunks:
        if len(chunk) == 0 or chunk.buffers()[2] is None:
            continue
        offsets = np.frombuffer(chunk.buffers()[1], np.int64 if wide else np.int32)
        first, last = int(offsets[chunk.offset]), int(offsets[chunk.offset + len(chunk)])
        content.update(memoryview(chunk.buffers()[2])[first:last])


# Rows per read in a fingerprint pass; a fixed piecing keeps Parquet's per-row-group description identical.
_PIECE_ROWS = 200_000


def slice_fingerprint(source: RowSource, start: int, stop: int,
                      keys_seen: Callable[[int, list[str | None]], None] | None = None) -> str:
    """Content fingerprint of rows [start, stop): every key and every image's byte length (for Parquet, each
    row group's image-column size), without decoding or copying an image. `keys_seen(first_row, keys)` gets
    the keys as text, piece by piece, for a caller that scans them anyway (duplicate keys)."""
    lengths, content, sizes = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
    stop = min(stop, source.num_rows)
    for piece in range(start, stop, _PIECE_ROWS):
        piece_stop = min(stop, piece + _PIECE_ROWS)
        keys = source.key_array(piece, piece_stop)
        _update_with_text(lengths, content, keys)
        sizes.update(source.image_sizes(piece, piece_stop).tobytes())
        if keys_seen is not None:
            keys_seen(piece, [None if k is None else str(k) for k in keys.to_pylist()])
    combined = f"{max(0, stop - start)}:{lengths.hexdigest()}:{content.hexdigest()}:{sizes.hexdigest()}"
    return hashlib.sha256(combined.encode()).hexdigest()[:16]


def dataset_fingerprint(source: RowSource, config: DataSection) -> str:
    """Identifies the input by content, not location (nodes may mount it elsewhere): columns, row count and
    the first and last keys (no full scan)."""
    first = source.keys(0, min(source.num_rows, 8))
    last = source.keys(max(0, source.num_rows - 8), source.num_rows)
    text = json.dumps([config.key_column, config.image_column, config.caption_column, source.num_rows, first, last])
    return hashlib.sha256(text.encode()).hexdigest()[:16]
