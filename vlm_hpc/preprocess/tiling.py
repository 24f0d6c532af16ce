"""InternVL's dynamic-resolution tiling, bit-identical to the original `dynamic_preprocess` + ToTensor + Normalize.

The image is resized (Pillow's bicubic, bit for bit: resampling.py) to a grid of 448 px tiles whose aspect
ratio best matches it, cut row-major, and followed by a 448x448 thumbnail of the whole image when there is more
than one tile. Tiles stay uint8 until `normalize`, which is exact on any device: the original's float32
operations on the CPU, a lookup into a table computed with them elsewhere.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from PIL import Image

from vlm_hpc.preprocess.resampling import resize_into_tiles

TILE_SIZE = 448
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@lru_cache(maxsize=64)
def candidate_grids(max_num: int, min_num: int = 1) -> tuple[tuple[int, int], ...]:
    """Every (cols, rows) with min_num <= cols*rows <= max_num, ordered as the original orders them.

    The original sorts a set by area; CPython iterates small int tuples in a fixed order, so building the
    same set and sorting it the same way reproduces its order among grids of equal area.
    """
    grids = {
        (cols, rows)
        for n in range(min_num, max_num + 1)
        for cols in range(1, n + 1)
        for rows in range(1, n + 1)
        if min_num <= cols * rows <= max_num
    }
    return tuple(sorted(grids, key=lambda grid: grid[0] * grid[1]))


def choose_grid(width: int, height: int, max_num: int, min_num: int = 1) -> tuple[int, int]:
    """The (cols, rows) grid the original picks for a width x height image.

    Closest aspect ratio wins; on an exact tie a later (larger) grid wins when the image area exceeds half
    the grid's pixel area.
    """
    if max_num < 1 or min_num < 1 or min_num > max_num:
        raise ValueError(f"need 1 <= min_num <= max_num, got min_num={min_num} max_num={max_num}")
    aspect = width / height
    area = width * height
    best_diff = float("inf")
    best = (1, 1)
    for cols, rows in candidate_grids(max_num, min_num):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff = diff
            best = (cols, rows)
        elif diff == best_diff and area > 0.5 * TILE_SIZE * TILE_SIZE * cols * rows:
            best = (cols, rows)
    return best


def tile_count(width: int, height: int, max_num: int) -> int:
    """How many tiles `tile_image` makes for this size: the grid, plus a thumbnail when the grid has >1 tile."""
    cols, rows = choose_grid(width, height, max_num)
    return cols * rows + (1 if cols * rows > 1 else 0)


def tile_image(image: Image.Image, max_num: int) -> torch.Tensor:
    """Tile an RGB image: uint8 tensor [n, 3, 448, 448], grid tiles row-major then the thumbnail (if n > 1)."""
    if image.mode != "RGB":
        raise ValueError(f"tile_image needs an RGB image, got mode {image.mode}; decode it with decode_image")
    cols, rows = choose_grid(image.width, image.height, max_num)
    grid_tiles = cols * rows
    count = grid_tiles + (1 if grid_tiles > 1 else 0)
    out = torch.empty((count, 3, TILE_SIZE, TILE_SIZE), dtype=torch.uint8)
    targets = [(cols, rows, out[:grid_tiles])]
    if grid_tiles > 1:
        targets.append((1, 1, out[grid_tiles:]))  # the thumbnail
    resize_into_tiles(image, targets)
    return out


@lru_cache(maxsize=1)
def _normalization_table() -> torch.Tensor:
    """[3, 256] float32: (v/255 - mean[c]) / std[c] with torchvision's exact float32 ops, computed on the CPU.

    On CUDA a division by a scalar is a multiplication by its reciprocal (not bit-identical), so the GPU
    never divides: it only looks values up in this table.
    """
    values = torch.arange(256, dtype=torch.uint8).float().div(255).expand(3, 256).clone()
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1)
    return values.sub_(mean).div_(std)


def normalize(tiles: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 tiles [n, 3, H, W] -> ImageNet-normalized [n, 3, H, W] on the tiles' device, bit-identical to
    ToTensor + Normalize in float32 (then cast to `dtype`, as the original casts pixel_values to the model).

    On the CPU: torchvision's own float32 operations in its order (exact, and the fastest there). Elsewhere:
    a lookup into the CPU-computed table, because e.g. CUDA divides by a scalar via its reciprocal."""
    if tiles.dtype != torch.uint8 or tiles.dim() != 4 or tiles.shape[1] != 3:
        raise ValueError(f"normalize needs uint8 tiles [n, 3, H, W], got {tiles.dtype} {tuple(tiles.shape)}")
    if tiles.device.type == "cpu":
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
        normalized = tiles.to(torch.float32).div_(255).sub_(mean).div_(std)
    else:
        normalized = normalize_by_table(tiles)
    return normalized if dtype == torch.float32 else normalized.to(dtype)


def normalize_by_table(tiles: torch.Tensor) -> torch.Tensor:
    """The accelerator path of `normalize`: exact on any device (public so that tests compare it with the
    CPU path)."""
    table = _normalization_table().to(tiles.device)
    # Flat index c*256 + v picks channel c's entry for value v.
    offsets = torch.arange(0, 3 * 256, 256, device=tiles.device, dtype=torch.int32).view(1, 3, 1, 1)
    return table.view(-1)[tiles.int() + offsets]
