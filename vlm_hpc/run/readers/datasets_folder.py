"""data.format datasets: a `datasets.save_to_disk` folder (the seed's input), its Arrow files memory-mapped in the
order its state.json lists them."""

from __future__ import annotations

import json
from pathlib import Path

from vlm_hpc.errors import VlmHpcError
from vlm_hpc.run.readers.arrow_file import ArrowFileReader


class DatasetsFolderReader(ArrowFileReader):
    """Rows of a save_to_disk folder: its data files read as one memory-mapped Arrow table."""

    format = "datasets"

    @classmethod
    def claims(cls, path: Path) -> bool:
        return path.is_dir()

    def arrow_files(self) -> list[Path]:
        state = self.path / "state.json"
        try:
            return [self.path / item["filename"] for item in json.loads(state.read_text())["_data_files"]]
        except (OSError, KeyError, json.JSONDecodeError) as exc:
            raise VlmHpcError(f"data: {self.path} is not a datasets.save_to_disk folder ({state.name}: {exc}); "
                              "pass such a folder or a .parquet/.arrow file") from None
