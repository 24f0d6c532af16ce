"""Shared fixtures. The golden set defaults to tests/fixtures/golden (a copy of the visible set); point
VLM_HPC_GOLDEN at another set produced by the same recipe to run every exactness test against it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = Path(os.environ.get("VLM_HPC_GOLDEN", FIXTURES / "golden"))


def load_golden(name: str) -> dict:
    return json.loads((GOLDEN / name).read_text())


@pytest.fixture(scope="session")
def golden() -> Path:
    return GOLDEN


@pytest.fixture(scope="session")
def golden_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The golden tiny checkpoint with the golden tokenizer beside it, as a user's model folder looks."""
    folder = tmp_path_factory.mktemp("golden_model")
    for source in (GOLDEN / "model", GOLDEN / "tokenizer"):
        for item in source.iterdir():
            shutil.copyfile(item, folder / item.name)
    return folder


@pytest.fixture(scope="session")
def golden_images() -> dict[str, bytes]:
    """Golden image bytes by key."""
    index = load_golden("images/index.json")["images"]
    return {item["key"]: (GOLDEN / "images" / item["file"]).read_bytes() for item in index}


@pytest.fixture(scope="module")
def shared_engine():
    """One loaded engine for every in-process run (the model is the same; only slices differ)."""
    from vlm_hpc.engines import load_engine
    cache: dict = {}

    def factory(config):
        if "engine" not in cache:
            cache["engine"] = load_engine(config)
        engine = cache["engine"]
        engine.system_message = config.prompt.system_message or engine.system_message
        return engine
    return factory
