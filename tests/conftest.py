"""Shared fixtures (the golden set's location and reader are in `golden`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from golden import GOLDEN, load_golden


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
