"""Captions for batches of tiled images: prompt, tokenize, normalize on the device, generate, decode.

Reproduces `batch_chat`: left-padded prompts, generation stopping on `<|im_end|>` only, finished rows padded
with the pad id, responses decoded with skip_special_tokens, cut at a literal `<|im_end|>` and stripped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, InternVLForConditionalGeneration, StoppingCriteria, StoppingCriteriaList

from vlm_hpc.model import inspect_model_folder, load_model
from vlm_hpc.prompt import CAPTION_QUESTION, STOP_TOKEN, build_prompt
from vlm_hpc.tiling import normalize
from vlm_hpc.tokenizer import InternLM2Tokenizer, load_tokenizer

# The original's generation config comes from the InternLM2 config, whose top_k is transformers' default 50.
ORIGINAL_TOP_K = 50


@dataclass(frozen=True)
class GenerationSettings:
    """How captions are sampled; the defaults are the seed's (ROVI) settings."""

    do_sample: bool = True
    temperature: float = 0.6
    top_p: float = 0.7
    max_new_tokens: int = 168
    num_beams: int = 1
    seed: int = 0

    def generation_config(self, stop_id: int, pad_id: int, bos_id: int) -> GenerationConfig:
        sampling = {"temperature": self.temperature, "top_p": self.top_p, "top_k": ORIGINAL_TOP_K} if self.do_sample else {}
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens, do_sample=self.do_sample, num_beams=self.num_beams,
            eos_token_id=stop_id, pad_token_id=pad_id, bos_token_id=bos_id, **sampling,
        )


@dataclass(frozen=True)
class Caption:
    """One generated caption: the text and the generated ids up to and including the stop token."""

    text: str
    token_ids: list[int]
    stopped: bool  # False when it ran into max_new_tokens


class _PollDuringGeneration(StoppingCriteria):
    """Runs a callback after every decoding step; the callback raises to abandon the batch."""

    def __init__(self, poll: Callable[[], None]) -> None:
        self.poll = poll

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        self.poll()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class CaptionEngine:
    """A loaded model and tokenizer that turn lists of uint8 tile tensors into captions."""

    def __init__(self, model: InternVLForConditionalGeneration, tokenizer: InternLM2Tokenizer, *,
                 system_message: str, question: str = CAPTION_QUESTION,
                 settings: GenerationSettings = GenerationSettings(), num_image_token: int = 256) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.system_message = system_message
        self.question = question
        self.settings = settings
        self.num_image_token = num_image_token
        self.stop_id = tokenizer.token_to_id(STOP_TOKEN)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype

    @classmethod
    def from_folder(cls, path: str | Path, *, dtype: torch.dtype | str = torch.bfloat16, device: str = "cpu",
                    question: str = CAPTION_QUESTION, system_message: str | None = None,
                    settings: GenerationSettings = GenerationSettings(),
                    attn_implementation: str = "sdpa") -> CaptionEngine:
        """Load a model folder; the system message defaults to what the original takes from config.json."""
        folder = inspect_model_folder(path)
        model = load_model(folder, dtype=dtype, device=device, attn_implementation=attn_implementation)
        return cls(model, load_tokenizer(path), system_message=system_message or folder.system_message,
                   question=question, settings=settings, num_image_token=folder.num_image_token)

    def prompt(self, num_tiles: int) -> str:
        """The exact prompt string for an image of `num_tiles` tiles."""
        return build_prompt(self.question, num_tiles, self.system_message, self.num_image_token)

    @torch.inference_mode()
    def caption(self, tiles: list[torch.Tensor], settings: GenerationSettings | None = None,
                poll: Callable[[], None] | None = None) -> list[Caption]:
        """Caption a batch of images, each given as uint8 tiles [n_i, 3, 448, 448]; `poll` runs after every
        decoding step and may raise to abandon the batch."""
        if not tiles:
            return []
        settings = settings or self.settings
        batch = self.tokenizer.encode_batch([self.prompt(t.shape[0]) for t in tiles])
        input_ids = torch.tensor(batch.input_ids, dtype=torch.long, device=self.device)
        attention_mask = torch.tensor(batch.attention_mask, dtype=torch.long, device=self.device)
        uint8 = torch.cat(tiles).to(self.device, non_blocking=True)
        pixel_values = normalize(uint8, dtype=self.dtype)
        if settings.do_sample:
            torch.manual_seed(settings.seed)
        output = self.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
            generation_config=settings.generation_config(self.stop_id, self.tokenizer.pad_id, self.tokenizer.bos_id),
            stopping_criteria=StoppingCriteriaList([_PollDuringGeneration(poll)]) if poll else None,
        )
        new_tokens = output[:, input_ids.shape[1]:].tolist()
        return [self._finish(row) for row in new_tokens]

    def _finish(self, row: list[int]) -> Caption:
        stopped = self.stop_id in row
        ids = row[: row.index(self.stop_id) + 1] if stopped else row
        return Caption(text=self.tokenizer.decode(ids), token_ids=ids, stopped=stopped)
