"""data.format parquet: one Parquet file, read row group by row group (only the groups a range overlaps)."""

from __future__ import annotations

import bisect
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlm_hpc.config import DataSection
from vlm_hpc.errors import VlmHpcError
from vlm_hpc.run.readers.base import existing_path
from vlm_hpc.run.readers.table import TableReader


class ParquetFileReader(TableReader):
    """Rows of a `.parquet` file; its row count and row-group sizes come from the footer alone."""

    format = "parquet"

    def __init__(self, config: DataSection) -> None:
        self.path = existing_path(config)
        try:
            self.parquet = pq.ParquetFile(str(self.path))
        except (OSError, pa.ArrowInvalid) as exc:
            raise VlmHpcError(f"data: cannot read Parquet file {self.path}: {exc}") from None
        self.offsets = [0]  # first row of each row group, then the row count
        for group in range(self.parquet.num_row_groups):
            self.offsets.append(self.offsets[-1] + self.parquet.metadata.row_group(group).num_rows)
        super().__init__(config, self.offsets[-1])
        self.check_columns(self.parquet.schema_arrow)

    @classmethod
    def claims(cls, path: Path) -> bool:
        return path.is_file() and path.suffix == ".parquet"

    def describe(self) -> str:
        return str(self.path)

    def _overlapping_groups(self, start: int, stop: int) -> range:
        first = bisect.bisect_right(self.offsets, start) - 1
        return range(first, bisect.bisect_left(self.offsets, stop, lo=first + 1))

    def _table(self, start: int, stop: int, columns: list[str]) -> pa.Table:
        groups = self._overlapping_groups(start, stop)
        part = self.parquet.read_row_groups(list(groups), columns=columns)
        return part.slice(start - self.offsets[groups[0]], stop - start)

    def _image_sizes(self, start: int, stop: int) -> np.ndarray:
        # Per-row lengths are not in Parquet's metadata and reading them means reading the images: each
        # overlapping row group's image-column chunk size (uncompressed: independent of the codec) stands in.
        described = []
        for group in self._overlapping_groups(start, stop):
            meta = self.parquet.metadata.row_group(group)
            size = sum(meta.column(c).total_uncompressed_size for c in range(meta.num_columns)
                       if meta.column(c).path_in_schema.split(".")[0] == self.config.image_column)
            described += [self.offsets[group], meta.num_rows, size]
        return np.array(described, np.int64)
