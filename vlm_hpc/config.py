"""Run configuration: a YAML file plus dotted `key=value` overrides, validated into dataclasses.

Every error is one line naming the key, the file and the fix; an unknown key names the closest valid one.
`${name}` in string values is replaced from the top-level `vars:` mapping (the seed's output folder is
`./outputs/out_${source}_${partition}/`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from vlm_hpc.engines import engine_names
from vlm_hpc.engines.base import GenerationSettings
from vlm_hpc.errors import VlmHpcError
from vlm_hpc.internvl.prompt import CAPTION_QUESTION
from vlm_hpc.run.outputs import OUTPUT_FORMATS

# The vocabularies of the config: the validator accepts exactly these words (in this order in its message). The
# output formats are the registry's names (field metadata "choices"), so that a format registered later counts.
Dtype = Literal["float32", "bfloat16", "float16"]
Device = Literal["auto", "cuda", "cpu"]
AttnImplementation = Literal["sdpa", "eager", "flash_attention_2"]

# Field metadata the validator reads for numbers: "above" (exclusive), "at_least", "at_most", and "when", a
# true/false key of the same section without which the limits do not apply (GenerationSettings writes them too).
LIMITS = ("above", "at_least", "at_most")


def bounded(default: int | float | None, **limits: int | float | str) -> Any:
    """A number field the validator keeps within `limits` (above=, at_least=, at_most=, when=); None passes."""
    return field(default=default, metadata=limits)


def positive(default: int | float | None) -> Any:
    """A field whose value must be above zero."""
    return bounded(default, above=0)


@dataclass
class ModelSection:
    path: str = "./InternVL-Chat-V1-5"
    engine: str = "transformers"  # a name registered in vlm_hpc.engines.ENGINES
    dtype: Dtype = "bfloat16"  # float32 is used on CPU regardless
    device: Device = "auto"
    attn_implementation: AttnImplementation = "sdpa"


@dataclass
class DataSection:
    # A datasets.save_to_disk folder; a .parquet / .arrow / .tar file, a folder of them or a pattern of them
    # (/data/laion/{00000..09999}.tar, shards/*.parquet), ordered by name; or a folder of image files.
    path: str = "./dataset"
    # auto: decided from what data.path holds; or a reader's name (vlm_hpc.run.readers.READERS: datasets, arrow,
    # parquet, webdataset, images), checked when the data is opened, so that a registered reader needs no change.
    format: str = "auto"
    key_column: str = "new_key"
    image_column: str = "png"
    caption_column: str = "caption"
    limit: int | None = positive(None)  # use only the first N rows (the seed's TEST_CUTDOWN)
    # webdataset: a sample's image is its first member with one of these extensions (image folders: these and
    # gif, tif, tiff, bmp)
    image_extensions: list[str] = field(default_factory=lambda: ["jpg", "jpeg", "png", "webp"])
    caption_json_field: str | None = None  # webdataset: the web caption from this field of the .json, not the .txt


@dataclass
class TilingSection:
    max_num: int = bounded(9, at_least=1, at_most=40)  # InternVL-Chat-V1.5 supports up to 40 tiles (4K input)
    skip_truncated: bool = False  # False: caption truncated images as the original does, and list them


@dataclass
class GenerationSection(GenerationSettings):
    """The engine's sampling settings (do_sample, temperature, top_p, max_new_tokens, num_beams, seed: the seed's
    defaults, from GenerationSettings) plus how the worker forms batches."""

    batch_size: int = positive(6)  # images per batch; with a tile_budget, the most images in one batch
    # Tiles per batch, thumbnails included: a number, "auto" (what fits the GPU's free memory), or null for
    # fixed batches of batch_size in row order (the seed's).
    tile_budget: int | str | None = None
    sort_window: int = positive(64)  # with a tile_budget: rows read ahead and sorted by tile count before batching
    vision_batch: int = positive(64)  # tiles per vision-encoder pass (bounds its activation memory)

    def settings(self) -> GenerationSettings:
        """The sampling settings alone, as engines take them."""
        return GenerationSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(GenerationSettings)})


@dataclass
class PromptSection:
    question: str = CAPTION_QUESTION
    system_message: str | None = None  # None: as the original, config.json's, else conversation.py's template


@dataclass
class OutputSection:
    dir: str = "./outputs/out_${source}_${partition}/"
    # A name registered in vlm_hpc.run.outputs: json: captions/{key}.json (the seed's layout) | jsonl: one
    # append-only file per slice
    format: str = field(default="json", metadata={"choices": OUTPUT_FORMATS})
    max_sample_images: int = positive(1000)


@dataclass
class WorkerSection:
    loader_workers: int = bounded(2, at_least=0)  # DataLoader processes decoding and tiling ahead of the GPU
    prefetch_batches: int = positive(4)  # windows (a batch, or sort_window rows) prepared ahead by each loader process
    # Finish the batch in flight within this after a stop signal (Slurm KillWait: 30).
    grace_seconds: float = positive(20.0)
    heartbeat_seconds: float = positive(10.0)
    # Commit finished batches at least this often (each commit costs fsyncs).
    commit_seconds: float = bounded(2.0, at_least=0)
    commit_rows: int = positive(1024)  # ... or as soon as this many rows are finished
    stale_lease_seconds: float = positive(120.0)  # a lease not refreshed for this long is considered dead
    # Heartbeat writes failing for this long give the lease up (null: half of stale_lease_seconds).
    heartbeat_failure_seconds: float | None = positive(None)


@dataclass
class SlurmSection:
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_min: int = positive(240)
    cpus_per_task: int = positive(8)
    mem_gb: int | None = bounded(None, at_least=0)  # None or 0: ask for none, the cluster's default applies
    gpus_per_task: int = positive(1)
    constraint: str | None = None
    # The time-limit warning (SIGUSR2) this long before the end: commit and requeue.
    signal_delay_s: int = bounded(120, at_least=0)
    job_name: str = "vlm_hpc"
    extra_sbatch: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    tiling: TilingSection = field(default_factory=TilingSection)
    generation: GenerationSection = field(default_factory=GenerationSection)
    prompt: PromptSection = field(default_factory=PromptSection)
    output: OutputSection = field(default_factory=OutputSection)
    worker: WorkerSection = field(default_factory=WorkerSection)
    slurm: SlurmSection = field(default_factory=SlurmSection)
    vars: dict[str, Any] = field(default_factory=lambda: {"source": "data", "partition": 0})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.4)
    return f"; did you mean {match[0]!r}?" if match else f"; valid keys: {', '.join(options)}"


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check one value against its annotation (int, float, bool, str, optional, dict)."""
    text = str(hint)
    if value is None:
        if "None" in text:
            return None
        raise VlmHpcError(f"{where} must not be empty")
    if text.startswith("int | str"):  # a number or a word, e.g. generation.tile_budget: 384 | auto
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise VlmHpcError(f"{where} must be a number or a word, got {value!r}")
        return value
    if text.startswith("list"):  # a list of words, e.g. data.image_extensions: [jpg, png]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise VlmHpcError(f"{where} must be a list of words, e.g. [jpg, png], got {value!r}")
        return value
    if "dict" in text:
        if not isinstance(value, dict):
            raise VlmHpcError(f"{where} must be a mapping, got {value!r}")
        return value
    if hint is bool or text.startswith("bool"):
        if not isinstance(value, bool):
            raise VlmHpcError(f"{where} must be true or false, got {value!r}")
        return value
    if text.startswith("int") or hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise VlmHpcError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float or text.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise VlmHpcError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):  # YAML's .inf and .nan are floats, and no setting means either
            raise VlmHpcError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise VlmHpcError(f"{where} must be text, got {value!r}")
    return str(value)


def _build(raw: dict, source: str) -> RunConfig:
    config = RunConfig()
    sections = {f.name: f for f in dataclasses.fields(RunConfig)}
    for section_name, values in raw.items():
        if section_name not in sections:
            raise VlmHpcError(f"{source}: unknown section {section_name!r}{_closest(section_name, list(sections))}")
        if section_name == "vars":
            if not isinstance(values, dict):
                raise VlmHpcError(f"{source}: vars must be a mapping of names to values")
            config.vars.update(values)
            continue
        if values is None:
            continue
        if not isinstance(values, dict):
            raise VlmHpcError(f"{source}: section {section_name!r} must be a mapping of keys to values")
        section = getattr(config, section_name)
        hints = get_type_hints(type(section))
        fields_by_name = {f.name: f for f in dataclasses.fields(section)}
        for key, value in values.items():
            if key not in hints:
                raise VlmHpcError(f"{source}: unknown key {section_name}.{key}{_closest(key, list(hints))}")
            where = f"{source}: {section_name}.{key}"
            value = _coerce(value, hints[key], where)
            choices = get_args(hints[key]) if get_origin(hints[key]) is Literal else \
                fields_by_name[key].metadata.get("choices", ())
            if choices and value not in choices:
                raise VlmHpcError(f"{where} is {value!r}; choose one of {', '.join(choices)}")
            if (section_name, key) == ("model", "engine") and value not in engine_names():
                raise VlmHpcError(f"{where} is {value!r}; choose one of {', '.join(engine_names())}")
            if (section_name, key) == ("generation", "tile_budget") and value is not None \
                    and value != "auto" and not (isinstance(value, int) and value > 0):
                raise VlmHpcError(f"{where} is {value!r}; use a positive number of tiles, auto, or null")
            setattr(section, key, value)
    for section_name in sections.keys() - {"vars"}:
        _check_limits(getattr(config, section_name), section_name, source)
    return config


def _allowed(limits: dict) -> str:
    """The range of `limits` in words: "positive", "from 1 to 40", "above 0 and at most 1"."""
    if limits.keys() == {"above"} and limits["above"] == 0:
        return "positive"
    if limits.keys() == {"at_least", "at_most"}:
        return f"from {limits['at_least']} to {limits['at_most']}"
    words = {"above": "above", "at_least": "at least", "at_most": "at most"}
    return " and ".join(f"{words[name]} {limits[name]}" for name in LIMITS if name in limits)


def _check_limits(section: Any, section_name: str, source: str) -> None:
    """Every number of `section` within its field's limits; run once all keys are set, as `when` names another."""
    for item in dataclasses.fields(section):
        limits = {name: item.metadata[name] for name in LIMITS if name in item.metadata}
        value, when = getattr(section, item.name), item.metadata.get("when")
        if not limits or value is None or (when and not getattr(section, when)):
            continue
        # Written as "not within", so that a NaN from Python code is refused too.
        if not (value > limits.get("above", -math.inf) and value >= limits.get("at_least", -math.inf)
                and value <= limits.get("at_most", math.inf)):
            condition = f" while {section_name}.{when} is true (or set {section_name}.{when}=false)" if when else ""
            raise VlmHpcError(f"{source}: {section_name}.{item.name} must be {_allowed(limits)}{condition}, "
                              f"got {value}")


def _set_dotted(raw: dict, dotted: str) -> None:
    if "=" not in dotted:
        raise VlmHpcError(f"override {dotted!r} is not key=value (example: generation.batch_size=8)")
    key, text = dotted.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise VlmHpcError(f"override key {key!r} must be section.key (example: data.limit=100)")
    value = yaml.safe_load(text) if text.strip() else None
    section = raw.setdefault(parts[0], {})
    if not isinstance(section, dict):
        raise VlmHpcError(f"override {dotted!r}: section {parts[0]!r} is not a mapping")
    section[parts[1]] = value


def _interpolate(config: RunConfig, source: str) -> None:
    def substitute(text: str) -> str:
        def lookup(match: re.Match) -> str:
            name = match.group(1)
            if name not in config.vars:
                raise VlmHpcError(f"{source}: ${{{name}}} is used but vars.{name} is not set")
            return str(config.vars[name])
        return re.sub(r"\$\{(\w+)\}", lookup, text)

    for section in (config.model, config.data, config.output):
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if isinstance(value, str):
                setattr(section, f.name, substitute(value))


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML config (None: all defaults), apply `section.key=value` overrides, validate."""
    raw: dict = {}
    source = str(path) if path else "defaults"
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise VlmHpcError(f"config file {path} does not exist; start from configs/default.yaml") from None
        except yaml.YAMLError as exc:
            raise VlmHpcError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise VlmHpcError(f"{path} must be a mapping of sections (model:, data:, ...)")
    for dotted in overrides:
        _set_dotted(raw, dotted)
    config = _build(raw, source)
    _interpolate(config, source)
    return config
