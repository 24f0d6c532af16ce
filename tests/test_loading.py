"""The original checkpoint on transformers' native classes: logits, strict loading, refusals, conversion."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from builders import V15_LINE, write_conversation
from golden import GOLDEN
from vlm_hpc.convert import convert_folder
from vlm_hpc.errors import VlmHpcError
from vlm_hpc.internvl.loading import inspect_model_folder, load_model
from vlm_hpc.internvl.prompt import DEFAULT_SYSTEM_MESSAGE, V15_ENGLISH_SYSTEM_MESSAGE
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


TEMPLATE_SOURCE = "conversation.py (internlm2-chat)"
# The two texts the template had: the V1.5-era English one, and the later Chinese one with the commented-out
# alternative above it (written as a parenthesised implicit concatenation, as some copies do).
HISTORICAL = {
    "v15_english": (V15_LINE, V15_ENGLISH_SYSTEM_MESSAGE),
    "later_chinese": ("# system_message='我是书生·万象，英文名是InternVL。',\n"
                      "        system_message=(\n"
                      "            '你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，'\n"
                      "            '英文名叫InternVL, 是一个有用无害的人工智能助手。'\n        ),",
                      DEFAULT_SYSTEM_MESSAGE),
}


def test_system_message_without_conversation_py_is_config_json_s_else_the_default(golden_model_dir: Path,
                                                                                  tmp_path: Path) -> None:
    folder = inspect_model_folder(golden_model_dir)
    assert (folder.system_message, folder.system_message_source) == (DEFAULT_SYSTEM_MESSAGE, "default")
    copy = copy_folder(golden_model_dir, tmp_path / "m")
    edit_config(copy, system_message="Be terse.")
    assert (inspect_model_folder(copy).system_message, inspect_model_folder(copy).system_message_source) == (
        "Be terse.", "config.json")


@pytest.mark.parametrize("vintage", HISTORICAL)
def test_system_message_comes_from_the_folder_s_conversation_py(vintage: str, golden_model_dir: Path,
                                                               tmp_path: Path) -> None:
    folder = copy_folder(golden_model_dir, tmp_path / "m")
    line, expected = HISTORICAL[vintage]
    write_conversation(folder, line)
    inspected = inspect_model_folder(folder)
    assert (inspected.system_message, inspected.system_message_source) == (expected, TEMPLATE_SOURCE)


@pytest.mark.parametrize(("config_message", "expected", "source"), [
    ("Be terse.", "Be terse.", "config.json"),
    ("", "", "config.json"),  # the original tests hasattr(config, 'system_message'): an empty one still counts
])
def test_config_json_s_system_message_wins_over_the_template(config_message: str, expected: str, source: str,
                                                             golden_model_dir: Path, tmp_path: Path) -> None:
    folder = copy_folder(golden_model_dir, tmp_path / "m")
    write_conversation(folder)
    edit_config(folder, system_message=config_message)
    inspected = inspect_model_folder(folder)
    assert (inspected.system_message, inspected.system_message_source) == (expected, source)


def test_prompt_system_message_overrides_all_and_the_engine_says_so(golden_model_dir: Path, tmp_path: Path) -> None:
    from vlm_hpc.engines.transformers import TransformersEngine
    folder = copy_folder(golden_model_dir, tmp_path / "m")
    write_conversation(folder)
    edit_config(folder, system_message="From config.json.")
    engine = TransformersEngine.from_folder(folder, dtype=torch.float32, system_message="From the run's config.")
    described = engine.describe()
    assert (described["system_message"], described["system_message_source"]) == (
        "From the run's config.", "prompt.system_message")
    assert engine.prompt(1).startswith("<|im_start|>system\nFrom the run's config.<|im_end|>")
    engine = TransformersEngine.from_folder(folder, dtype=torch.float32)
    assert engine.describe()["system_message_source"] == "config.json"
    assert engine.prompt(1).startswith("<|im_start|>system\nFrom config.json.<|im_end|>")


def test_conversation_py_is_parsed_never_run(golden_model_dir: Path, tmp_path: Path) -> None:
    folder = copy_folder(golden_model_dir, tmp_path / "m")
    marker = tmp_path / "ran.txt"
    write_conversation(folder, before=f"open({str(marker)!r}, 'w').write('ran')\nimport vlm_hpc_no_such_module\n",
                       after="raise SystemExit('conversation.py was executed')\n")
    inspected = inspect_model_folder(folder)
    assert inspected.system_message == V15_ENGLISH_SYSTEM_MESSAGE
    assert not marker.exists() and "conversation" not in sys.modules


def test_a_template_bound_to_a_name_and_re_registered_with_override(golden_model_dir: Path, tmp_path: Path) -> None:
    folder = copy_folder(golden_model_dir, tmp_path / "m")
    later = ("internlm2_chat = Conversation(name='internlm2-chat', system_template='<|im_start|>system\\n"
             "{system_message}', system_message='Second.', roles=('<|im_start|>user\\n', "
             "'<|im_start|>assistant\\n'), sep_style=SeparatorStyle.MPT, sep='<|im_end|>')\n"
             "register_conv_template(internlm2_chat, override=True)\n")
    write_conversation(folder, after=later)
    assert inspect_model_folder(folder).system_message == "Second."  # the registry keeps the last one
    write_conversation(folder, after=later.replace(", override=True", ""))
    with pytest.raises(VlmHpcError, match=r"registers 'internlm2-chat' twice \(lines \d+ and \d+\)"):
        inspect_model_folder(folder)


@pytest.mark.parametrize(("message_line", "after", "error"), [
    ("system_message=f'You are {NAME}.',", "", r"line \d+: the template's system_message is not a literal"),
    ("system_message=PREFIX + 'InternLM.',", "", r"the template's system_message is not a literal"),
    ("system_message=42,", "", r"system_message is int, not text"),
    ("system_message='Hi.', system_template='{system_message}',", "",
     r"system_template is '\{system_message\}', vlm_hpc builds prompts with '<\|im_start\|>system"),
    ("system_message='Hi.',", "\ndef broken(:\n", r"conversation.py line \d+ is not valid Python"),
])
def test_unreadable_templates_are_one_clear_line(message_line: str, after: str, error: str,
                                                 golden_model_dir: Path, tmp_path: Path) -> None:
    folder = copy_folder(golden_model_dir, tmp_path / "m")
    write_conversation(folder, message_line, after=after)
    if "system_template=" in message_line:  # the line replaces the template's own system_template
        path = folder / "conversation.py"
        path.write_text(path.read_text().replace("        system_template='<|im_start|>system\\n{system_message}',\n",
                                                 "", 1))
    with pytest.raises(VlmHpcError, match=error) as refusal:
        inspect_model_folder(folder)
    assert "\n" not in str(refusal.value) and str(folder / "conversation.py") in str(refusal.value)


def test_a_conversation_py_without_the_template_is_refused(golden_model_dir: Path, tmp_path: Path) -> None:
    folder = copy_folder(golden_model_dir, tmp_path / "m")
    path = write_conversation(folder)
    path.write_text(path.read_text().replace("name='internlm2-chat'", "name='Hermes-2'"))
    edit_config(folder, system_message="Even with config.json's message.")
    with pytest.raises(VlmHpcError, match="registers no 'internlm2-chat' template"):
        inspect_model_folder(folder)


def test_native_copy_loads_to_the_same_weights(golden_model_dir: Path, tmp_path: Path) -> None:
    native = convert_folder(golden_model_dir, tmp_path / "native")
    assert json.loads((native / "config.json").read_text())["model_type"] == "internvl"
    original = load_model(golden_model_dir, dtype=torch.float32).state_dict()
    converted = load_model(native, dtype=torch.float32).state_dict()
    assert original.keys() == converted.keys()
    assert all(torch.equal(original[key], converted[key]) for key in original)
    assert inspect_model_folder(native).system_message == inspect_model_folder(golden_model_dir).system_message
    assert inspect_model_folder(native).system_message_source == "vlm_hpc.json (default)"
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
