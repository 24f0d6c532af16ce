"""What the Arrow-table formats share: rows from the key, image and caption columns the config names, read
from one or many shard files, each opened only when a range touches it.

The image column holds raw bytes or a `datasets` Image feature (a struct of "bytes" and "path"); keys and web
captions are read as text. img2dataset's parquet output is recognised by its `key`, `status` and
`error_message` columns: where data.key_column / data.image_column are left at their defaults and are not
columns of the input, img2dataset's names are used (`key`, and the image column named by its encode format:
`jpg` by default), and a row whose status is not `success` goes to the failure ledger as `not_downloaded` with
img2dataset's error message.
"""

from __future__ import annotations

from abc import abstractmethod
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vlm_hpc.config import DataSection
from vlm_hpc.errors import VlmHpcError
from vlm_hpc.run.layout import InputCache
from vlm_hpc.run.readers.base import Row, RowReader, download_failure
from vlm_hpc.run.readers.shards import Shard, expand_shards, shard_list, stat_shard

IMG2DATASET_COLUMNS = ("key", "status", "error_message")
_OPEN_SHARDS = 32  # shard files kept open per process (verify reads them all, one after another)


def img2dataset_columns(config: DataSection, names: list[str]) -> DataSection:
    """`config` with img2dataset's column names where the input is img2dataset's and the configured names are
    the defaults, absent from it."""
    if not set(IMG2DATASET_COLUMNS) <= set(names):
        return config
    defaults, changes = DataSection(), {}
    if config.key_column == defaults.key_column and config.key_column not in names:
        changes["key_column"] = "key"
    if config.image_column == defaults.image_column and config.image_column not in names:
        image = next((e for e in config.image_extensions if e in names), None)
        if image is not None:
            changes["image_column"] = image
    return replace(config, **changes) if changes else config


class TableReader(RowReader):
    """A reader over an Arrow table read range by range; implementations say how a range is read."""

    status_column: str | None = None  # img2dataset's "status" where the input has it (error_message beside it)

    @abstractmethod
    def _table(self, start: int, stop: int, columns: list[str]) -> pa.Table:
        """Rows [start, stop) of `columns`, reading only what they need."""

    def needed_columns(self) -> list[str]:
        """The columns a row is made of (each once)."""
        config = self.config
        extra = [self.status_column, "error_message"] if self.status_column else []
        return list(dict.fromkeys([config.key_column, config.image_column, config.caption_column, *extra]))

    def _read(self, start: int, stop: int) -> list[Row]:
        config = self.config
        table = self._table(start, stop, self.needed_columns())
        keys = table.column(config.key_column).to_pylist()
        images = table.column(config.image_column).to_pylist()
        captions = table.column(config.caption_column).to_pylist()
        if self.status_column:
            verdicts = [download_failure(s, e) for s, e in zip(table.column(self.status_column).to_pylist(),
                                                               table.column("error_message").to_pylist())]
        else:
            verdicts = [{}] * len(keys)
        return [Row(start + i, None if k is None else str(k), _image_bytes(img), None if c is None else str(c), **v)
                for i, (k, img, c, v) in enumerate(zip(keys, images, captions, verdicts))]

    @abstractmethod
    def schema(self) -> pa.Schema:
        """The input's columns and their types, read from its metadata alone."""

    def _key_array(self, start: int, stop: int) -> pa.ChunkedArray:
        return self._table(start, stop, [self.config.key_column]).column(self.config.key_column)

    def columns(self, start: int, stop: int, names: list[str]) -> pa.Table:
        schema = self.schema()
        for name in names:
            if name not in schema.names:
                raise VlmHpcError(f"export: column {name!r} is not in {self.describe()}; its columns are "
                                  f"{', '.join(schema.names)}; name only those in --columns")
        stop = min(stop, self.num_rows)
        if start >= stop:  # an empty slice: _table is only called for a non-empty range
            return pa.schema([schema.field(name) for name in names]).empty_table()
        return self._table(start, stop, names)

    def web_captions(self, start: int, stop: int) -> list[str | None]:
        column = self.config.caption_column
        return [None if c is None else str(c) for c in self.columns(start, stop, [column]).column(column).to_pylist()]

    def check_columns(self, schema: pa.Schema, where: str | None = None) -> None:
        """One error naming the first configured column that is not in `schema` (of `where`: a shard; by default
        the input), or an image column that does not hold image bytes (text, numbers...: every row would fail as
        missing), and the key to set."""
        place = where or self.describe()
        for role in ("key_column", "image_column", "caption_column"):
            column = getattr(self.config, role)
            if column not in schema.names:
                every = ("; every shard must have the columns data.key_column, data.image_column and "
                         "data.caption_column name") if where else ""
                raise VlmHpcError(f"data: column {column!r} (data.{role}) is not in {place}; its columns are "
                                  f"{', '.join(schema.names)}; set data.{role}{every}")
        image_type = schema.field(self.config.image_column).type
        if not _holds_image_bytes(image_type):
            binary = [f.name for f in schema if _holds_image_bytes(f.type)]
            choices = f"its binary columns: {', '.join(binary)}" if binary else "it has no binary column"
            raise VlmHpcError(f"data: column {self.config.image_column!r} (data.image_column) of {place} "
                              f"holds Arrow type {image_type}, not image bytes; set data.image_column to a binary "
                              f"column or a datasets Image feature ({choices})")

    def byte_lengths(self, column: pa.ChunkedArray) -> np.ndarray:
        """Each image's byte length (-1: none), from the Arrow offsets alone: no image byte is touched."""
        if pa.types.is_struct(column.type):
            column = pc.struct_field(column, "bytes")  # a datasets Image: {"bytes", "path"} (check_columns)
        return pc.binary_length(column).fill_null(-1).to_numpy().astype(np.int64, copy=False)


def _is_binary(arrow_type: pa.DataType) -> bool:
    return pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type)


def _holds_image_bytes(arrow_type: pa.DataType) -> bool:
    """Raw bytes, or a datasets Image feature: a struct whose "bytes" field is binary."""
    if pa.types.is_struct(arrow_type):
        index = arrow_type.get_field_index("bytes")
        return index >= 0 and _is_binary(arrow_type.field(index).type)
    return _is_binary(arrow_type)


class ShardedTableReader(TableReader):
    """Rows of one or many table files in name order (`vlm_hpc.run.readers.shards`): the shard list comes from
    footers or metadata alone, recorded in the input cache, and a range opens only the shards it touches. Every
    non-empty shard must have the columns the rows need (checked when the list is made); an empty shard is
    zero rows."""

    caches_inputs = True
    kind: ClassVar[str]  # the files' format in messages, e.g. "Parquet"
    suffixes: ClassVar[tuple[str, ...]]  # of the shard files a folder or a pattern gives

    def __init__(self, config: DataSection, cache_dir: Path | None = None) -> None:
        root, files = self.shard_files(config)
        self.single = len(files) == 1
        self.path = files[0]
        # The first shard's columns decide img2dataset's names (an empty shard keeps its schema too).
        first_names = self._column_names(files[0])
        self.config = img2dataset_columns(config, first_names)
        self.status_column = "status" if set(IMG2DATASET_COLUMNS) <= set(first_names) else None
        self._open: OrderedDict[int, Any] = OrderedDict()
        cache = InputCache(Path(cache_dir)) if cache_dir is not None else None
        self.shards = shard_list(self.format, root, files, cache, {"columns": self.needed_columns()},
                                 lambda path: self._describe_shard(path, root))
        super().__init__(self.config, self.shards.total_rows)

    def shard_files(self, config: DataSection) -> tuple[Path, list[Path]]:
        """The folder the shard names are relative to, and the shard files in row order."""
        return expand_shards(config.path, self.suffixes, self.kind)

    @abstractmethod
    def _schema(self, path: Path) -> pa.Schema:
        """The columns and types of shard `path`, from its metadata alone."""

    def _column_names(self, path: Path) -> list[str]:
        return self._schema(path).names

    def schema(self) -> pa.Schema:
        """The first shard's columns (every non-empty shard has those the rows need; an exported extra column
        must be in each shard)."""
        return self._schema(self.path)

    @abstractmethod
    def _row_count(self, path: Path) -> int:
        """The rows of shard `path`, from its metadata alone."""

    @abstractmethod
    def _open_shard(self, path: Path) -> Any:
        """What `_shard_table` and `_shard_image_sizes` read shard `path` through (kept open a while)."""

    @abstractmethod
    def _shard_table(self, index: int, start: int, stop: int, columns: list[str]) -> pa.Table:
        """Rows [start, stop) of shard `index` (its own row numbers), columns `columns`."""

    @abstractmethod
    def _shard_image_sizes(self, index: int, start: int, stop: int) -> np.ndarray:
        """`_image_sizes` of rows [start, stop) of shard `index` (global row numbers where rows are named)."""

    def _describe_shard(self, path: Path, root: Path) -> Shard:
        rows = self._row_count(path)
        if rows:  # an empty shard holds no row that could miss a column
            self.check_columns(self._schema(path), None if self.single else f"shard {path}")
        return stat_shard(path, root, rows)

    def opened(self, index: int) -> Any:
        """Shard `index`, opened once its size and mtime are checked against the shard list."""
        if index in self._open:
            self._open.move_to_end(index)
            return self._open[index]
        handle = self._open_shard(self.shards.checked_path(index))
        self._open[index] = handle
        if len(self._open) > _OPEN_SHARDS:
            self._open.popitem(last=False)
        return handle

    def describe(self) -> str:
        if self.single:
            return str(self.path)
        return f"{len(self.shards.shards)} {self.kind} shards in {self.shards.root} (data.path {self.config.path})"

    def shard_list_digest(self) -> str | None:
        return self.shards.digest(self.format)

    def _table(self, start: int, stop: int, columns: list[str]) -> pa.Table:
        parts = [self._shard_table(i, a, b, columns) for i, a, b in self.shards.spans(start, stop)]
        # Shards written apart may differ in width (string / large_string) or hold a column of nulls.
        return parts[0] if len(parts) == 1 else pa.concat_tables(parts, promote_options="permissive")

    def _image_sizes(self, start: int, stop: int) -> np.ndarray:
        parts = [self._shard_image_sizes(i, a, b) for i, a, b in self.shards.spans(start, stop)]
        return np.concatenate(parts).astype(np.int64, copy=False) if parts else np.zeros(0, np.int64)


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
