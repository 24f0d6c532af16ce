"""Rows to ready batches, ahead of the model: read, decode and tile in DataLoader processes.

Preparing a row (decode + tile, and tiling it again with fewer tiles when the engine runs out of memory on it)
lives here alone.

Each item is one batch of pending rows. Its uint8 tiles cross to the main process as a single tensor (one
shared-memory transfer per batch), and rows that cannot be captioned come with their failure reason.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace

import torch
from torch.utils.data import DataLoader, Dataset

from vlm_hpc.config import RunConfig, WorkerSection
from vlm_hpc.errors import ImageRejected
from vlm_hpc.preprocess.decode import decode_image
from vlm_hpc.preprocess.tiling import tile_image
from vlm_hpc.run.manifest import RunManifest
from vlm_hpc.run.readers import Row, RowReader
from vlm_hpc.run.stop import loader_process_init


@dataclass
class PreparedRow:
    """A row after CPU work: uint8 tiles ready for the model, or why it cannot be captioned.

    Only sample rows keep their image bytes (to save them): holding every row's bytes through the loader's sort
    windows and prefetch would grow memory by window x depth x image size. The rare retry with fewer tiles
    (`retile`) reads the row's bytes again from the input instead.
    """

    row: int
    key: str | None
    web_caption: str | None
    tiles: torch.Tensor | None = None
    failure: str | None = None
    detail: str = ""
    truncated: bool = False
    image_bytes: bytes | None = None
    sample_extension: str | None = None  # set for the rows whose image goes to the sample folder

    @property
    def ready(self) -> bool:
        """Whether the row goes to the engine (it has tiles); the others are recorded without the model."""
        return self.tiles is not None

    def retile(self, max_num: int, image: bytes) -> PreparedRow:
        """This row decoded and tiled again from `image` (its bytes) with at most `max_num` tiles (plus
        thumbnail)."""
        return replace(self, tiles=tile_image(decode_image(image).image, max_num))


def prepare_row(row: Row, max_num: int, skip_truncated: bool, duplicate_of: int | None, is_sample: bool) -> PreparedRow:
    """Decode and tile one row, or say why not (runs in DataLoader processes)."""
    prepared = PreparedRow(row.row, row.key, row.web_caption)
    if row.key is None or row.key == "":
        prepared.failure, prepared.detail = "missing_key", "the key cell is empty"
        return prepared
    if row.failure is not None:  # the input itself says there is no image (e.g. img2dataset's failed downloads)
        prepared.failure, prepared.detail = row.failure, row.detail
        return prepared
    if duplicate_of is not None:
        prepared.failure, prepared.detail = "duplicate_key", f"row {duplicate_of} has the same key and is captioned"
        return prepared
    try:
        decoded = decode_image(row.image)
        if decoded.truncated and skip_truncated:
            prepared.failure, prepared.detail, prepared.truncated = "truncated", "skipped (tiling.skip_truncated)", True
            return prepared
        prepared.tiles = tile_image(decoded.image, max_num)
    except ImageRejected as exc:
        prepared.failure, prepared.detail = exc.reason, exc.detail
        return prepared
    prepared.truncated = decoded.truncated
    if decoded.truncated:
        prepared.failure, prepared.detail = "truncated", "file is cut short; captioned like the original (rest black)"
    if is_sample:
        prepared.image_bytes, prepared.sample_extension = row.image, _sample_extension(decoded.format)
    return prepared


def _sample_extension(file_format: str | None) -> str:
    """The sample image's file extension from its format as Pillow names it."""
    return {"JPEG": "jpg"}.get(file_format or "", (file_format or "").lower() or "bin")


@dataclass
class PreparedBatch:
    """A batch as it crosses from a DataLoader process: every tile in one tensor (one shared-memory
    transfer per batch, not one per row), handed back as per-row views by `unpack`."""

    prepared: list[PreparedRow]
    tiles: torch.Tensor | None
    owners: list[int]  # positions in `prepared` of the rows whose tiles are in `tiles`, in order
    counts: list[int]

    @classmethod
    def pack(cls, prepared: list[PreparedRow]) -> PreparedBatch:
        owners = [i for i, p in enumerate(prepared) if p.ready]
        counts = [prepared[i].tiles.shape[0] for i in owners]
        tiles = torch.cat([prepared[i].tiles for i in owners]) if owners else None
        for i in owners:
            prepared[i].tiles = None
        return cls(prepared, tiles, owners, counts)

    def pin_memory(self) -> PreparedBatch:
        """Tiles in page-locked memory, for asynchronous copies to the GPU (the DataLoader calls this)."""
        if self.tiles is not None:
            self.tiles = self.tiles.pin_memory()
        return self

    def unpack(self) -> list[PreparedRow]:
        if self.tiles is not None:
            for i, view in zip(self.owners, torch.split(self.tiles, self.counts)):
                self.prepared[i].tiles = view
        return self.prepared


class SliceBatches(Dataset):
    """Item i = window i of the pending rows (a batch, or the rows that are sorted into batches), prepared
    (read, decoded, tiled) in a DataLoader process."""

    def __init__(self, rows: RowReader, windows: list[list[int]], config: RunConfig, manifest: RunManifest,
                 sample_stride: int) -> None:
        self.rows = rows
        self.windows = windows
        self.max_num = config.tiling.max_num
        self.skip_truncated = config.tiling.skip_truncated
        self.duplicates = manifest.duplicate_rows
        self.sample_stride = sample_stride

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, item: int) -> PreparedBatch:
        wanted = self.windows[item]
        keep = set(wanted)
        rows = [r for r in self.rows.read(wanted[0], wanted[-1] + 1) if r.row in keep]
        return PreparedBatch.pack([prepare_row(r, self.max_num, self.skip_truncated, self.duplicates.get(str(r.row)),
                                               r.row % self.sample_stride == 0) for r in rows])


def _collate(items: list[PreparedBatch]) -> PreparedBatch:
    return items[0]


def batch_loader(windows: SliceBatches, settings: WorkerSection, pin_memory: bool = False) -> DataLoader:
    """A DataLoader preparing `settings.prefetch_batches` windows ahead in `settings.loader_workers`
    processes (0: in this process), which ignore stop signals (only the main process acts on them) and die
    with this process however it ends."""
    workers = settings.loader_workers
    return DataLoader(windows, batch_size=1, collate_fn=_collate, num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=settings.prefetch_batches if workers else None,
                      worker_init_fn=functools.partial(loader_process_init, os.getpid()) if workers else None)
