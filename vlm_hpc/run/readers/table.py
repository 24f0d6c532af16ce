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

    def _key_array(self, start: int, stop: int) -> pa.ChunkedArray:
        return self._table(start, stop, [self.config.key_column]).column(self.config.key_column)

    def check_columns(self, schema: pa.Schema) -> None:
        """One error naming the first configured column that is not in `schema`, or an image column that does not
        hold image bytes (text, numbers...: every row would fail as missing), and the key to set."""
        for role in ("key_column", "image_column", "caption_column"):
            column = getattr(self.config, role)
            if column not in schema.names:
                raise VlmHpcError(f"data: column {column!r} (data.{role}) is not in {self.describe()}; its columns "
                                  f"are {', '.join(schema.names)}; set data.{role}")
        image_type = schema.field(self.config.image_column).type
        if not _holds_image_bytes(image_type):
            binary = [f.name for f in schema if _holds_image_bytes(f.type)]
            choices = f"its binary columns: {', '.join(binary)}" if binary else "it has no binary column"
            raise VlmHpcError(f"data: column {self.config.image_column!r} (data.image_column) of {self.describe()} "
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
