"""The row-reader protocol: what a slice run, the manifest and verify need of an input format.

A reader gives random access to rows [start, stop) of one input (only those rows are read into memory) and
describes rows cheaply for the manifest's fingerprints: the keys as Arrow text and the images' byte sizes,
without decoding or copying an image. Adding a format is one file with a `RowReader` subclass plus one entry in
`vlm_hpc.run.readers.READERS`.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vlm_hpc.config import DataSection
from vlm_hpc.errors import VlmHpcError


@dataclass(frozen=True)
class Row:
    """One input row: its global row number, web key, raw image bytes (None if the cell is empty) and the
    caption that came with the image from the web (None if there is none). `failure` is set where the input
    itself says the row has no image to caption (a FailureReason, e.g. img2dataset's failed downloads), with
    `detail` for the ledger."""

    row: int
    key: str | None
    image: bytes | None
    web_caption: str | None
    failure: str | None = None
    detail: str = ""


# Rows per read in a fingerprint pass; a fixed piecing keeps Parquet's per-row-group description identical.
_PIECE_ROWS = 200_000


class RowReader(ABC):
    """Random access to the rows of one input. The public methods clip [start, stop) to `num_rows` (which
    honours data.limit); the abstract ones are only called with 0 <= start < stop <= num_rows.

    Readers are created in the worker's main process and inherited by its DataLoader processes (fork).
    """

    format: ClassVar[str]  # its data.format word
    # Readers that keep what they learn of the input (a shard list, tar indexes) take `cache_dir` as a keyword:
    # open_reader passes the run's input cache folder (vlm_hpc.run.layout.InputCache) to them only.
    caches_inputs: ClassVar[bool] = False

    def __init__(self, config: DataSection, total_rows: int) -> None:
        self.config = config
        self.num_rows = total_rows if config.limit is None else min(total_rows, config.limit)

    @classmethod
    def claims(cls, path: Path) -> bool:
        """Whether data.format auto picks this reader for `path` (from its name and kind alone, reading
        nothing); a reader that is only chosen by name says no."""
        return False

    @abstractmethod
    def describe(self) -> str:
        """The input in words, for logs and errors (e.g. its path)."""

    @abstractmethod
    def _read(self, start: int, stop: int) -> list[Row]:
        """Rows [start, stop), read from the input only for these rows."""

    @abstractmethod
    def _key_array(self, start: int, stop: int) -> pa.Array | pa.ChunkedArray:
        """The keys of rows [start, stop) as Arrow values (null: no key), reading no image."""

    @abstractmethod
    def _image_sizes(self, start: int, stop: int) -> np.ndarray:
        """int64 numbers that change when an image of rows [start, stop) changes size, reading no image: one
        byte length per row (-1: no image), or a coarser description where per-row lengths are not stored
        (Parquet: first row, rows and bytes of each overlapping row group). Must be the same for the same range."""

    def read(self, start: int, stop: int) -> list[Row]:
        """Rows [start, stop) (clipped to the input)."""
        stop = min(stop, self.num_rows)
        return self._read(start, stop) if start < stop else []

    def key_array(self, start: int, stop: int) -> pa.ChunkedArray:
        """The keys of rows [start, stop) as Arrow data, not converted to Python."""
        stop = min(stop, self.num_rows)
        if start >= stop:
            return pa.chunked_array([], pa.string())
        keys = self._key_array(start, stop)
        return keys if isinstance(keys, pa.ChunkedArray) else pa.chunked_array([keys])

    def keys(self, start: int, stop: int) -> list[str | None]:
        """Only the keys of rows [start, stop), as text: cheap, for verification."""
        return [None if k is None else str(k) for k in self.key_array(start, stop).to_pylist()]

    def columns(self, start: int, stop: int, names: list[str]) -> pa.Table:
        """Input columns `names` of rows [start, stop) (clipped to the input) as Arrow data, for an export's extra
        columns; one error naming an unknown column and the columns there are. A format that cannot give
        arbitrary columns keeps this default, which refuses."""
        raise VlmHpcError(f"export: {self.describe()} is read by the {self.format!r} reader, which cannot export "
                          "extra input columns; export without --columns")

    def web_captions(self, start: int, stop: int) -> list[str | None]:
        """The web captions of rows [start, stop) (clipped), as text. This default reads whole rows, images
        included; a format that can read the caption column alone overrides it."""
        return [row.web_caption for row in self.read(start, stop)]

    def image_sizes(self, start: int, stop: int) -> np.ndarray:
        """What `_image_sizes` describes, for rows [start, stop) clipped to the input (int64)."""
        stop = min(stop, self.num_rows)
        return self._image_sizes(start, stop) if start < stop else np.zeros(0, np.int64)

    def shard_list_digest(self) -> str | None:
        """A digest of the shard list this reader reads (names, sizes, row counts; not their location), which
        the manifest records so that a changed list is seen; None for a reader that keeps no shard list."""
        return None

    def fingerprint(self) -> str:
        """Identifies the input by content, not location (nodes may mount it elsewhere): columns, row count and
        the first and last keys (no full scan)."""
        first = self.keys(0, min(self.num_rows, 8))
        last = self.keys(max(0, self.num_rows - 8), self.num_rows)
        config = self.config
        text = json.dumps([config.key_column, config.image_column, config.caption_column, self.num_rows, first, last])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def existing_path(config: DataSection) -> Path:
    """data.path, which must exist; else the one error that says so."""
    path = Path(config.path)
    if not path.exists():
        raise VlmHpcError(f"data: {path} does not exist; set data.path to a datasets.save_to_disk folder, a "
                          ".parquet/.arrow/.tar file, a folder or glob of them, or an image folder")
    return path


def download_failure(status: str | None, error: str | None) -> dict:
    """img2dataset's verdict on a row as Row fields: a status other than success (failed_to_download,
    failed_to_resize) puts the row in the ledger as not_downloaded, with img2dataset's error message."""
    if status is None or status == "success":
        return {}
    return dict(failure="not_downloaded", detail=f"img2dataset {status}: {error or 'no error message'}")


def slice_fingerprint(reader: RowReader, start: int, stop: int,
                      keys_seen: Callable[[int, list[str | None]], None] | None = None) -> str:
    """Content fingerprint of rows [start, stop): every key and every image's byte length (for Parquet, each
    row group's image-column size), without decoding or copying an image. `keys_seen(first_row, keys)` gets
    the keys as text, piece by piece, for a caller that scans them anyway (duplicate keys)."""
    lengths, content, sizes = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
    stop = min(stop, reader.num_rows)
    for piece in range(start, stop, _PIECE_ROWS):
        piece_stop = min(stop, piece + _PIECE_ROWS)
        keys = reader.key_array(piece, piece_stop)
        _update_with_text(lengths, content, keys)
        sizes.update(reader.image_sizes(piece, piece_stop).tobytes())
        if keys_seen is not None:
            keys_seen(piece, [None if k is None else str(k) for k in keys.to_pylist()])
    combined = f"{max(0, stop - start)}:{lengths.hexdigest()}:{content.hexdigest()}:{sizes.hexdigest()}"
    return hashlib.sha256(combined.encode()).hexdigest()[:16]


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
