"""Tokenizer ids and decodes, and batch_chat's prompts, against the original InternLM2Tokenizer."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from golden import FIXTURES, GOLDEN, load_golden
from vlm_hpc.errors import VlmHpcError
from vlm_hpc.internvl.prompt import CAPTION_QUESTION, build_prompt
from vlm_hpc.internvl.tokenizer import load_tokenizer

TOKENS = load_golden("tokenizer_golden.json")
SYSTEM_MESSAGES = {name: item["text"] for name, item in TOKENS["system_messages"].items()}
# The real InternLM2 tokenizer.model in V1.5's layout, and the original algorithm's ids on sentencepiece 0.2.0
# (frozen by tests/fixtures/make_real_tokenizer_ids.py).
REAL = FIXTURES / "real_tokenizer"
REAL_IDS = json.loads((FIXTURES / "real_tokenizer_ids.json").read_text())
REPO = Path(__file__).parent.parent


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


@pytest.fixture(scope="module")
def real_tokenizer():
    return load_tokenizer(REAL)


def test_the_real_tokenizer_is_the_documented_file(real_tokenizer) -> None:
    digest = hashlib.sha256((REAL / "tokenizer.model").read_bytes()).hexdigest()
    assert digest == "f868398fc4e05ee1e8aeba95ddf18ddcc45b8bce55d5093bead5bbf80429b48b"
    assert len(real_tokenizer) == 92553 and real_tokenizer.sp.get_piece_size() == 92544
    ids = {token: real_tokenizer.token_to_id(token) for token in ("<|im_end|>", "<|im_start|>", "<img>", "</img>",
                                                                  "<IMG_CONTEXT>", "</box>")}
    assert ids == {"<|im_end|>": 92542, "<|im_start|>": 92543, "<img>": 92544, "</img>": 92545,
                   "<IMG_CONTEXT>": 92546, "</box>": 92552}
    assert (real_tokenizer.bos_id, real_tokenizer.eos_id, real_tokenizer.pad_id) == (1, 2, 2)
    assert real_tokenizer.encode("The quick brown fox jumps over the lazy dog.")[1:] == [
        918, 4131, 14018, 38648, 34256, 1053, 410, 15810, 5718, 281]
    assert REAL_IDS["sentencepiece"] == "0.2.0"  # the expected ids are the original's library's


def test_the_reference_that_froze_the_real_ids_reproduces_the_golden_set() -> None:
    """make_real_tokenizer_ids.py's reference gives what the original code gave on the golden tokenizer (which
    has no NUL piece, so any sentencepiece 0.2.x shows it)."""
    spec = importlib.util.spec_from_file_location("make_real_tokenizer_ids", FIXTURES / "make_real_tokenizer_ids.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    reference = generator.OriginalTokenizer(GOLDEN / "tokenizer")
    for case in TOKENS["strings"]:
        assert reference.encode(case["text"]) == case["input_ids"]
        assert reference.decode(case["input_ids"], True) == case["decode_skip_special"]
        assert reference.decode(case["input_ids"], False) == case["decode_keep_special"]
    assert [reference.decode(c["ids"], True) for c in TOKENS["decode_cases"]] == [
        c["batch_decode_raw"] for c in TOKENS["decode_cases"]]
    for record in TOKENS["batch_chat_prompts"]:
        for query, ids, mask in zip(record["queries"], record["input_ids"], record["attention_mask"]):
            assert reference.encode(query) == [i for i, keep in zip(ids, mask) if keep]
    # Its prompt builder is batch_chat's for the caption question (the only question it builds).
    rovi = [record for record in TOKENS["batch_chat_prompts"] if record["question"] == "ROVI query"]
    assert rovi and all(record["queries"][0] == generator.chat_prompt(
        SYSTEM_MESSAGES[record["system_message"]], CAPTION_QUESTION, record["num_patches_list"][0]) for record in rovi)


def expand(runs: list[list[int]]) -> list[int]:
    return [token_id for token_id, count in runs for _ in range(count)]


@pytest.mark.parametrize("record", REAL_IDS["prompts"], ids=lambda r: f"{r['system_message']}-{r['blocks']}-blocks")
def test_real_chat_prompts_have_the_original_ids(record: dict, real_tokenizer) -> None:
    prompt = build_prompt(CAPTION_QUESTION, record["blocks"], REAL_IDS["system_messages"][record["system_message"]])
    assert hashlib.sha256(prompt.encode()).hexdigest() == record["prompt_sha256"]
    ids = real_tokenizer.encode(prompt)
    assert ids == expand(record["input_ids_runs"])
    assert ids.count(real_tokenizer.token_to_id("<IMG_CONTEXT>")) == 256 * record["blocks"]
    assert real_tokenizer.decode_tokens(ids, skip_special_tokens=True) == record["decode_skip_special"]
    kept = real_tokenizer.decode_tokens(ids, skip_special_tokens=False)
    assert hashlib.sha256(kept.encode()).hexdigest() == record["decode_keep_special_sha256"]


@pytest.mark.parametrize("case", REAL_IDS["strings"], ids=lambda c: ascii(c["text"][:24]))
def test_real_tokenizer_matches_the_original_on_every_string(case: dict, real_tokenizer) -> None:
    assert real_tokenizer.encode(case["text"]) == case["input_ids"]
    assert real_tokenizer.decode_tokens(case["input_ids"], skip_special_tokens=True) == case["decode_skip_special"]
    assert real_tokenizer.decode_tokens(case["input_ids"], skip_special_tokens=False) == case["decode_keep_special"]


def test_nul_is_the_original_s_piece_on_any_sentencepiece(real_tokenizer) -> None:
    # sentencepiece >= 0.2.1 alone would give the byte-fallback piece <0x00> (3) where the original has 354.
    assert real_tokenizer.encode("a\x00b")[1:] == [264, 354, 260]
    assert real_tokenizer.encode(" \x00\x00 ")[1:] == [262, 354, 354, 262]
    assert real_tokenizer.token_to_id("\x00") == 354
    assert real_tokenizer.decode_tokens([354, 3]) == "\x00\x00"


def stderr_of(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    return result.stderr


def test_loading_prints_nothing_to_stderr() -> None:
    load = f"from vlm_hpc.internvl.tokenizer import load_tokenizer; load_tokenizer({str(REAL)!r}); "
    assert stderr_of(load * 2) == ""  # the child's fd 2, where sentencepiece's C++ logging writes
    # The library's logging is back to its default afterwards: a plain load warns as it would without us.
    plain = f"import sentencepiece; sentencepiece.SentencePieceProcessor(model_file={str(REAL / 'tokenizer.model')!r})"
    warns = "null character" in stderr_of(plain)  # sentencepiece >= 0.2.1 does
    assert ("null character" in stderr_of(load + plain)) == warns
