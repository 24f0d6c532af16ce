"""The original checkpoint on transformers' native classes: logits, strict loading, refusals, conversion."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from golden import GOLDEN
from vlm_hpc.convert import convert_folder
from vlm_hpc.errors import VlmHpcError
from vlm_hpc.internvl.loading import inspect_model_folder, load_model
from vlm_hpc.tiny_model import original_config, original_tensor_shapes, write_tiny_model

INPUTS = load_file(GOLDEN / "logits" / "inputs.safetensors")
REFERENCE = load_file(GOLDEN / "logits" / "reference_outputs.safetensors")
PACKAGE = Path(__file__).parent.parent / "vlm_hpc"


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def model(request, golden_model_dir: Path):
    return load_model(golden_model_dir, dtype=torch.float32, device="cpu", attn_implementation=request.param)


def test_logits_match_the_original_at_every_unpadded_position(model) -> None:
    pixel_values = INPUTS["pixel_values"].float()
    with torch.no_grad():
        vision = model.model.vision_tower(pixel_values=pixel_values).last_hidden_state
        features = model.model.get_image_features(pixel_values=pixel_values, vision_feature_layer=-1,
                                                  vision_feature_select_strategy="default").pooler_output
        logits = model(input_ids=INPUTS["input_ids"], attention_mask=INPUTS["attention_mask"],
                       position_ids=INPUTS["position_ids"], pixel_values=pixel_values).logits
    mask = INPUTS["attention_mask"].bool()
    assert (vision - REFERENCE["vision_last_hidden_state"]).abs().max() < 1e-4
    assert (features - REFERENCE["vit_embeds"]).abs().max() < 1e-4
    assert (logits[mask] - REFERENCE["logits"][mask]).abs().max() < 1e-4


def test_greedy_generation_matches_the_original(model) -> None:
    with torch.no_grad():
        output = model.generate(input_ids=INPUTS["input_ids"], attention_mask=INPUTS["attention_mask"],
                                pixel_values=INPUTS["pixel_values"].float(), max_new_tokens=8, do_sample=False,
                                eos_token_id=502, pad_token_id=2)
    new_tokens = output[:, INPUTS["input_ids"].shape[1]:]
    assert torch.equal(new_tokens, REFERENCE["generated_ids"][:, 1:])  # 4.37 put <s> in front


def test_lm_head_is_not_tied(model) -> None:
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert not torch.equal(model.lm_head.weight, model.get_input_embeddings().weight)


def test_rope_buffers_are_recomputed_not_garbage(model) -> None:
    rotary = model.model.language_model.rotary_emb
    assert rotary.inv_freq.dtype == torch.float32
    assert rotary.inv_freq[0].item() == 1.0 and torch.all(rotary.inv_freq > 0)


def copy_folder(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(("changes", "message"), [
    ({"ps_version": "v1"}, "ps_version"),
    ({"template": "Hermes-2"}, "template"),
    ({"model_type": "llava"}, "model_type"),
    ({"select_layer": -4}, "select_layer"),
])
def test_unsupported_checkpoints_are_refused(changes: dict, message: str, golden_model_dir: Path,
                                             tmp_path: Path) -> None:
    folder = copy_folder(golden_model_dir, tmp_path / "m")
    edit_config(folder, **changes)
    with pytest.raises(VlmHpcError, match=message):
        load_model(folder, dtype=torch.float32)


def test_missing_and_unexpected_tensors_are_named(golden_model_dir: Path, tmp_path: Path) -> None:
    folder = copy_folder(golden_model_dir, tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    del tensors["language_model.model.norm.weight"]
    tensors["vision_model.extra.weight"] = torch.zeros(1)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(VlmHpcError, match="vision_model.extra.weight"):
        load_model(folder, dtype=torch.float32)
    del tensors["vision_model.extra.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(VlmHpcError, match=r"missing \['model.language_model.norm.weight'\]"):
        load_model(folder, dtype=torch.float32)


def test_missing_files_give_one_clear_line(golden_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(VlmHpcError, match="is not a folder"):
        load_model(tmp_path / "nowhere")
    folder = copy_folder(golden_model_dir, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(VlmHpcError, match="no \\*.safetensors weights"):
        load_model(folder)
    (folder / "config.json").unlink()
    with pytest.raises(VlmHpcError, match="config.json is missing"):
        load_model(folder)


def test_system_message_comes_from_config_json(golden_model_dir: Path, tmp_path: Path) -> None:
    assert inspect_model_folder(golden_model_dir).system_message.startswith("你是由上海人工智能实验室")
    folder = copy_folder(golden_model_dir, tmp_path / "m")
    edit_config(folder, system_message="Be terse.")
    assert inspect_model_folder(folder).system_message == "Be terse."


def test_native_copy_loads_to_the_same_weights(golden_model_dir: Path, tmp_path: Path) -> None:
    native = convert_folder(golden_model_dir, tmp_path / "native")
    assert json.loads((native / "config.json").read_text())["model_type"] == "internvl"
    original = load_model(golden_model_dir, dtype=torch.float32).state_dict()
    converted = load_model(native, dtype=torch.float32).state_dict()
    assert original.keys() == converted.keys()
    assert all(torch.equal(original[key], converted[key]) for key in original)
    assert inspect_model_folder(native).system_message == inspect_model_folder(golden_model_dir).system_message
    with pytest.raises(VlmHpcError, match="already in native layout"):
        convert_folder(native, tmp_path / "again")


def test_tiny_model_layout_is_the_golden_checkpoints_layout(tmp_path: Path) -> None:
    golden = load_file(GOLDEN / "model" / "model.safetensors")
    golden_shapes = {key: tuple(value.shape) for key, value in golden.items()}
    assert original_tensor_shapes(json.loads((GOLDEN / "model" / "config.json").read_text())) == golden_shapes
    folder = write_tiny_model(tmp_path / "tiny")
    assert load_model(folder, dtype=torch.float32) is not None
    assert json.loads((folder / "config.json").read_text()) == original_config()


def test_no_code_path_trusts_remote_code() -> None:
    pattern = re.compile(r"trust_remote_code\s*=\s*True|auto_map|exec\(|importlib\.import_module")
    offenders = [path.name for path in PACKAGE.rglob("*.py") if pattern.search(path.read_text())]
    assert offenders == []
