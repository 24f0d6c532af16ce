"""Tiling against the original: every grid choice, every tile byte, every normalized float."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from golden import GOLDEN, load_golden
from vlm_hpc.preprocess.decode import blend_onto_white, decode_image
from vlm_hpc.preprocess.tiling import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    choose_grid,
    normalize,
    normalize_by_table,
    tile_count,
    tile_image,
)

TILING = load_golden("tiling_golden.json")
IMAGES = {item["key"]: item for item in TILING["images"]}


def sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def test_every_grid_choice_matches_the_original() -> None:
    table = load_golden("grid_table_golden.json")
    wrong = [(w, h, m, grid) for m, grids in table["grids"].items()
             for (w, h), grid in zip(table["pairs"], grids) if list(choose_grid(w, h, int(m))) != grid]
    assert len(table["pairs"]) * len(table["grids"]) >= 2000
    assert wrong == []


@pytest.fixture(scope="module")
def decoded(golden_images: dict[str, bytes]) -> dict:
    return {key: decode_image(data) for key, data in golden_images.items()}


@pytest.mark.parametrize("key", sorted(IMAGES))
def test_decoded_image_matches_the_original(key: str, decoded: dict) -> None:
    expected = IMAGES[key]
    image = decoded[key].image
    assert image.mode == "RGB" and list(image.size) == expected["processed_size"]
    assert hashlib.sha256(np.asarray(image).tobytes()).hexdigest() == expected["processed_sha256"]


@pytest.mark.parametrize("case", TILING["cases"], ids=lambda c: f"{c['key']}-max{c['max_num']}")
def test_tiles_are_bit_identical(case: dict, decoded: dict) -> None:
    image = decoded[case["key"]].image
    tiles = tile_image(image, case["max_num"])
    assert list(choose_grid(image.width, image.height, case["max_num"])) == case["grid"]
    assert tiles.shape[0] == case["tile_count"] == tile_count(image.width, image.height, case["max_num"])
    assert [sha256(tile) for tile in tiles] == case["tile_uint8_sha256"]
    pixel_values = normalize(tiles)
    assert pixel_values.dtype == torch.float32
    assert sha256(pixel_values) == case["pixel_values_sha256"]
    for sample in case["samples"]:
        t, c, y, x = sample["index"]
        assert pixel_values[t, c, y, x].item() == sample["value"]
        assert tiles[t, c, y, x].item() == sample["uint8"]


def test_stored_uint8_tiles_equal_ours(decoded: dict) -> None:
    stored = load_file(GOLDEN / "tiling_golden.safetensors")
    checked = 0
    for case in TILING["cases"]:
        if not case["uint8_tiles_stored_as"]:
            continue
        expected = torch.cat([stored[name].reshape(-1, 3, 448, 448) for name in case["uint8_tiles_stored_as"]])
        assert torch.equal(tile_image(decoded[case["key"]].image, case["max_num"]), expected)
        checked += 1
    assert checked > 0


def test_truncated_file_is_decoded_and_reported(decoded: dict) -> None:
    flags = {key: item.truncated for key, item in decoded.items()}
    assert [key for key, truncated in flags.items() if truncated] == [k for k in flags if "truncated" in k]


def test_blend_equals_the_original_float64_formula_for_every_alpha_and_value() -> None:
    values, alphas = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8))
    rgba = np.stack([values, values[:, ::-1], values, alphas], axis=-1)
    alpha = rgba[:, :, 3, np.newaxis]
    expected = np.rint((alpha / 255 * rgba[..., :3] + 255 - alpha).clip(0, 255)).astype(np.uint8)
    assert np.array_equal(np.asarray(blend_onto_white(Image.fromarray(rgba, "RGBA"))), expected)


def test_normalize_equals_torchvision_float32_ops() -> None:
    tiles = torch.randint(0, 256, (2, 3, 448, 448), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    expected = torch.stack([tile.float().div(255).sub_(mean).div_(std) for tile in tiles])
    assert torch.equal(normalize(tiles), expected)
    assert normalize(tiles, torch.bfloat16).dtype == torch.bfloat16
    every_value = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16).contiguous()
    assert torch.equal(normalize_by_table(every_value), normalize(every_value))


def test_single_tile_has_no_thumbnail_and_multi_tile_ends_with_it() -> None:
    square = Image.new("RGB", (448, 448), (10, 20, 30))
    assert tile_image(square, 9).shape == (1, 3, 448, 448)
    wide = Image.linear_gradient("L").convert("RGB").resize((1000, 300))
    tiles = tile_image(wide, 9)
    assert tiles.shape[0] == 4
    assert torch.equal(tiles[-1], tile_image(wide, 1)[0])


@pytest.mark.parametrize("size", [(1, 1), (100000, 10), (10, 100000), (3840, 2160)])
def test_extreme_sizes_tile_within_budget(size: tuple[int, int]) -> None:
    for max_num in (1, 6, 9, 12, 40):
        cols, rows = choose_grid(*size, max_num)
        assert 1 <= cols * rows <= max_num


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="RGB"):
        tile_image(Image.new("L", (10, 10)), 6)
    with pytest.raises(ValueError, match="uint8"):
        normalize(torch.zeros(1, 3, 448, 448))
    with pytest.raises(ValueError, match="max_num"):
        choose_grid(10, 10, 0)
