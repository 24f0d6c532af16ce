"""data.format arrow: Arrow IPC files (stream or file format; one, a folder of them, or a pattern; see
`shards`), memory-mapped when a range touches them: rows are read in place."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from vlm_hpc.errors import VlmHpcError
from vlm_hpc.run.readers.shards import is_pattern
from vlm_hpc.run.readers.table import ShardedTableReader


class ArrowFileReader(ShardedTableReader):
    """Rows of memory-mapped Arrow files, concatenated in name order."""

    format = "arrow"
    kind = "Arrow"
    suffixes = (".arrow",)

    @classmethod
    def claims(cls, path: Path) -> bool:
        if path.is_dir():  # a save_to_disk folder holds .arrow files too: its state.json makes it `datasets`
            return not (path / "state.json").exists() and any(p.suffix == ".arrow" for p in path.iterdir())
        return path.suffix == ".arrow" and (path.is_file() or is_pattern(str(path)))

    def _schema(self, path: Path) -> pa.Schema:
        return memory_mapped_table([path]).schema

    def _row_count(self, path: Path) -> int:
        return memory_mapped_table([path]).num_rows

    def _open_shard(self, path: Path) -> pa.Table:
        return memory_mapped_table([path])

    def _shard_table(self, index: int, start: int, stop: int, columns: list[str]) -> pa.Table:
        return self.opened(index).slice(start, stop - start).select(columns)

    def _shard_image_sizes(self, index: int, start: int, stop: int) -> np.ndarray:
        return self.byte_lengths(self.opened(index).column(self.config.image_column).slice(start, stop - start))


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
