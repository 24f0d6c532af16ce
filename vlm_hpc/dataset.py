"""The input rows: a memory-mapped dataset, cut into contiguous slices identical on every node.

Accepts `datasets.save_to_disk` folders (the seed's input), `.arrow` files and `.parquet` files. The image
column holds raw bytes or a `datasets` Image feature; keys and web captions are read as text.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
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

    def __init__(self, table_reader, num_rows: int, config: DataSection, description: str) -> None:
        self._read = table_reader
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
        stop = min(stop, self.num_rows)
        if start >= stop:
            return []
        column = self._read(start, stop, [self.config.key_column]).column(self.config.key_column)
        return [None if k is None else str(k) for k in column.to_pylist()]


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

        return RowSource(read, table.num_rows, config, str(path))
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

        return RowSource(read, offsets[-1], config, str(path))
    raise VlmHpcError(f"data: {path} is neither a datasets folder nor a .parquet/.arrow file")


def dataset_fingerprint(source: RowSource, config: DataSection) -> str:
    """Identifies the input by content, not location (nodes may mount it elsewhere): columns, row count and
    the first and last keys (no full scan)."""
    first = source.keys(0, min(source.num_rows, 8))
    last = source.keys(max(0, source.num_rows - 8), source.num_rows)
    text = json.dumps([config.key_column, config.image_column, config.caption_column, source.num_rows, first, last])
    return hashlib.sha256(text.encode()).hexdigest()[:16]
