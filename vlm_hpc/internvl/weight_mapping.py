"""From InternVL-Chat-V1.5's original (remote-code) checkpoint to transformers' native classes: pure functions.

`native_config` translates the original config.json into an `InternVLConfig` with a Llama text model;
`map_tensor` renames one checkpoint tensor and splits the fused ones (the vision `qkv`, InternLM2's grouped
`wqkv`). Both refuse what the native classes cannot express exactly.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import InternVLConfig, InternVLVisionConfig, LlamaConfig

from vlm_hpc.errors import VlmHpcError
from vlm_hpc.internvl.prompt import TEMPLATE_NAME


@dataclass(frozen=True)
class SplitShapes:
    """Sizes the fused-tensor splits need, taken from the original config."""

    vision_hidden: int
    llm_heads: int
    llm_kv_heads: int
    llm_head_dim: int

    @classmethod
    def from_original(cls, original: dict) -> SplitShapes:
        llm = original["llm_config"]
        heads = int(llm["num_attention_heads"])
        return cls(
            vision_hidden=int(original["vision_config"]["hidden_size"]),
            llm_heads=heads,
            llm_kv_heads=int(llm.get("num_key_value_heads") or heads),
            llm_head_dim=int(llm["hidden_size"]) // heads,
        )


def num_image_token(original: dict) -> int:
    """Tokens per tile: (image_size / patch_size)^2 * downsample_ratio^2 (256 for V1.5)."""
    vision = original["vision_config"]
    image_size = int(original.get("force_image_size") or vision["image_size"])
    return int((image_size // int(vision["patch_size"])) ** 2 * float(original["downsample_ratio"]) ** 2)


def check_supported(original: dict, where: str) -> None:
    """Refuse checkpoints whose behaviour the native classes cannot reproduce, naming the setting."""
    def refuse(what: str) -> None:
        raise VlmHpcError(f"{where}: {what}; vlm_hpc reproduces InternVL-Chat-V1.5 (InternViT + InternLM2) only")

    if original.get("model_type") != "internvl_chat":
        refuse(f"model_type is {original.get('model_type')!r}, not 'internvl_chat'")
    llm = original.get("llm_config") or {}
    vision = original.get("vision_config") or {}
    if "InternLM2ForCausalLM" not in (llm.get("architectures") or []):
        refuse(f"the language model is {llm.get('architectures')}, not InternLM2ForCausalLM")
    if original.get("template") != TEMPLATE_NAME:
        refuse(f"template is {original.get('template')!r}, not {TEMPLATE_NAME!r}")
    if original.get("ps_version", "v1") != "v2":
        refuse(f"ps_version is {original.get('ps_version', 'v1 (missing)')!r}; only 'v2' pixel shuffle exists natively")
    if vision.get("norm_type", "rms_norm") not in ("rms_norm", "layer_norm"):
        refuse(f"vision norm_type is {vision.get('norm_type')!r}")
    if vision.get("qk_normalization") and float(vision.get("layer_norm_eps", 1e-6)) != 1e-6:
        refuse("vision qk-norm eps differs from 1e-6 (the native q/k norm hard-codes 1e-6)")
    if int(original.get("select_layer", -1)) != -1:
        refuse(f"select_layer is {original.get('select_layer')}, only -1 is supported")
    if original.get("use_backbone_lora") or original.get("use_llm_lora"):
        refuse("the checkpoint has unmerged LoRA adapters")
    if not original.get("use_thumbnail", True):
        refuse("use_thumbnail is false")
    if bool(llm.get("bias", False)):
        refuse("the InternLM2 layers have biases")
    scaling = llm.get("rope_scaling")
    if scaling and scaling.get("type") not in ("dynamic", "linear"):
        refuse(f"rope_scaling type {scaling.get('type')!r} is unknown")


def native_config(original: dict, image_token_id: int) -> InternVLConfig:
    """Translate an original InternVL-Chat-V1.5 config.json (dict) into the native InternVLConfig."""
    vision = original["vision_config"]
    llm = original["llm_config"]
    image_size = int(original.get("force_image_size") or vision["image_size"])
    vision_config = InternVLVisionConfig(
        hidden_size=vision["hidden_size"], num_hidden_layers=vision["num_hidden_layers"],
        num_attention_heads=vision["num_attention_heads"], intermediate_size=vision["intermediate_size"],
        hidden_act=vision.get("hidden_act", "gelu"), layer_norm_eps=vision.get("layer_norm_eps", 1e-6),
        norm_type=vision.get("norm_type", "rms_norm"), use_qk_norm=bool(vision.get("qk_normalization", False)),
        attention_bias=bool(vision.get("qkv_bias", False)), image_size=image_size, patch_size=vision["patch_size"],
        num_channels=vision.get("num_channels", 3),
        # The original has no final norm and no mask token; dropouts are inference no-ops anyway.
        use_mean_pooling=True, use_mask_token=False, use_absolute_position_embeddings=True,
        hidden_dropout_prob=0.0, attention_dropout=0.0, projection_dropout=0.0,
    )
    rope: dict = {"rope_type": "default", "rope_theta": float(llm.get("rope_theta", 10000))}
    if llm.get("rope_scaling"):
        rope = {"rope_type": llm["rope_scaling"]["type"], "factor": float(llm["rope_scaling"]["factor"]),
                "rope_theta": rope["rope_theta"]}
    text_config = LlamaConfig(
        vocab_size=llm["vocab_size"], hidden_size=llm["hidden_size"], intermediate_size=llm["intermediate_size"],
        num_hidden_layers=llm["num_hidden_layers"], num_attention_heads=llm["num_attention_heads"],
        num_key_value_heads=llm.get("num_key_value_heads") or llm["num_attention_heads"],
        max_position_embeddings=llm["max_position_embeddings"], rms_norm_eps=llm["rms_norm_eps"],
        hidden_act=llm.get("hidden_act", "silu"), rope_parameters=rope, attention_bias=False, mlp_bias=False,
        tie_word_embeddings=False, bos_token_id=llm.get("bos_token_id", 1), eos_token_id=llm.get("eos_token_id", 2),
        pad_token_id=llm.get("pad_token_id", 2),
    )
    return InternVLConfig(
        vision_config=vision_config.to_dict(), text_config=text_config.to_dict(), image_token_id=image_token_id,
        image_seq_length=num_image_token(original), downsample_ratio=float(original["downsample_ratio"]),
        projector_hidden_act="gelu", vision_feature_layer=-1, vision_feature_select_strategy="default",
        # InternVLConfig ties lm_head to the embeddings by default; V1.5's are separate tensors.
        tie_word_embeddings=False,
    )


def _split_vision_qkv(prefix: str, suffix: str, tensor: torch.Tensor, shapes: SplitShapes) -> list:
    q, k, v = tensor.split(shapes.vision_hidden, dim=0)
    return [(f"{prefix}.q_proj.{suffix}", q), (f"{prefix}.k_proj.{suffix}", k), (f"{prefix}.v_proj.{suffix}", v)]


def _split_llm_wqkv(prefix: str, tensor: torch.Tensor, shapes: SplitShapes) -> list:
    """InternLM2 interleaves rows per kv group: [kv, q_per_kv query heads + 1 key + 1 value, head_dim, hidden]."""
    groups = shapes.llm_kv_heads
    per_group = shapes.llm_heads // groups
    grouped = tensor.reshape(groups, per_group + 2, shapes.llm_head_dim, tensor.shape[-1])
    q = grouped[:, :per_group].reshape(shapes.llm_heads * shapes.llm_head_dim, -1)
    k = grouped[:, -2].reshape(groups * shapes.llm_head_dim, -1)
    v = grouped[:, -1].reshape(groups * shapes.llm_head_dim, -1)
    return [(f"{prefix}.q_proj.weight", q.contiguous()), (f"{prefix}.k_proj.weight", k.contiguous()),
            (f"{prefix}.v_proj.weight", v.contiguous())]


_VIT = "model.vision_tower"
_LLM = "model.language_model"
# (original key pattern, native key template or splitter). Patterns are anchored; \1, \2 are groups.
_RULES: list[tuple[str, str | Callable]] = [
    (r"vision_model\.embeddings\.class_embedding", f"{_VIT}.embeddings.cls_token"),
    (r"vision_model\.embeddings\.position_embedding", f"{_VIT}.embeddings.position_embeddings"),
    (r"vision_model\.embeddings\.patch_embedding\.(weight|bias)", _VIT + r".embeddings.patch_embeddings.projection.\1"),
    (r"vision_model\.encoder\.layers\.(\d+)\.norm1\.(weight|bias)", _VIT + r".encoder.layer.\1.layernorm_before.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.norm2\.(weight|bias)", _VIT + r".encoder.layer.\1.layernorm_after.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)",
     lambda m, t, s: _split_vision_qkv(f"{_VIT}.encoder.layer.{m[1]}.attention", m[2], t, s)),
    (r"vision_model\.encoder\.layers\.(\d+)\.attn\.(q_norm|k_norm)\.weight",
     _VIT + r".encoder.layer.\1.attention.\2.weight"),
    (r"vision_model\.encoder\.layers\.(\d+)\.attn\.proj\.(weight|bias)",
     _VIT + r".encoder.layer.\1.attention.projection_layer.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", _VIT + r".encoder.layer.\1.mlp.\2.\3"),
    (r"vision_model\.encoder\.layers\.(\d+)\.ls([12])", _VIT + r".encoder.layer.\1.lambda_\2"),
    (r"mlp1\.0\.(weight|bias)", r"model.multi_modal_projector.layer_norm.\1"),
    (r"mlp1\.1\.(weight|bias)", r"model.multi_modal_projector.linear_1.\1"),
    (r"mlp1\.3\.(weight|bias)", r"model.multi_modal_projector.linear_2.\1"),
    (r"language_model\.model\.tok_embeddings\.weight", f"{_LLM}.embed_tokens.weight"),
    (r"language_model\.model\.layers\.(\d+)\.attention\.wqkv\.weight",
     lambda m, t, s: _split_llm_wqkv(f"{_LLM}.layers.{m[1]}.self_attn", t, s)),
    (r"language_model\.model\.layers\.(\d+)\.attention\.wo\.weight", _LLM + r".layers.\1.self_attn.o_proj.weight"),
    (r"language_model\.model\.layers\.(\d+)\.feed_forward\.w1\.weight", _LLM + r".layers.\1.mlp.gate_proj.weight"),
    (r"language_model\.model\.layers\.(\d+)\.feed_forward\.w3\.weight", _LLM + r".layers.\1.mlp.up_proj.weight"),
    (r"language_model\.model\.layers\.(\d+)\.feed_forward\.w2\.weight", _LLM + r".layers.\1.mlp.down_proj.weight"),
    (r"language_model\.model\.layers\.(\d+)\.attention_norm\.weight", _LLM + r".layers.\1.input_layernorm.weight"),
    (r"language_model\.model\.layers\.(\d+)\.ffn_norm\.weight", _LLM + r".layers.\1.post_attention_layernorm.weight"),
    (r"language_model\.model\.norm\.weight", f"{_LLM}.norm.weight"),
    (r"language_model\.output\.weight", "lm_head.weight"),
]
_COMPILED = [(re.compile(pattern + r"\Z"), target) for pattern, target in _RULES]


def map_tensor(key: str, tensor: torch.Tensor, shapes: SplitShapes) -> list[tuple[str, torch.Tensor]]:
    """Native (name, tensor) pairs for one original checkpoint tensor; raises on a key no rule knows."""
    for pattern, target in _COMPILED:
        match = pattern.match(key)
        if match is None:
            continue
        if callable(target):
            return target(match, tensor, shapes)
        return [(match.expand(target), tensor)]
    raise VlmHpcError(f"checkpoint tensor {key!r} has no native counterpart; is this an unmodified "
                      "InternVL-Chat-V1.5 checkpoint?")
