"""The seed's (ROVI's) image preprocessing, re-written from its semantics: the reference that
benchmarks/preprocess.py times and checks vlm_hpc's decoding and tiling against, bit for bit.

* ROVI's `process_types_of_img`: PIL open; RGBA/LA/RGBa/La/CMYK and P-with-transparency are blended onto white
  in float64 numpy, everything else `convert('RGB')`;
* InternVL's `dynamic_preprocess`: closest-aspect grid, one default-filter resize, row-major crops, a 448x448
  resize thumbnail when there is more than one tile;
* per tile torchvision's ToTensor + Normalize (re-written with the same torch ops in the same order, because the
  torchvision wheel does not import on CPU torch), then `torch.stack`.

Each step is its own function so that the benchmark's --stages can time it; `reference_preprocess` chains them.
Its outputs match the sha256 recorded from the original code (tests/fixtures/golden/tiling_golden.json, checked
by the benchmark's --golden).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image, ImageFile

# The seed's constants (InternVL / ROVI).
REFERENCE_TILE_SIZE = 448
REFERENCE_MEAN = (0.485, 0.456, 0.406)
REFERENCE_STD = (0.229, 0.224, 0.225)
REFERENCE_BLENDED_MODES = ("RGBA", "LA", "RGBa", "La", "CMYK")


@contextlib.contextmanager
def reference_truncation_setting() -> Iterator[None]:
    """The seed sets PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True at import; scope it to the reference, so that
    vlm_hpc's decoder runs with Pillow's default, as it does in production."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def reference_open(data: bytes) -> Image.Image:
    """PIL open + decode. The seed decodes lazily inside `convert`; loading here only lets us time it apart."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def reference_mode_handling(image: Image.Image) -> Image.Image:
    """ROVI's process_types_of_img after the open: blend transparency onto white in float64, else to RGB."""
    if image.mode in REFERENCE_BLENDED_MODES or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
    else:
        image = image.convert("RGB")  # a full copy even when the image is already RGB
    if image.mode == "RGBA":
        pixels = np.array(image)
        alpha = pixels[:, :, 3, np.newaxis]
        blended = alpha / 255 * pixels[..., :3] + 255 - alpha  # float64, in this operation order
        image = Image.fromarray(np.rint(blended.clip(min=0, max=255)).astype(np.uint8), "RGB")
    return image


def reference_candidate_grids(max_num: int, min_num: int = 1) -> list[tuple[int, int]]:
    """Every (cols, rows) with min_num <= cols*rows <= max_num, as a set sorted by area; rebuilt per image, as
    the seed does (not vlm_hpc's cached `candidate_grids`: the reference stays independent of what it checks)."""
    grids = {
        (cols, rows)
        for n in range(min_num, max_num + 1)
        for cols in range(1, n + 1)
        for rows in range(1, n + 1)
        if min_num <= cols * rows <= max_num
    }
    return sorted(grids, key=lambda grid: grid[0] * grid[1])


def reference_closest_grid(width: int, height: int, grids: list[tuple[int, int]]) -> tuple[int, int]:
    """Closest aspect ratio; on an exact tie, a later grid wins if the image area exceeds half the grid's area."""
    aspect = width / height
    area = width * height
    best_diff = float("inf")
    best = (1, 1)
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and area > 0.5 * REFERENCE_TILE_SIZE * REFERENCE_TILE_SIZE * cols * rows:
            best = (cols, rows)
    return best


def reference_grid(image: Image.Image, max_num: int) -> tuple[int, int]:
    return reference_closest_grid(image.width, image.height, reference_candidate_grids(max_num))


def reference_resize_to_grid(image: Image.Image, grid: tuple[int, int]) -> Image.Image:
    """One resize to the whole grid, with PIL's default filter (BICUBIC for RGB in Pillow 13)."""
    cols, rows = grid
    return image.resize((REFERENCE_TILE_SIZE * cols, REFERENCE_TILE_SIZE * rows))


def reference_crop_tiles(resized: Image.Image, grid: tuple[int, int]) -> list[Image.Image]:
    """Tiles cut row-major with `crop`, as dynamic_preprocess does."""
    cols, rows = grid
    size = REFERENCE_TILE_SIZE
    tiles = []
    for index in range(cols * rows):
        left, top = (index % cols) * size, (index // cols) * size
        tiles.append(resized.crop((left, top, left + size, top + size)))
    return tiles


def reference_thumbnail(image: Image.Image) -> Image.Image:
    """The seed's 'thumbnail' is a plain 448x448 resize of the whole image (aspect ratio not kept)."""
    return image.resize((REFERENCE_TILE_SIZE, REFERENCE_TILE_SIZE))


def reference_dynamic_preprocess(image: Image.Image, max_num: int) -> list[Image.Image]:
    grid = reference_grid(image, max_num)
    tiles = reference_crop_tiles(reference_resize_to_grid(image, grid), grid)
    if len(tiles) != 1:
        tiles.append(reference_thumbnail(image))
    return tiles


def reference_to_tensor(tile: Image.Image) -> torch.Tensor:
    """torchvision's ToTensor on an 8-bit RGB PIL image: copy to HWC uint8, make it CHW, float32, / 255."""
    pixels = torch.from_numpy(np.array(tile, np.uint8, copy=True))
    pixels = pixels.view(tile.height, tile.width, len(tile.getbands()))
    pixels = pixels.permute((2, 0, 1)).contiguous()
    return pixels.to(dtype=torch.float32).div(255)


def reference_normalize(tensor: torch.Tensor) -> torch.Tensor:
    """torchvision's Normalize (not in place): clone, then sub_(mean) and div_(std) with float32 [3,1,1] tensors."""
    tensor = tensor.clone()
    mean = torch.as_tensor(REFERENCE_MEAN, dtype=tensor.dtype, device=tensor.device)
    std = torch.as_tensor(REFERENCE_STD, dtype=tensor.dtype, device=tensor.device)
    if (std == 0).any():  # torchvision checks this on every call; kept for the same cost
        raise ValueError("std evaluated to zero")
    return tensor.sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))


def reference_tile_transform(tile: Image.Image) -> torch.Tensor:
    # The seed's per-tile Compose also has Lambda(convert RGB if not RGB) and Resize((448, 448), BICUBIC).
    # Tiles are already RGB and 448x448, and torchvision's resize returns its input unchanged when the size
    # already matches, so both are no-ops; only ToTensor and Normalize do work.
    return reference_normalize(reference_to_tensor(tile))


def reference_preprocess(data: bytes, max_num: int) -> torch.Tensor:
    """The seed's image bytes -> float32 pixel_values [n, 3, 448, 448]."""
    with reference_truncation_setting(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. Pillow's warning for P images with a bytes alpha table
        image = reference_mode_handling(reference_open(data))
        tiles = reference_dynamic_preprocess(image, max_num)
        return torch.stack([reference_tile_transform(tile) for tile in tiles])
