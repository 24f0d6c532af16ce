"""Prototype of two changes to vlm_hpc.tiling, kept here so preprocess.py can measure them (--with-prototype).

Nothing in the package imports this file. Both changes keep the output bit-identical to the seed:

1. `prototype_normalize`: on the CPU, normalize with torchvision's own float32 ops, in place, over all tiles at
   once: `u8.to(float32).div_(255).sub_(mean).div_(std)`. The package's `normalize` gathers from a [3, 256]
   table with an int32 index tensor, which on the CPU costs 6-10x more than the arithmetic (int32 widening,
   offset add, then a gather). The table is still the right tool on CUDA, where a division by a scalar is a
   multiplication by its reciprocal and so not exact; that is why the CPU branch is chosen by device.
   These ops are element-wise, and IEEE float32 subtraction and division are correctly rounded in the SIMD and
   the scalar code paths alike, so checking all 3x256 (channel, value) inputs proves the identity for every
   input (preprocess.py's `check_normalize_exhaustively` does that check).

2. `prototype_tile_image`: the same resizes as the package, but the HWC -> CHW tile copy goes through Pillow's
   `split()` into three planes, then one numpy copy per plane (contiguous 448-byte rows), instead of one torch
   copy through a 5-d permuted view whose innermost stride is 3 bytes.
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from vlm_hpc.imaging import decode_image
from vlm_hpc.tiling import IMAGENET_MEAN, IMAGENET_STD, TILE_SIZE, choose_grid, normalize, tile_image


@lru_cache(maxsize=1)
def _mean_std() -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [3, 1, 1] mean and std, as torchvision's Normalize builds them from the tuples."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    return mean, std


def prototype_normalize(tiles: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 3, H, W] -> float32, bit-identical to ToTensor + Normalize. CPU arithmetic, CUDA table lookup."""
    if tiles.device.type != "cpu":
        return normalize(tiles)  # on CUDA the division would not be exact; the package's table lookup is
    mean, std = _mean_std()
    # ToTensor: .to(float32).div(255); Normalize: .sub_(mean).div_(std). Same ops, same order, in place.
    return tiles.to(torch.float32).div_(255).sub_(mean).div_(std)


def _planes(image: Image.Image) -> list[np.ndarray]:
    """The R, G, B planes of an RGB image as [H, W] uint8 arrays (Pillow's split is a fast C loop)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return [np.asarray(band) for band in image.split()]


def prototype_tile_image(image: Image.Image, max_num: int) -> torch.Tensor:
    """Same output as vlm_hpc.tiling.tile_image: uint8 [n, 3, 448, 448], grid tiles row-major then the thumbnail."""
    if image.mode != "RGB":
        raise ValueError(f"prototype_tile_image needs an RGB image, got mode {image.mode}")
    cols, rows = choose_grid(image.width, image.height, max_num)
    grid_tiles = cols * rows
    count = grid_tiles + (1 if grid_tiles > 1 else 0)
    out = np.empty((count, 3, TILE_SIZE, TILE_SIZE), dtype=np.uint8)
    resized = image.resize((TILE_SIZE * cols, TILE_SIZE * rows), Image.Resampling.BICUBIC)
    grid_out = out[:grid_tiles].reshape(rows, cols, 3, TILE_SIZE, TILE_SIZE)
    for channel, plane in enumerate(_planes(resized)):
        # [rows*448, cols*448] -> [rows, cols, 448, 448]; the innermost 448 bytes stay contiguous.
        np.copyto(grid_out[:, :, channel], plane.reshape(rows, TILE_SIZE, cols, TILE_SIZE).transpose(0, 2, 1, 3))
    if grid_tiles > 1:
        thumbnail = image.resize((TILE_SIZE, TILE_SIZE), Image.Resampling.BICUBIC)
        for channel, plane in enumerate(_planes(thumbnail)):
            out[grid_tiles, channel] = plane
    return torch.from_numpy(out)


def prototype_preprocess(data: bytes, max_num: int) -> torch.Tensor:
    return prototype_normalize(prototype_tile_image(decode_image(data).image, max_num))


def prototype_preprocess_uint8(data: bytes, max_num: int) -> torch.Tensor:
    return prototype_tile_image(decode_image(data).image, max_num)


def prototype_preprocess_package_tiles(data: bytes, max_num: int) -> torch.Tensor:
    """Only change 1 (CPU normalize), with the package's tile_image: isolates the normalize fix."""
    return prototype_normalize(tile_image(decode_image(data).image, max_num))


def prototype_stages(blob: bytes, max_num: int, clock) -> None:  # clock: preprocess.StageClock
    """Where the prototype's time goes; the same steps as prototype_preprocess, timed one by one."""
    clock.start()
    image = decode_image(blob).image
    clock.lap("decode_image (open+load+mode)")
    cols, rows = choose_grid(image.width, image.height, max_num)
    resized = image.resize((TILE_SIZE * cols, TILE_SIZE * rows), Image.Resampling.BICUBIC)
    clock.lap("resize to grid")
    out = np.empty((cols * rows + (1 if cols * rows > 1 else 0), 3, TILE_SIZE, TILE_SIZE), dtype=np.uint8)
    grid_out = out[: cols * rows].reshape(rows, cols, 3, TILE_SIZE, TILE_SIZE)
    for channel, plane in enumerate(_planes(resized)):
        np.copyto(grid_out[:, :, channel], plane.reshape(rows, TILE_SIZE, cols, TILE_SIZE).transpose(0, 2, 1, 3))
    clock.lap("split + copy grid tiles")
    if cols * rows > 1:
        thumbnail = image.resize((TILE_SIZE, TILE_SIZE), Image.Resampling.BICUBIC)
        clock.lap("thumbnail resize")
        for channel, plane in enumerate(_planes(thumbnail)):
            out[cols * rows, channel] = plane
    else:
        clock.lap("thumbnail resize")
    clock.lap("split + copy thumbnail")
    prototype_normalize(torch.from_numpy(out))
    clock.lap("normalize (in-place arithmetic)")
