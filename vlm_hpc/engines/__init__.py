"""Caption engines: tiles in, captions out. `ENGINES` is the one place an implementation is registered.

Adding an engine is one module with an `Engine` subclass plus one line in `ENGINES` (or a `register_engine`
call from the code that defines it); `model.engine: NAME` then selects it. Entries are "module:Class" text so
that reading a config imports no engine (torch and transformers load only when the transformers engine does).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from vlm_hpc.engines.base import Engine
from vlm_hpc.errors import VlmHpcError

if TYPE_CHECKING:
    from vlm_hpc.config import RunConfig

ENGINES: dict[str, str | type[Engine]] = {
    "transformers": "vlm_hpc.engines.transformers:TransformersEngine",
}


def register_engine(name: str, engine: str | type[Engine]) -> None:
    """Make `model.engine: name` select `engine` (a class, or its "module:Class" path)."""
    ENGINES[name] = engine


def engine_names() -> list[str]:
    """The values `model.engine` accepts."""
    return sorted(ENGINES)


def engine_class(name: str) -> type[Engine]:
    """The registered engine class called `name`, imported now."""
    if name not in ENGINES:
        raise VlmHpcError(f"model.engine is {name!r}; choose one of {', '.join(engine_names())}")
    entry = ENGINES[name]
    if isinstance(entry, str):
        module, _, attribute = entry.partition(":")
        entry = getattr(importlib.import_module(module), attribute)
    return entry


def load_engine(config: RunConfig) -> Engine:
    """The engine `model.engine` names, loaded for this run's config."""
    return engine_class(config.model.engine).from_config(config)
