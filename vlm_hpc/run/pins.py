"""The settings that change a caption, pinned in OUTPUT/manifest.json so that a resume cannot silently mix
captions made with different ones.

This module is where "what is pinned" is written down. Everything else may change between a stop and its
resume: batch sizes, tile budgets, sort windows, vision micro-batches (they change no caption's tokens in the
CPU tests, see the README), worker.*, slurm.*, model.device and model.path itself (the model is pinned by
content, since nodes may mount it elsewhere). output.format is the manifest's own field: it fixes the layout,
so it is never accepted as a change.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING

from vlm_hpc.config import RunConfig

if TYPE_CHECKING:  # the record needs only its fields; verify and status must not import torch
    from vlm_hpc.internvl.loading import ModelFolder

_TEXT_SHOWN = 24  # characters of a changed text shown on each side


def _setting(name: str) -> dict:
    return {"setting": name}


@dataclass(frozen=True)
class PinnedSettings:
    """Everything that changes a caption, each field named in messages by its config key."""

    model: str = field(metadata=_setting("model"))  # model_fingerprint of model.path
    tokenizer: str = field(metadata=_setting("tokenizer"))  # tokenizer_fingerprint of model.path
    dtype: str = field(metadata=_setting("model.dtype"))
    engine: str = field(metadata=_setting("model.engine"))  # another implementation may give other tokens
    system_message: str = field(metadata=_setting("prompt.system_message"))  # as resolved, never None
    question: str = field(metadata=_setting("prompt.question"))
    max_num: int = field(metadata=_setting("tiling.max_num"))
    skip_truncated: bool = field(metadata=_setting("tiling.skip_truncated"))
    do_sample: bool = field(metadata=_setting("generation.do_sample"))
    temperature: float = field(metadata=_setting("generation.temperature"))
    top_p: float = field(metadata=_setting("generation.top_p"))
    max_new_tokens: int = field(metadata=_setting("generation.max_new_tokens"))
    num_beams: int = field(metadata=_setting("generation.num_beams"))
    seed: int = field(metadata=_setting("generation.seed"))

    def to_dict(self) -> dict:
        return asdict(self)


def pinned_settings(config: RunConfig, folder: ModelFolder) -> PinnedSettings:
    """The pins of a run with `config` on the model in `folder` (inspected, not loaded)."""
    g = config.generation
    return PinnedSettings(
        model=folder.fingerprint, tokenizer=folder.tokenizer_fingerprint, dtype=config.model.dtype,
        engine=config.model.engine,
        # Resolved as the engine resolves it: the config's, else the folder's (loading.folder_system_message).
        system_message=config.prompt.system_message or folder.system_message, question=config.prompt.question,
        max_num=config.tiling.max_num, skip_truncated=config.tiling.skip_truncated, do_sample=g.do_sample,
        temperature=g.temperature, top_p=g.top_p, max_new_tokens=g.max_new_tokens, num_beams=g.num_beams,
        seed=g.seed)


@dataclass(frozen=True)
class PinComparison:
    """A recorded set of pins against the current settings."""

    changed: list[str]  # one phrase per difference: "tiling.max_num: 6 then, 4 now"
    not_pinned: list[str]  # settings the record lacks (written before they were pinned), by config key


def _shown(value: object) -> str:
    if isinstance(value, str):
        return repr(value if len(value) <= _TEXT_SHOWN else value[:_TEXT_SHOWN] + "...")
    return str(value)


def _difference(setting: str, then: object, now: object) -> str:
    if isinstance(now, str) and setting.startswith("prompt."):
        return f"{setting}: changed ({_shown(then)} then, {_shown(now)} now)"
    if setting in ("model", "tokenizer"):
        return f"{setting}: {then} then, {now} now (the files in model.path differ)"
    return f"{setting}: {_shown(then)} then, {_shown(now)} now"


def compare_pins(recorded: dict | None, current: PinnedSettings) -> PinComparison:
    """What differs between the pins a manifest recorded (None: none yet) and the current ones."""
    recorded = recorded or {}
    changed, not_pinned = [], []
    for item in fields(PinnedSettings):
        setting, now = item.metadata["setting"], getattr(current, item.name)
        if item.name not in recorded:
            not_pinned.append(setting)
        elif recorded[item.name] != now:
            changed.append(_difference(setting, recorded[item.name], now))
    return PinComparison(changed, not_pinned)
