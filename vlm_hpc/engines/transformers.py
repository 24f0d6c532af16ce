"""Captions for batches of tiled images: prompt, tokenize, normalize on the device, generate, decode.

Reproduces `batch_chat`: left-padded prompts, generation stopping on `<|im_end|>` only, finished rows padded
with the pad id, responses decoded with skip_special_tokens, cut at a literal `<|im_end|>` and stripped.
The vision encoder runs in micro-batches of tiles (each tile is encoded on its own, so the split changes no
number) and its features enter generate() pre-encoded: large batches need no vision activations for all
their tiles at once.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import transformers
from transformers import GenerationConfig, InternVLForConditionalGeneration, StoppingCriteria, StoppingCriteriaList
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vlm_hpc.engines.base import Caption, Engine, EngineOutOfMemory, GenerationSettings, MemoryCosts
from vlm_hpc.errors import VlmHpcError
from vlm_hpc.internvl.loading import inspect_model_folder, load_model
from vlm_hpc.internvl.prompt import CAPTION_QUESTION, STOP_TOKEN, build_prompt
from vlm_hpc.internvl.tokenizer import InternLM2Tokenizer, load_tokenizer
from vlm_hpc.preprocess.tiling import normalize

if TYPE_CHECKING:
    from vlm_hpc.config import RunConfig

# The original's generation config comes from the InternLM2 config, whose top_k is transformers' default 50.
ORIGINAL_TOP_K = 50


def generation_config(settings: GenerationSettings, stop_id: int, pad_id: int, bos_id: int) -> GenerationConfig:
    """transformers' GenerationConfig for `settings`, as the original's: sampling adds top_k 50."""
    sampling = {"temperature": settings.temperature, "top_p": settings.top_p, "top_k": ORIGINAL_TOP_K} \
        if settings.do_sample else {}
    return GenerationConfig(
        max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample, num_beams=settings.num_beams,
        eos_token_id=stop_id, pad_token_id=pad_id, bos_token_id=bos_id, **sampling,
    )


# Prefill's transient activations per token (MLP gate, up and product, a few hidden-size buffers) relative to
# the KV cache per token: about 0.75 for InternLM2-20B's shapes, rounded up.
PREFILL_OVER_CACHE = 1.0
# Vision encoder activations per token, in units of (hidden size + MLP size): the MLP intermediate, the
# attention input/output and the residual stream, with room for the allocator's rounding.
VISION_BUFFERS = 3


def encode_images(model: InternVLForConditionalGeneration, uint8_tiles: torch.Tensor, dtype: torch.dtype,
                  vision_batch: int | None) -> torch.Tensor:
    """Image features [tiles, tokens per tile, hidden] from uint8 tiles, normalized on the model's device and
    encoded `vision_batch` tiles at a time (None: all at once)."""
    step = vision_batch or uint8_tiles.shape[0]
    features = []
    for chunk in uint8_tiles.split(step):
        pixel_values = normalize(chunk.to(model.device, non_blocking=True), dtype=dtype)
        features.append(model.model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output)
    return torch.cat(features) if len(features) > 1 else features[0]


def generate_new_tokens(model: InternVLForConditionalGeneration, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor, uint8_tiles: torch.Tensor, generation_config: GenerationConfig,
                        vision_batch: int | None = None,
                        stopping_criteria: StoppingCriteriaList | None = None) -> torch.Tensor:
    """The generated ids [batch, new] for left-padded prompts whose image tokens stand for `uint8_tiles`.
    The engine and the benchmarks share this one path."""
    dtype = next(model.parameters()).dtype
    features = encode_images(model, uint8_tiles, dtype, vision_batch)
    output = model.generate(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=features)},
                            generation_config=generation_config, stopping_criteria=stopping_criteria)
    return output[:, input_ids.shape[1]:]


def memory_costs(model: InternVLForConditionalGeneration, tokens_per_tile: int, text_tokens: int,
                 max_new_tokens: int, vision_batch: int) -> MemoryCosts:
    """Estimated accelerator bytes per tile, per image and per vision micro-batch, from the model's shapes."""
    text = model.config.text_config
    vision = model.config.vision_config
    element = next(model.parameters()).element_size()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * element * (1 + PREFILL_OVER_CACHE)
    vision_tokens = (vision.image_size[0] // vision.patch_size[0]) ** 2 + 1 \
        if isinstance(vision.image_size, (list, tuple)) else (vision.image_size // vision.patch_size) ** 2 + 1
    per_vision_token = (vision.hidden_size + vision.intermediate_size) * element * VISION_BUFFERS
    workspace = vision_batch * vision_tokens * per_vision_token
    return MemoryCosts(tile_bytes=int(tokens_per_tile * per_token),
                       image_bytes=int((text_tokens + max_new_tokens) * per_token),
                       vision_workspace_bytes=int(workspace))


def missing_device(device: str | torch.device) -> str | None:
    """Why `device` cannot be used on this node (a CUDA device with no GPU, no driver, a CPU-only torch, or an
    index beyond its GPUs), or None; asked before loading, instead of torch's error from inside the model load."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        return f"this node ({platform.node()}) has no CUDA device (torch {torch.__version__})"
    if device.index is not None and device.index >= count:
        return f"this node ({platform.node()}) has {count} CUDA devices, cuda:0 to cuda:{count - 1}"
    return None


class _PollDuringGeneration(StoppingCriteria):
    """Runs a callback after every decoding step; the callback raises to abandon the batch."""

    def __init__(self, poll: Callable[[], None]) -> None:
        self.poll = poll

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        self.poll()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class TransformersEngine(Engine):
    """InternVL-Chat-V1.5 on transformers' native classes: a loaded model and tokenizer that turn lists of uint8
    tile tensors into captions."""

    def __init__(self, model: InternVLForConditionalGeneration, tokenizer: InternLM2Tokenizer, *,
                 system_message: str, system_message_source: str, question: str = CAPTION_QUESTION,
                 settings: GenerationSettings | None = None, num_image_token: int = 256,
                 vision_batch: int | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.system_message = system_message
        self.system_message_source = system_message_source  # for the stamp and the log
        self.question = question
        self.settings = settings or GenerationSettings()
        self.num_image_token = num_image_token
        self.vision_batch = vision_batch
        self.stop_id = tokenizer.token_to_id(STOP_TOKEN)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype

    @classmethod
    def from_folder(cls, path: str | Path, *, dtype: torch.dtype | str = torch.bfloat16, device: str = "cpu",
                    question: str = CAPTION_QUESTION, system_message: str | None = None,
                    settings: GenerationSettings | None = None,
                    attn_implementation: str = "sdpa", vision_batch: int | None = None) -> TransformersEngine:
        """Load a model folder; `system_message` (prompt.system_message) overrides what the original takes
        from the folder (config.json's, else its conversation.py's)."""
        if why := missing_device(device):
            raise VlmHpcError(f"device {device}: {why}; run on a GPU node or use the CPU (model.device=cpu, "
                              "caption --device cpu)")
        folder = inspect_model_folder(path)
        model = load_model(folder, dtype=dtype, device=device, attn_implementation=attn_implementation)
        source = "prompt.system_message" if system_message else folder.system_message_source
        return cls(model, load_tokenizer(path), system_message=system_message or folder.system_message,
                   system_message_source=source,
                   question=question, settings=settings, num_image_token=folder.num_image_token,
                   vision_batch=vision_batch)

    @classmethod
    def check_device(cls, config: RunConfig) -> None:
        """model.device cuda on a node without CUDA is one line (auto falls back to the CPU)."""
        if config.model.device != "auto" and (why := missing_device(config.model.device)):
            raise VlmHpcError(f"model.device is {config.model.device}, but {why}; run on a GPU node, or set "
                              "model.device=auto (the GPU where there is one) or model.device=cpu")

    @classmethod
    def from_config(cls, config: RunConfig) -> TransformersEngine:
        """Load the model the config names, on the GPU when there is one (float32 on the CPU, whatever
        model.dtype says)."""
        device = config.model.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = config.model.dtype if device != "cpu" else "float32"
        return cls.from_folder(config.model.path, dtype=dtype, device=device, question=config.prompt.question,
                               system_message=config.prompt.system_message, settings=config.generation.settings(),
                               attn_implementation=config.model.attn_implementation,
                               vision_batch=config.generation.vision_batch)

    def prompt(self, num_tiles: int) -> str:
        """The exact prompt string for an image of `num_tiles` tiles."""
        return build_prompt(self.question, num_tiles, self.system_message, self.num_image_token)

    @torch.inference_mode()
    def caption(self, tiles: list[torch.Tensor], settings: GenerationSettings | None = None,
                poll: Callable[[], None] | None = None) -> list[Caption]:
        """Caption a batch of images, each given as uint8 tiles [n_i, 3, 448, 448]; `poll` runs after every
        decoding step and may raise to abandon the batch. CUDA's out-of-memory error empties the allocator's
        cache and is raised as EngineOutOfMemory."""
        if not tiles:
            return []
        settings = settings or self.settings
        batch = self.tokenizer.encode_batch([self.prompt(t.shape[0]) for t in tiles])
        if settings.do_sample:
            torch.manual_seed(settings.seed)
        try:
            new_tokens = generate_new_tokens(
                self.model, torch.tensor(batch.input_ids, dtype=torch.long), torch.tensor(batch.attention_mask),
                torch.cat([t.to(self.device, non_blocking=True) for t in tiles]),  # from pinned memory: async
                generation_config(settings, self.stop_id, self.tokenizer.pad_id, self.tokenizer.bos_id),
                vision_batch=self.vision_batch,
                stopping_criteria=StoppingCriteriaList([_PollDuringGeneration(poll)]) if poll else None,
            )
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()  # what the failed batch held goes back, for the smaller retry
            raise EngineOutOfMemory(str(exc).splitlines()[0] if str(exc) else "CUDA out of memory") from None
        return [self._finish(row) for row in new_tokens.tolist()]

    def memory_costs(self) -> MemoryCosts:
        """What a batch costs in accelerator memory beyond the weights (see `memory_costs`)."""
        text_tokens = len(self.tokenizer.encode(self.prompt(1))) - self.num_image_token
        return memory_costs(self.model, self.num_image_token, text_tokens, self.settings.max_new_tokens,
                            self.vision_batch or 64)

    def free_memory(self) -> int | None:
        """Free bytes on the model's accelerator, None on the CPU."""
        return torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else None

    @property
    def pins_tiles(self) -> bool:
        """Tiles bound for a CUDA device come in page-locked memory, so the copy in `caption` is asynchronous."""
        return self.device.type == "cuda"

    def describe(self) -> dict[str, str]:
        """Device, dtype, the torch and transformers versions and the system message with its source, for the
        stamp."""
        return {"device": str(self.device), "dtype": str(self.dtype), "transformers": transformers.__version__,
                "torch": torch.__version__, "system_message": self.system_message,
                "system_message_source": self.system_message_source}

    def _finish(self, row: list[int]) -> Caption:
        stopped = self.stop_id in row
        ids = row[: row.index(self.stop_id) + 1] if stopped else row
        return Caption(text=self.tokenizer.decode(ids), token_ids=ids, stopped=stopped)
