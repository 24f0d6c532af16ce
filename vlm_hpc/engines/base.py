"""What the slice run needs of an engine, and the plain types it exchanges with one; free of torch and transformers.

An engine turns lists of uint8 tile tensors into captions. One module per implementation, named in
`vlm_hpc.engines.ENGINES` (config key `model.engine`); the slice run sees only `Engine`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: importing this module must not import torch or the config
    import torch

    from vlm_hpc.config import RunConfig


# Field metadata read by the config validator (vlm_hpc.config.bounded): the range each setting must be in.
_POSITIVE = {"above": 0}


@dataclass
class GenerationSettings:
    """How captions are sampled; the defaults are the seed's (ROVI) settings, here and nowhere else.

    Not frozen: the config's `generation` section extends it with the worker's batching keys and is set key by
    key as a config file is read. Engines treat it as a value (`dataclasses.replace`, never assignment).
    """

    do_sample: bool = True
    temperature: float = field(default=0.6, metadata={"above": 0, "when": "do_sample"})  # unused when greedy
    top_p: float = field(default=0.7, metadata={"above": 0, "at_most": 1})
    max_new_tokens: int = field(default=168, metadata=_POSITIVE)
    num_beams: int = field(default=1, metadata=_POSITIVE)
    seed: int = 0


@dataclass(frozen=True)
class Caption:
    """One generated caption: the text and the generated ids up to and including the stop token."""

    text: str
    token_ids: list[int]
    stopped: bool  # False when it ran into max_new_tokens


@dataclass(frozen=True)
class MemoryCosts:
    """Accelerator bytes a batch needs beyond the weights, per tile and per image (KV cache plus prefill
    activations), and for one vision micro-batch."""

    tile_bytes: int
    image_bytes: int
    vision_workspace_bytes: int


class EngineOutOfMemory(Exception):
    """The accelerator ran out of memory on a batch; the engine has freed what it could and the caller may retry
    smaller. Never shown to users: the slice run splits the batch, then retiles, then records the row."""


class Engine(ABC):
    """A loaded model that captions batches of tiled images."""

    @classmethod
    def check_device(cls, config: RunConfig) -> None:
        """Refuse, with one VlmHpcError line, a device the config asks for that this node does not have; run
        before a slice's lease is taken and before any weights load."""
        return None  # an engine without a device of its own has nothing to check

    @classmethod
    @abstractmethod
    def from_config(cls, config: RunConfig) -> Engine:
        """Load the engine the run's config describes (model, prompt, generation settings, device)."""

    @abstractmethod
    def caption(self, tiles: list[torch.Tensor], settings: GenerationSettings | None = None,
                poll: Callable[[], None] | None = None) -> list[Caption]:
        """Caption a batch of images, each given as uint8 tiles [n_i, 3, 448, 448], in order. `poll` runs
        between decoding steps and may raise to abandon the batch; running out of accelerator memory raises
        EngineOutOfMemory."""

    @abstractmethod
    def prompt(self, num_tiles: int) -> str:
        """The exact prompt text for an image of `num_tiles` tiles (its hash goes into the stamp)."""

    @abstractmethod
    def describe(self) -> dict[str, str]:
        """What the reproducibility stamp records about this engine: device, dtype, library versions, the
        resolved system message and its source (system_message_source), each as text."""

    def memory_costs(self) -> MemoryCosts | None:
        """What a batch costs in accelerator memory; None where memory does not limit a batch."""
        return None

    def free_memory(self) -> int | None:
        """Free bytes on the engine's accelerator; None where there is none (batches are not sized to it)."""
        return None

    @property
    def pins_tiles(self) -> bool:
        """Whether tiles should arrive in page-locked memory (for asynchronous copies to an accelerator)."""
        return False
