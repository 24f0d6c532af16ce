"""`python -m vlm_hpc.tiny_model DIR`: write a tiny random InternVL-Chat-V1.5 folder in the ORIGINAL layout.

For the demo and the tests: the real loader (config translation, key mapping, qkv/wqkv splits) runs on it,
on any CPU, in well under a second, with no download. The tensor table below is the original checkpoint's
layout written down independently of `weight_mapping`, so loading it checks the mapping. Captions from
random weights are gibberish by design.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save_file

from vlm_hpc.internvl.prompt import TEMPLATE_NAME

VISION = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
          "image_size": 448, "patch_size": 14}
LLM = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
       "intermediate_size": 128, "vocab_size": 513}


def original_config() -> dict:
    """An original-format config.json (model_type internvl_chat) with V1.5's structure at tiny sizes."""
    return {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "template": TEMPLATE_NAME,
        "downsample_ratio": 0.5, "force_image_size": 448, "ps_version": "v2", "select_layer": -1,
        "dynamic_image_size": True, "use_thumbnail": True, "min_dynamic_patch": 1, "max_dynamic_patch": 12,
        "use_backbone_lora": 0, "use_llm_lora": 0, "torch_dtype": "float32",
        "vision_config": {**VISION, "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
                          "hidden_act": "gelu", "layer_norm_eps": 1e-6, "norm_type": "rms_norm",
                          "qk_normalization": True, "qkv_bias": False, "num_channels": 3, "use_flash_attn": False},
        "llm_config": {**LLM, "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
                       "hidden_act": "silu", "bias": False, "rms_norm_eps": 1e-5, "rope_theta": 1000000,
                       "rope_scaling": {"type": "dynamic", "factor": 2.0}, "max_position_embeddings": 32768,
                       "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "tie_word_embeddings": False,
                       "attn_implementation": "eager"},
    }


def original_tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of an original InternVL-Chat-V1.5 checkpoint, by original name, with its shape."""
    v, llm = config["vision_config"], config["llm_config"]
    c, vi = v["hidden_size"], v["intermediate_size"]
    patches = (v["image_size"] // v["patch_size"]) ** 2
    h, li, vocab = llm["hidden_size"], llm["intermediate_size"], llm["vocab_size"]
    head_dim = h // llm["num_attention_heads"]
    qkv_rows = (llm["num_attention_heads"] + 2 * llm["num_key_value_heads"]) * head_dim
    shuffled = c * int(1 / config["downsample_ratio"]) ** 2
    shapes: dict[str, tuple[int, ...]] = {
        "vision_model.embeddings.class_embedding": (1, 1, c),
        "vision_model.embeddings.position_embedding": (1, patches + 1, c),
        "vision_model.embeddings.patch_embedding.weight": (c, 3, v["patch_size"], v["patch_size"]),
        "vision_model.embeddings.patch_embedding.bias": (c,),
        "mlp1.0.weight": (shuffled,), "mlp1.0.bias": (shuffled,),
        "mlp1.1.weight": (h, shuffled), "mlp1.1.bias": (h,),
        "mlp1.3.weight": (h, h), "mlp1.3.bias": (h,),
        "language_model.model.tok_embeddings.weight": (vocab, h),
        "language_model.model.norm.weight": (h,),
        "language_model.output.weight": (vocab, h),
    }
    for i in range(v["num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{i}"
        shapes.update({
            f"{p}.norm1.weight": (c,), f"{p}.norm2.weight": (c,), f"{p}.ls1": (c,), f"{p}.ls2": (c,),
            f"{p}.attn.qkv.weight": (3 * c, c), f"{p}.attn.q_norm.weight": (c,), f"{p}.attn.k_norm.weight": (c,),
            f"{p}.attn.proj.weight": (c, c), f"{p}.attn.proj.bias": (c,),
            f"{p}.mlp.fc1.weight": (vi, c), f"{p}.mlp.fc1.bias": (vi,),
            f"{p}.mlp.fc2.weight": (c, vi), f"{p}.mlp.fc2.bias": (c,),
        })
    for i in range(llm["num_hidden_layers"]):
        p = f"language_model.model.layers.{i}"
        shapes.update({
            f"{p}.attention.wqkv.weight": (qkv_rows, h), f"{p}.attention.wo.weight": (h, h),
            f"{p}.feed_forward.w1.weight": (li, h), f"{p}.feed_forward.w3.weight": (li, h),
            f"{p}.feed_forward.w2.weight": (h, li),
            f"{p}.attention_norm.weight": (h,), f"{p}.ffn_norm.weight": (h,),
        })
    return shapes


def write_tiny_model(destination: str | Path, seed: int = 0) -> Path:
    """Write config.json, model.safetensors and the bundled tiny tokenizer into `destination`."""
    target = Path(destination)
    target.mkdir(parents=True, exist_ok=True)
    config = original_config()
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in original_tensor_shapes(config).items():
        is_scale = name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "mlp1.0.weight")) or ".ls" in name
        noise = torch.randn(shape, generator=generator)
        # Norm scales near 1 and small layer scales keep activations in range, like a trained model's.
        if is_scale and ".ls" not in name:
            tensors[name] = 1.0 + 0.1 * noise
        else:
            tensors[name] = noise * (0.1 if ".ls" in name else 0.05)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    (target / "config.json").write_text(json.dumps(config, indent=2))
    bundled = resources.files("vlm_hpc") / "assets" / "tiny_tokenizer"
    for item in bundled.iterdir():
        with resources.as_file(item) as path:
            shutil.copyfile(path, target / item.name)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlm_hpc.tiny_model", description=__doc__.splitlines()[0])
    parser.add_argument("destination", help="a new folder for the model")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (0)")
    args = parser.parse_args(argv)
    print(write_tiny_model(args.destination, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
