"""Input formats: every reader, registered by its data.format word, and `open_reader` choosing one.

Adding a format: a module here with a `RowReader` subclass (see `base`), and one entry in `READERS`. A reader
defined elsewhere (a plugin, a test) registers itself with `register_reader`.
"""

from __future__ import annotations

from pathlib import Path

from vlm_hpc.config import DataSection
from vlm_hpc.errors import VlmHpcError
from vlm_hpc.run.readers.arrow_file import ArrowFileReader
from vlm_hpc.run.readers.base import Row, RowReader, existing_path, slice_fingerprint
from vlm_hpc.run.readers.datasets_folder import DatasetsFolderReader
from vlm_hpc.run.readers.image_folder import ImageFolderReader
from vlm_hpc.run.readers.parquet_file import ParquetFileReader
from vlm_hpc.run.readers.shards import InputsChanged, is_pattern
from vlm_hpc.run.readers.webdataset import WebDatasetReader

__all__ = ["READERS", "InputsChanged", "Row", "RowReader", "open_reader", "register_reader", "slice_fingerprint"]

# data.format word -> reader; data.format auto asks them in this order which one claims data.path.
READERS: dict[str, type[RowReader]] = {
    DatasetsFolderReader.format: DatasetsFolderReader,
    ArrowFileReader.format: ArrowFileReader,
    ParquetFileReader.format: ParquetFileReader,
    WebDatasetReader.format: WebDatasetReader,
    ImageFolderReader.format: ImageFolderReader,
}

AUTO = "auto"


def register_reader(reader: type[RowReader]) -> type[RowReader]:
    """Make `reader` available as data.format `reader.format` (usable as a class decorator)."""
    if reader.format == AUTO or READERS.get(reader.format, reader) is not reader:
        holder = "the automatic choice" if reader.format == AUTO else READERS[reader.format].__name__
        raise VlmHpcError(f"data.format {reader.format!r} is taken by {holder}; give {reader.__name__} another "
                          "format word")
    READERS[reader.format] = reader
    return reader


def open_reader(config: DataSection, cache_dir: Path | None = None) -> RowReader:
    """Open the configured input with the reader data.format names (auto: the one that claims data.path),
    checking its columns; one error line when the input or the format is wrong. `cache_dir` is where readers
    that keep a shard list or tar indexes keep them (a run's OUTPUT/inputs/; None: worked out anew)."""
    if config.format == AUTO:
        path = Path(config.path)
        for reader in READERS.values():
            if reader.claims(path):
                return _open(reader, config, cache_dir)
        if not is_pattern(config.path):
            existing_path(config)
        raise VlmHpcError(f"data: auto cannot tell the format of {path}: it is not a datasets.save_to_disk folder, "
                          "a .parquet/.arrow/.tar file, folder or pattern of them, nor an image folder; set "
                          f"data.format ({', '.join(READERS)})")
    if config.format not in READERS:
        raise VlmHpcError(f"data.format is {config.format!r}; choose one of {', '.join([AUTO, *READERS])}")
    return _open(READERS[config.format], config, cache_dir)


def _open(reader: type[RowReader], config: DataSection, cache_dir: Path | None) -> RowReader:
    return reader(config, cache_dir=cache_dir) if reader.caches_inputs else reader(config)
