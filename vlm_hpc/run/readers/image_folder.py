"""data.format images: every image file below a folder, in order of relative path.

Image files are those with an extension (any case) in data.image_extensions or gif, tif, tiff, bmp. A row's key
is the file's relative path without its extension (`a/b/c` for `a/b/c.jpg`; the output layout encodes keys
with slashes safely), its web caption the `.txt` beside the image (`a/b/c.txt`) when there is one, else None.

The file list is made by walking the folder once, by the first start that opens it with an input cache
(OUTPUT/inputs/files.parquet), and read back by later starts. An image deleted since is a row without an image
(its slice's fingerprint sees the change at that slice's start).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlm_hpc.config import DataSection
from vlm_hpc.errors import VlmHpcError
from vlm_hpc.run.durable import write_atomic
from vlm_hpc.run.layout import InputCache
from vlm_hpc.run.readers.base import Row, RowReader, existing_path

EXTRA_EXTENSIONS = ("gif", "tif", "tiff", "bmp")  # Pillow opens them; web shards rarely hold them


def image_files(folder: Path, extensions: set[str]) -> list[str]:
    """The relative paths (forward slashes) of the image files below `folder`, sorted."""
    found = []
    for directory, folders, names in os.walk(folder):
        folders.sort()
        base = Path(directory).relative_to(folder)
        found += [(base / name).as_posix() for name in names if name.rpartition(".")[2].lower() in extensions
                  and "." in name]
    return sorted(found)


class ImageFolderReader(RowReader):
    """Rows of the image files below data.path (see the module docstring)."""

    format = "images"
    caches_inputs = True

    def __init__(self, config: DataSection, cache_dir: Path | None = None) -> None:
        self.folder = existing_path(config)
        if not self.folder.is_dir():
            raise VlmHpcError(f"data: {self.folder} is not a folder; data.format images reads the image files below "
                              "a folder")
        self.extensions = sorted({e.lower().lstrip(".") for e in [*config.image_extensions, *EXTRA_EXTENSIONS]})
        self.config = config
        self.files = self._listing(InputCache(Path(cache_dir)) if cache_dir is not None else None)
        if not self.files:
            raise VlmHpcError(f"data: {self.folder} holds no image files ({', '.join(self.extensions)}), and is "
                              "not a datasets.save_to_disk folder nor a folder of .parquet/.arrow/.tar shards; set "
                              "data.path, or data.format and data.image_extensions")
        super().__init__(config, len(self.files))

    @classmethod
    def claims(cls, path: Path) -> bool:
        return path.is_dir()  # asked last: a folder that no shard format claimed

    def _listing(self, cache: InputCache | None) -> list[str]:
        """The file list: the recorded one when it was made with these extensions, else walked now."""
        if cache is not None and cache.file_list.exists():
            try:
                table = pq.read_table(str(cache.file_list))
                if (table.schema.metadata or {}).get(b"extensions") == json.dumps(self.extensions).encode():
                    return table.column("path").to_pylist()
            except (OSError, pa.ArrowInvalid, KeyError):
                pass  # a cache: made again
        files = image_files(self.folder, set(self.extensions))
        if cache is not None:
            table = pa.table({"path": pa.array(files, pa.string())})
            sink = pa.BufferOutputStream()
            pq.write_table(table.replace_schema_metadata({"extensions": json.dumps(self.extensions)}), sink)
            try:
                write_atomic(cache.file_list, sink.getvalue().to_pybytes())
            except OSError as exc:
                raise VlmHpcError(f"output: cannot write the image list {cache.file_list} ({exc}); set output.dir "
                                  "to a writable folder") from None
        return files

    def describe(self) -> str:
        return f"image folder {self.folder}"

    def shard_list_digest(self) -> str | None:
        listed = hashlib.sha256(json.dumps([self.extensions, self.files]).encode())
        return listed.hexdigest()[:16]

    @staticmethod
    def key(relative: str) -> str:
        """The key of the file at `relative`: its path without the extension."""
        return relative[:len(relative) - len(PurePosixPath(relative).suffix)]

    def _read(self, start: int, stop: int) -> list[Row]:
        rows = []
        for row in range(start, stop):
            path = self.folder / self.files[row]
            try:
                image = path.read_bytes()
            except OSError:
                image = None  # gone since the list was made: recorded as missing
            try:
                caption = path.with_suffix(".txt").read_bytes().decode("utf-8", "replace")
            except OSError:
                caption = None
            rows.append(Row(row, self.key(self.files[row]), image, caption))
        return rows

    def _key_array(self, start: int, stop: int) -> pa.Array:
        return pa.array([self.key(f) for f in self.files[start:stop]], pa.string())

    def _image_sizes(self, start: int, stop: int) -> np.ndarray:
        def size(relative: str) -> int:
            try:
                return (self.folder / relative).stat().st_size
            except OSError:
                return -1
        return np.array([size(f) for f in self.files[start:stop]], np.int64)
