"""What the Arrow-table formats share: rows from the key, image and caption columns the config names.

The image column holds raw bytes or a `datasets` Image feature (a struct of "bytes" and "path"); keys and web
captions are read as text.
"""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vlm_hpc.errors import VlmHpcError
from vlm_hpc.run.readers.base import Row, RowReader


class TableReader(RowReader):
    """A reader over an Arrow table read range by range; implementations say how a range is read."""

    @abstractmethod
    def _table(self, start: int, stop: int, columns: list[str]) -> pa.Table:
        """Rows [start, stop) of `columns`, reading only what they need."""

    def _read(self, start: int, stop: int) -> list[Row]:
        config = self.config
        table = self._table(start, stop, [config.key_column, config.image_column, config.caption_column])
        keys = table.column(config.key_column).to_pylist()
        images = table.column(config.image_column).to_pylist()
        captions = table.column(config.caption_column).to_pylist()
        return [Row(start + i, None if k is None else str(k), _image_bytes(img), None if c is None else str(c))
                for i, (k, img, c) in enumerate(zip(keys, images, captions))]

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

    def check_columns(self, names: list[str]) -> None:
        """One error naming the first configured column that is not among `names`, and the key to set."""
        for role in ("key_column", "image_column", "caption_column"):
            column = getattr(self.config, role)
            if column not in names:
                raise VlmHpcError(f"data: column {column!r} (data.{role}) is not in {self.describe()}; its columns "
                                  f"are {', '.join(names)}; set data.{role}")

    def byte_lengths(self, column: pa.ChunkedArray) -> np.ndarray:
        """Each image's byte length (-1: none), from the Arrow offsets alone: no image byte is touched."""
        if pa.types.is_struct(column.type) and column.type.get_field_index("bytes") >= 0:
            column = pc.struct_field(column, "bytes")  # a datasets Image: {"bytes", "path"}
        if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)
                or pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            raise VlmHpcError(f"data: column {self.config.image_column!r} (data.image_column) holds {column.type}, "
                              "not image bytes; set data.image_column to a binary column or a datasets Image feature")
        return pc.binary_length(column).fill_null(-1).to_numpy().astype(np.int64, copy=False)


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
