"""data.format arrow: one Arrow IPC file (stream or file format), memory-mapped: rows are read in place."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from vlm_hpc.config import DataSection
from vlm_hpc.errors import VlmHpcError
from vlm_hpc.run.readers.base import existing_path
from vlm_hpc.run.readers.table import TableReader


class ArrowFileReader(TableReader):
    """Rows of memory-mapped Arrow files, concatenated in order (a single `.arrow` file here)."""

    format = "arrow"

    def __init__(self, config: DataSection) -> None:
        self.path = existing_path(config)
        self.table = memory_mapped_table(self.arrow_files())
        super().__init__(config, self.table.num_rows)
        self.check_columns(self.table.schema)

    @classmethod
    def claims(cls, path: Path) -> bool:
        return path.is_file() and path.suffix == ".arrow"

    def arrow_files(self) -> list[Path]:
        """The files holding the rows, in row order."""
        return [self.path]

    def describe(self) -> str:
        return str(self.path)

    def _table(self, start: int, stop: int, columns: list[str]) -> pa.Table:
        return self.table.slice(start, stop - start).select(columns)

    def _image_sizes(self, start: int, stop: int) -> np.ndarray:
        return self.byte_lengths(self.table.column(self.config.image_column).slice(start, stop - start))


def memory_mapped_table(files: list[Path]) -> pa.Table:
    """The rows of `files` (Arrow stream or file format) as one table, memory-mapped, not read."""
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
