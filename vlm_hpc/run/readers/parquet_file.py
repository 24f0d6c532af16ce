"""data.format parquet: Parquet files (one, a folder of them, or a pattern; see `shards`), each read row group by
row group (only the groups a range overlaps). img2dataset's parquet output is read with its own column names
and its failed downloads go to the ledger (see `table`)."""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlm_hpc.errors import VlmHpcError
from vlm_hpc.run.readers.shards import is_pattern
from vlm_hpc.run.readers.table import ShardedTableReader


@dataclass(frozen=True)
class _ParquetShard:
    file: pq.ParquetFile
    offsets: list[int]  # first row of each row group in the shard, then its row count


class ParquetFileReader(ShardedTableReader):
    """Rows of `.parquet` files; row counts and row-group sizes come from the footers alone."""

    format = "parquet"
    kind = "Parquet"
    suffixes = (".parquet",)

    @classmethod
    def claims(cls, path: Path) -> bool:
        if path.is_dir():  # img2dataset's webdataset folders hold a .parquet beside each .tar: those are tars
            suffixes = {p.suffix for p in path.iterdir()}
            return ".parquet" in suffixes and ".tar" not in suffixes
        return path.suffix == ".parquet" and (path.is_file() or is_pattern(str(path)))

    def _footer(self, path: Path) -> pq.ParquetFile:
        try:
            return pq.ParquetFile(str(path))
        except (OSError, pa.ArrowInvalid) as exc:
            raise VlmHpcError(f"data: cannot read Parquet file {path}: {exc}") from None

    def _schema(self, path: Path) -> pa.Schema:
        return self._footer(path).schema_arrow

    def _row_count(self, path: Path) -> int:
        return self._footer(path).metadata.num_rows

    def _open_shard(self, path: Path) -> _ParquetShard:
        parquet = self._footer(path)
        offsets = [0]
        for group in range(parquet.num_row_groups):
            offsets.append(offsets[-1] + parquet.metadata.row_group(group).num_rows)
        return _ParquetShard(parquet, offsets)

    @staticmethod
    def _overlapping_groups(shard: _ParquetShard, start: int, stop: int) -> range:
        first = bisect.bisect_right(shard.offsets, start) - 1
        return range(first, bisect.bisect_left(shard.offsets, stop, lo=first + 1))

    def _shard_table(self, index: int, start: int, stop: int, columns: list[str]) -> pa.Table:
        shard = self.opened(index)
        groups = self._overlapping_groups(shard, start, stop)
        part = shard.file.read_row_groups(list(groups), columns=columns)
        return part.slice(start - shard.offsets[groups[0]], stop - start)

    def _shard_image_sizes(self, index: int, start: int, stop: int) -> np.ndarray:
        # Per-row lengths are not in Parquet's metadata and reading them means reading the images: each
        # overlapping row group's image-column chunk size (uncompressed: independent of the codec) stands in.
        shard, first_row = self.opened(index), self.shards.offsets[index]
        described = []
        for group in self._overlapping_groups(shard, start, stop):
            meta = shard.file.metadata.row_group(group)
            size = sum(meta.column(c).total_uncompressed_size for c in range(meta.num_columns)
                       if meta.column(c).path_in_schema.split(".")[0] == self.config.image_column)
            described += [first_row + shard.offsets[group], meta.num_rows, size]
        return np.array(described, np.int64)
