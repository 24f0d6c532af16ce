"""Caption engines: tiles in, captions out. `ENGINES` is the one place an implementation is registered.

Adding an engine is one module with an `Engine` subclass plus one line in `ENGINES` (or a `register_engine`
call from the code that defines it); `model.engine: NAME` then selects it. Entries are functions returning the
class, so that reading a config imports no engine (torch and transformers load only when that engine is chosen).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from vlm_hpc.engines.base import Engine
from vlm_hpc.errors import VlmHpcError

if TYPE_CHECKING:
    from vlm_hpc.config import RunConfig



def _transformers() -> type[Engine]:
    from vlm_hpc.engines.transformers import TransformersEngine
    return TransformersEngine


ENGINES: dict[str, Callable[[], type[Engine]]] = {
    "transformers": _transformers,
}


def register_engine(name: str, engine: type[Engine] | Callable[[], type[Engine]]) -> None:
    """Make `model.engine: name` select `engine` (a class, or a function that imports and returns it)."""
    ENGINES[name] = (lambda: engine) if isinstance(engine, type) else engine


def engine_names() -> list[str]:
    """The values `model.engine` accepts."""
    return sorted(ENGINES)


def engine_class(name: str) -> type[Engine]:
    """The registered engine class called `name`, imported now."""
    if name not in ENGINES:
        raise VlmHpcError(f"model.engine is {name!r}; choose one of {', '.join(engine_names())}")
    return ENGINES[name]()


def load_engine(config: RunConfig) -> Engine:
    """The engine `model.engine` names, loaded for this run's config."""
    return engine_class(config.model.engine).from_config(config)
