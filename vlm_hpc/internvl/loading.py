"""Load a model folder into transformers' native `InternVLForConditionalGeneration`, shard by shard.

Two layouts are accepted: the user's original InternVL-Chat-V1-5 download (model_type `internvl_chat`, mapped
by `weight_mapping`) and a native copy written by `python -m vlm_hpc.convert`. Nothing in the folder is
executed: configs are JSON, weights are safetensors, and `trust_remote_code` is never involved.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import InternVLConfig, InternVLForConditionalGeneration

from vlm_hpc.errors import VlmHpcError
from vlm_hpc.internvl.conversation_file import CONVERSATION_FILE, read_template
from vlm_hpc.internvl.prompt import DEFAULT_SYSTEM_MESSAGE, IMG_CONTEXT, TEMPLATE_NAME
from vlm_hpc.internvl.tokenizer import TOKENIZER_FILES, load_tokenizer
from vlm_hpc.internvl.weight_mapping import SplitShapes, check_supported, map_tensor, native_config

# Written beside a native copy: what the original config said that the native config cannot hold.
NATIVE_METADATA_FILE = "vlm_hpc.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelFolder:
    """What a model folder holds, read from its JSON files only."""

    path: Path
    layout: str  # "original" or "native"
    config: InternVLConfig
    system_message: str  # resolved as the original does, see folder_system_message
    system_message_source: str  # where it came from, for the stamp and the log: "config.json", ...
    weight_files: tuple[Path, ...]
    original_config: dict | None  # the original config.json (None for a native copy)
    fingerprint: str  # model_fingerprint(path)
    tokenizer_fingerprint: str  # tokenizer_fingerprint(path)

    @property
    def num_image_token(self) -> int:
        return int(self.config.image_seq_length)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise VlmHpcError(f"model: {path} is missing; model.path must be the downloaded InternVL-Chat-V1-5 "
                          "folder (config.json, *.safetensors, tokenizer files)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise VlmHpcError(f"model: cannot read {path}: {exc}") from None


def _weight_files(folder: Path) -> tuple[Path, ...]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        files = tuple(folder / name for name in shards)
    elif (folder / "model.safetensors").is_file():
        files = (folder / "model.safetensors",)
    else:
        files = tuple(sorted(folder.glob("*.safetensors")))
    if not files:
        pickles = sorted(p.name for p in folder.glob("*.bin"))
        hint = (f" (found {', '.join(pickles)}: pickled weights can run code and are not loaded; convert them "
                "to safetensors first)") if pickles else ""
        raise VlmHpcError(f"model: no *.safetensors weights in {folder}{hint}")
    for path in files:
        if not path.is_file():
            raise VlmHpcError(f"model: weight shard {path} named by the index is missing; re-download it")
    return files


# What the tokenizer reads besides TOKENIZER_FILES (optional there).
_TOKENIZER_EXTRA_FILES = ("special_tokens_map.json",)


def model_fingerprint(path: str | Path) -> str:
    """The model's identity by content, cheap (no weights read): config.json, tokenizer.model and
    tokenizer_config.json bytes, the safetensors shards' names and sizes (the stamps' model_fingerprint)."""
    folder = Path(path)
    digest = hashlib.sha256()
    for name in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        if (folder / name).is_file():
            digest.update((folder / name).read_bytes())
    for shard in sorted(folder.glob("*.safetensors")):
        digest.update(f"{shard.name}:{shard.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def tokenizer_fingerprint(path: str | Path) -> str:
    """The bytes of every file the tokenizer is built from."""
    folder = Path(path)
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES + _TOKENIZER_EXTRA_FILES:
        if (folder / name).is_file():
            digest.update(name.encode() + b"\0" + (folder / name).read_bytes())
    return digest.hexdigest()[:16]


def folder_system_message(folder: Path, raw_config: dict) -> tuple[str, str]:
    """(system message, its source) of an original-layout folder, chosen as InternVLChatModel.__init__ does:
    config.json's `system_message` whenever the key is present (`hasattr(config, 'system_message')`, so an empty
    string counts), else the `internlm2-chat` template's of the folder's conversation.py, which the original
    imports; our default only when the folder has no conversation.py. The file is parsed and its template
    checked even when config.json decides, because build_prompt stands in for that template."""
    path = folder / CONVERSATION_FILE
    template = read_template(path) if path.is_file() else None
    if path.is_file() and template is None:
        raise VlmHpcError(f"model: {path} registers no {TEMPLATE_NAME!r} template, which config.json names and the "
                          "original would fail to find; restore the file from the InternVL-Chat-V1-5 download")
    if "system_message" in raw_config:
        message = raw_config["system_message"]
        if not isinstance(message, str):
            raise VlmHpcError(f"model: {folder}/config.json has system_message {message!r}, not text; set it to "
                              "a string or remove it")
        return message, "config.json"
    if template is not None:
        return template.system_message, f"{CONVERSATION_FILE} ({TEMPLATE_NAME})"
    return DEFAULT_SYSTEM_MESSAGE, "default"


def inspect_model_folder(path: str | Path) -> ModelFolder:
    """Read and validate a model folder's config and tokenizer without loading any weights."""
    folder = Path(path)
    if not folder.is_dir():
        raise VlmHpcError(f"model: {folder} is not a folder; set model.path to the downloaded "
                          "InternVL-Chat-V1-5 folder")
    raw = _read_json(folder / "config.json")
    image_token_id = load_tokenizer(folder).token_to_id(IMG_CONTEXT)
    model_type = raw.get("model_type")
    if model_type == "internvl_chat":
        check_supported(raw, str(folder / "config.json"))
        config = native_config(raw, image_token_id)
        system_message, source = folder_system_message(folder, raw)
        return ModelFolder(folder, "original", config, system_message, source, _weight_files(folder), raw,
                           model_fingerprint(folder), tokenizer_fingerprint(folder))
    if model_type == "internvl":
        metadata = _read_json(folder / NATIVE_METADATA_FILE)
        config = InternVLConfig.from_dict(raw)
        if config.tie_word_embeddings or config.image_token_id != image_token_id:
            raise VlmHpcError(f"model: {folder} is a native InternVL folder not written by vlm_hpc.convert "
                              "(tied lm_head or another image token); convert the original folder instead")
        # Copies converted before the source was recorded say only that the message was pinned there.
        source = metadata.get("system_message_source", "unrecorded")
        return ModelFolder(folder, "native", config, metadata["system_message"],
                           f"{NATIVE_METADATA_FILE} ({source})", _weight_files(folder), None,
                           model_fingerprint(folder), tokenizer_fingerprint(folder))
    raise VlmHpcError(f"model: {folder}/config.json has model_type {model_type!r}; expected 'internvl_chat' "
                      "(the original InternVL-Chat-V1-5 download) or 'internvl' (a vlm_hpc.convert copy)")


def iter_native_tensors(folder: ModelFolder):
    """Yield (native name, tensor) for every checkpoint tensor, one shard open at a time (host memory stays
    at one tensor, not one checkpoint)."""
    shapes = SplitShapes.from_original(folder.original_config) if folder.original_config else None
    for shard in folder.weight_files:
        with safe_open(str(shard), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                if shapes is None:
                    yield key, tensor
                else:
                    yield from map_tensor(key, tensor, shapes)


def load_model(path: str | Path | ModelFolder, dtype: torch.dtype | str = torch.bfloat16,
               device: str | torch.device = "cpu",
               attn_implementation: str = "sdpa") -> InternVLForConditionalGeneration:
    """Load an InternVL-Chat-V1.5 folder (original or native layout) strictly: every checkpoint tensor used,
    every model tensor filled, else an error naming the keys."""
    folder = path if isinstance(path, ModelFolder) else inspect_model_folder(path)
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    device = torch.device(device)
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(folder.config)
    model.set_attn_implementation(attn_implementation)
    model.to(dtype).to_empty(device=device)
    expected = model.state_dict()
    filled: set[str] = set()
    unexpected: list[str] = []
    with torch.no_grad():
        for name, tensor in iter_native_tensors(folder):
            target = expected.get(name)
            if target is None or name in filled:
                unexpected.append(name)
                continue
            if tuple(target.shape) != tuple(tensor.shape):
                raise VlmHpcError(f"model: {name} has shape {tuple(tensor.shape)} in {folder.path}, the config "
                                  f"implies {tuple(target.shape)}; config.json and the weights disagree")
            target.copy_(tensor)
            filled.add(name)
    missing = sorted(set(expected) - filled)
    if missing or unexpected:
        raise VlmHpcError(f"model: {folder.path} does not match the architecture: missing {missing[:8]}"
                          f"{'...' if len(missing) > 8 else ''}, unexpected or duplicate {unexpected[:8]}")
    _restore_computed_buffers(model, device)
    lm_head, embeddings = model.lm_head.weight, model.get_input_embeddings().weight
    if lm_head.data_ptr() == embeddings.data_ptr():
        raise VlmHpcError("model: lm_head is tied to the input embeddings; V1.5 keeps them separate")
    model.eval()
    model.generation_config.eos_token_id = None  # generation settings come from vlm_hpc, never the folder
    return model


def _restore_computed_buffers(model: torch.nn.Module, device: torch.device) -> None:
    """Recompute buffers that no checkpoint holds (RoPE frequencies), in float32 as the native classes do.

    Skipping this is exactly how the remote code silently breaks on transformers 5: to_empty leaves them garbage.
    """
    for name, module in model.named_modules():
        buffers = getattr(module, "_non_persistent_buffers_set", set())
        if not buffers:
            continue
        if not type(module).__name__.endswith("RotaryEmbedding"):
            raise VlmHpcError(f"model: {name} ({type(module).__name__}) has computed buffers {sorted(buffers)} "
                              "that vlm_hpc does not know how to restore; this transformers version is untested")
        fresh = type(module)(module.config)
        for buffer in buffers:
            setattr(module, buffer, getattr(fresh, buffer).to(device))
