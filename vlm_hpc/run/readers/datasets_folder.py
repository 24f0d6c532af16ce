"""data.format datasets: a `datasets.save_to_disk` folder (the seed's input), its Arrow files memory-mapped in the
order its state.json lists them, each only when a range touches it."""

from __future__ import annotations

import json
from pathlib import Path

from vlm_hpc.config import DataSection
from vlm_hpc.errors import VlmHpcError
from vlm_hpc.run.readers.arrow_file import ArrowFileReader
from vlm_hpc.run.readers.base import existing_path


class DatasetsFolderReader(ArrowFileReader):
    """Rows of a save_to_disk folder: its data files, in state.json's order, as shards."""

    format = "datasets"
    kind = "datasets"

    @classmethod
    def claims(cls, path: Path) -> bool:
        return path.is_dir() and (path / "state.json").is_file()

    def shard_files(self, config: DataSection) -> tuple[Path, list[Path]]:
        folder = existing_path(config)
        state = folder / "state.json"
        try:
            files = [folder / item["filename"] for item in json.loads(state.read_text())["_data_files"]]
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
            raise VlmHpcError(f"data: {folder} is not a datasets.save_to_disk folder ({state.name}: {exc}); "
                              "pass such a folder, or set data.format for another input") from None
        if not files:
            raise VlmHpcError(f"data: {state} lists no data files; save the dataset again with save_to_disk")
        return folder, files

    def describe(self) -> str:
        return str(self.config.path)
