"""Image bytes to captions, against the original `batch_chat`: greedy ids and texts, batched and one by one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from golden import GOLDEN, load_golden
from vlm_hpc.engines.base import GenerationSettings
from vlm_hpc.engines.transformers import TransformersEngine
from vlm_hpc.preprocess.decode import decode_image
from vlm_hpc.preprocess.tiling import tile_image

E2E = load_golden("e2e_golden.json")
RUNS = [("batch", E2E["batch"], None), ("english_system_message", E2E["batch_v15_english_system_message"],
        E2E["batch_v15_english_system_message"]["system_message"])]
RUNS += [(f"one_by_one-{run['keys'][0]}", run, None) for run in E2E["batch_size_1"]]


@pytest.fixture(scope="module")
def engine(golden_model_dir: Path) -> TransformersEngine:
    settings = GenerationSettings(**E2E["generation_config"])
    return TransformersEngine.from_folder(golden_model_dir, dtype="float32", device="cpu", settings=settings)


def tiles_for(keys: list[str], golden_images: dict[str, bytes]) -> list[torch.Tensor]:
    return [tile_image(decode_image(golden_images[key]).image, E2E["max_num"]) for key in keys]


@pytest.mark.parametrize(("name", "run", "system_message"), RUNS, ids=[r[0] for r in RUNS])
def test_captions_equal_the_originals(name: str, run: dict, system_message: str | None, engine: TransformersEngine,
                                      golden_images: dict[str, bytes]) -> None:
    engine.system_message = system_message or E2E["model_facts"]["system_message"]
    tiles = tiles_for(run["keys"], golden_images)
    assert [t.shape[0] for t in tiles] == run["image_counts"]
    assert [engine.prompt(t.shape[0]) for t in tiles] == run["prompts"]
    batch = engine.tokenizer.encode_batch(run["prompts"])
    assert batch.input_ids == run["input_ids"] and batch.attention_mask == run["attention_mask"]
    captions = engine.caption(tiles)
    assert [c.token_ids for c in captions] == run["new_token_ids"]
    assert [c.text for c in captions] == run["responses"]
    # first-step logits at the last prompt position, the quantity the original's scores recorded
    with torch.no_grad():
        from vlm_hpc.preprocess.tiling import normalize
        logits = engine.model(input_ids=torch.tensor(batch.input_ids),
                              attention_mask=torch.tensor(batch.attention_mask),
                              pixel_values=normalize(torch.cat(tiles))).logits[:, -1]
    assert (logits - torch.tensor(run["step0_full_logits"])).abs().max() < 1e-4


@pytest.mark.parametrize("vision_batch", [1, 3])
def test_vision_micro_batches_change_no_caption(vision_batch: int, engine: TransformersEngine,
                                                golden_images: dict[str, bytes]) -> None:
    from vlm_hpc.engines.transformers import encode_images
    run = E2E["batch"]
    engine.system_message = E2E["model_facts"]["system_message"]
    tiles = tiles_for(run["keys"], golden_images)
    whole = encode_images(engine.model, torch.cat(tiles), torch.float32, None)
    split = encode_images(engine.model, torch.cat(tiles), torch.float32, vision_batch)
    assert split.shape == whole.shape and (split - whole).abs().max() < 1e-5
    engine.vision_batch = vision_batch
    try:
        captions = engine.caption(tiles)
    finally:
        engine.vision_batch = None
    assert [c.token_ids for c in captions] == run["new_token_ids"]
    assert [c.text for c in captions] == run["responses"]


def test_memory_costs_follow_the_models_shapes(engine: TransformersEngine) -> None:
    from vlm_hpc.engines.transformers import PREFILL_OVER_CACHE, VISION_BUFFERS
    text, vision = engine.model.config.text_config, engine.model.config.vision_config
    per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * 4 * (1 + PREFILL_OVER_CACHE)
    costs = engine.memory_costs()
    assert costs.tile_bytes == engine.num_image_token * per_token
    text_tokens = len(engine.tokenizer.encode(engine.prompt(1))) - engine.num_image_token
    assert costs.image_bytes == (text_tokens + engine.settings.max_new_tokens) * per_token
    vision_tokens = (vision.image_size[0] // vision.patch_size[0]) ** 2 + 1
    assert costs.vision_workspace_bytes == \
        64 * vision_tokens * (vision.hidden_size + vision.intermediate_size) * 4 * VISION_BUFFERS
    assert engine.free_memory() is None  # CPU: no memory-sized budget


def test_tokens_per_tile_is_what_the_original_used(engine: TransformersEngine) -> None:
    assert E2E["model_facts"]["num_image_token"] == engine.num_image_token


def test_sampling_is_reproducible_with_a_seed(engine: TransformersEngine, golden_images: dict[str, bytes]) -> None:
    tiles = tiles_for(E2E["batch"]["keys"][:2], golden_images)
    sampled = GenerationSettings(do_sample=True, max_new_tokens=6, seed=7)
    first = [c.token_ids for c in engine.caption(tiles, sampled)]
    assert first == [c.token_ids for c in engine.caption(tiles, sampled)]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlm_hpc.caption", *args], capture_output=True, text=True,
                          timeout=300)


def test_caption_cli_prints_one_json_line_per_image(golden_model_dir: Path, tmp_path: Path) -> None:
    images = [str(GOLDEN / "images" / f"{key}.png") for key in E2E["batch"]["keys"]]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    result = run_cli("--model", str(golden_model_dir), "--greedy", "--max-num", "6", "--max-new-tokens", "12",
                     "--batch-size", "3", "--dtype", "float32", "--device", "cpu",
                     *images[:2], str(broken), *images[2:])
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["image"] for line in lines] == images[:2] + [str(broken)] + images[2:]
    good = [line for line in lines if "caption" in line]
    assert [line["caption"] for line in good] == E2E["batch"]["responses"]
    assert [line["token_ids"] for line in good] == E2E["batch"]["new_token_ids"]
    assert [line["tiles"] for line in good] == E2E["batch"]["image_counts"]
    assert lines[2]["reason"] == "undecodable"
    assert result.returncode == 1  # one image failed


def test_caption_cli_missing_model_is_one_line(tmp_path: Path) -> None:
    result = run_cli("--model", str(tmp_path / "missing"), "x.png")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: model:")
