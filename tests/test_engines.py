"""The engine seam: an engine registered through `vlm_hpc.engines` is what `model.engine` selects, and reading a
config loads no engine library."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from builders import noise_dataset, read_captions, write_config, write_conversation
from vlm_hpc.config import load_config
from vlm_hpc.engines import engine_names, register_engine
from vlm_hpc.engines.base import Caption, Engine
from vlm_hpc.errors import VlmHpcError
from vlm_hpc.internvl.prompt import V15_ENGLISH_SYSTEM_MESSAGE
from vlm_hpc.run.slice_run import run_slice
from vlm_hpc.verify import verify


class NullEngine(Engine):
    """Captions without a model: the text names the tile count, so the test sees the tiles arrived."""

    def __init__(self, system_message: str) -> None:
        self.system_message = system_message
        self.tiles_seen: list[int] = []

    @classmethod
    def from_config(cls, config) -> NullEngine:
        return cls(config.prompt.system_message or "no system message")

    def caption(self, tiles, settings=None, poll=None) -> list[Caption]:
        self.tiles_seen += [t.shape[0] for t in tiles]
        return [Caption(text=f"null caption of {t.shape[0]} tiles", token_ids=[1], stopped=True) for t in tiles]

    def prompt(self, num_tiles: int) -> str:
        return f"null prompt, {num_tiles} tiles"

    def describe(self) -> dict[str, str]:
        return {"device": "none", "dtype": "none", "system_message": self.system_message}


def test_an_engine_registered_by_name_is_the_one_run_slice_loads(golden_model_dir: Path, tmp_path: Path) -> None:
    register_engine("null", NullEngine)
    assert "null" in engine_names() and "transformers" in engine_names()
    output = tmp_path / "out"
    config = load_config(write_config(tmp_path / "c.yaml", golden_model_dir, noise_dataset(tmp_path / "data", 5),
                                      output, model={"engine": "null"}, worker={"loader_workers": 0}))
    assert run_slice(config, 0, 1).status == "done"  # no engine_factory: model.engine decides
    captions = read_captions(output)
    assert {record["vlm_caption"] for record in captions.values()} == {"null caption of 1 tiles"}
    assert len(captions) == 5 and verify(output).ok
    stamp = json.loads((output / "stamps" / "slice_00000.json").read_text())[0]
    assert stamp["engine"] == "null" and stamp["device"] == "none" and stamp["system_message"] == "no system message"


def test_the_stamp_the_log_and_the_pins_say_where_the_system_message_came_from(golden_model_dir: Path,
                                                                               tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(golden_model_dir, folder)
    write_conversation(folder)
    output = tmp_path / "out"
    config = load_config(write_config(tmp_path / "c.yaml", folder, noise_dataset(tmp_path / "data", 2), output,
                                      worker={"loader_workers": 0}))
    assert run_slice(config, 0, 1).status == "done"
    stamp = json.loads((output / "stamps" / "slice_00000.json").read_text())[0]
    assert stamp["system_message"] == V15_ENGLISH_SYSTEM_MESSAGE
    assert stamp["system_message_source"] == "conversation.py (internlm2-chat)"
    assert "system message: conversation.py (internlm2-chat)" in (output / "logs" / "slice_00000.log").read_text()
    assert json.loads((output / "manifest.json").read_text())["pinned"]["system_message"] == V15_ENGLISH_SYSTEM_MESSAGE


def test_an_unknown_engine_is_one_line_naming_the_choices(tmp_path: Path) -> None:
    with pytest.raises(VlmHpcError) as refusal:
        load_config(None, ["model.engine=vllm"])
    assert str(refusal.value) == "defaults: model.engine is 'vllm'; choose one of " + ", ".join(engine_names())


def test_reading_a_config_imports_neither_torch_nor_transformers() -> None:
    code = ("import sys, vlm_hpc.config, vlm_hpc.engines.base; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
