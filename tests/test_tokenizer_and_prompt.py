"""Tokenizer ids and decodes, and batch_chat's prompts, against the original InternLM2Tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from golden import GOLDEN, load_golden
from vlm_hpc.errors import VlmHpcError
from vlm_hpc.internvl.prompt import CAPTION_QUESTION, build_prompt
from vlm_hpc.internvl.tokenizer import load_tokenizer

TOKENS = load_golden("tokenizer_golden.json")
SYSTEM_MESSAGES = {name: item["text"] for name, item in TOKENS["system_messages"].items()}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(GOLDEN / "tokenizer")


def test_special_ids_come_from_the_folder(tokenizer) -> None:
    facts = TOKENS["facts"]
    for token, token_id in facts["special_ids"].items():
        assert tokenizer.token_to_id(token) == token_id
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (
        facts["bos_token_id"], facts["eos_token_id"], facts["pad_token_id"])
    assert len(tokenizer) == facts["len(tokenizer)"]
    assert tokenizer.special_ids == set(facts["all_special_ids"])


@pytest.mark.parametrize("case", TOKENS["strings"], ids=lambda c: repr(c["text"][:30]))
def test_encode_and_decode_match_the_original(case: dict, tokenizer) -> None:
    assert tokenizer.encode(case["text"]) == case["input_ids"]
    assert tokenizer.decode_tokens(case["input_ids"], skip_special_tokens=True) == case["decode_skip_special"]
    assert tokenizer.decode_tokens(case["input_ids"], skip_special_tokens=False) == case["decode_keep_special"]


@pytest.mark.parametrize("case", TOKENS["decode_cases"], ids=lambda c: c["name"])
def test_batch_chat_decode_cases(case: dict, tokenizer) -> None:
    assert tokenizer.decode_tokens(case["ids"]) == case["batch_decode_raw"]
    assert tokenizer.decode(case["ids"]) == case["response"]


def test_decode_batch_and_left_padding(tokenizer) -> None:
    decode_batch = TOKENS["decode_batch"]
    assert [tokenizer.decode(row) for row in decode_batch["rows"]] == decode_batch["responses"]
    padded = TOKENS["left_padded_batch"]
    batch = tokenizer.encode_batch(padded["texts"])
    assert batch.input_ids == padded["input_ids"]
    assert batch.attention_mask == padded["attention_mask"]


@pytest.mark.parametrize("record", TOKENS["batch_chat_prompts"],
                         ids=lambda r: f"{r['system_message']}-{r['question'][:12]}-{r['num_patches_list']}")
def test_batch_chat_prompts_and_ids(record: dict, tokenizer) -> None:
    question = CAPTION_QUESTION if record["question"] == "ROVI query" else record["question"]
    prompts = [build_prompt(question, n, SYSTEM_MESSAGES[record["system_message"]]) for n in record["num_patches_list"]]
    assert prompts == record["queries"]
    batch = tokenizer.encode_batch(prompts)
    assert batch.input_ids == record["input_ids"]
    assert batch.attention_mask == record["attention_mask"]
    assert record["generate_kwargs"]["eos_token_id"] == tokenizer.token_to_id("<|im_end|>")


def test_default_question_is_the_seeds_prompt() -> None:
    assert CAPTION_QUESTION == load_golden("e2e_golden.json")["question"]


def test_missing_tokenizer_file_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(VlmHpcError, match="tokenizer.model is missing"):
        load_tokenizer(tmp_path)


def test_foreign_tokenizer_is_refused(tmp_path: Path) -> None:
    for item in (GOLDEN / "tokenizer").iterdir():
        shutil.copyfile(item, tmp_path / item.name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "Qwen2Tokenizer"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(VlmHpcError, match="only InternLM2Tokenizer"):
        load_tokenizer(tmp_path)
    config["tokenizer_class"] = "InternLM2Tokenizer"
    config["added_tokens_decoder"] = {k: v for k, v in config["added_tokens_decoder"].items()
                                      if v["content"] != "<IMG_CONTEXT>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(VlmHpcError, match="does not define <IMG_CONTEXT>"):
        load_tokenizer(tmp_path)
