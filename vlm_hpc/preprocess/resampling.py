"""Pillow's bicubic resize written straight into channel-first tiles, by the fastest exact means at hand.

`vlm_hpc._bicubic` (C, built at install when a compiler is there) computes Pillow 13's fixed-point filter
bit for bit with SIMD and writes tiles directly. Without it, Pillow resizes and the result is cut into tiles
with one strided copy. Both give the same bytes; tests/test_resampling.py compares them.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

try:
    from vlm_hpc import _bicubic
except ImportError:  # built optionally (no C compiler at install): Pillow does the same resize, slower
    _bicubic = None


def resampler() -> str:
    """Which implementation resizes, for logs: e.g. "vlm_hpc._bicubic (avx512)" or "Pillow"."""
    return f"vlm_hpc._bicubic ({_bicubic.simd()})" if _bicubic is not None else "Pillow"


def resize_into_tiles(image: Image.Image, targets: Sequence[tuple[int, int, torch.Tensor]],
                      use_pillow: bool = False) -> None:
    """For each (cols, rows, tiles): resize an RGB image to (cols*T, rows*T) as Image.resize(BICUBIC) would,
    into uint8 `tiles` [rows*cols, 3, T, T] (tile row-major, channel-first). The source pixels are read once
    for all targets; `use_pillow` forces the Pillow path (for tests)."""
    source = _pixel_buffer(image) if _bicubic is not None and not use_pillow else None
    for cols, rows, tiles in targets:
        tile = tiles.shape[-1]
        expected_shape = (rows * cols, 3, tile, tile)
        if tiles.dtype != torch.uint8 or tuple(tiles.shape) != expected_shape or not tiles.is_contiguous():
            raise ValueError(f"need contiguous uint8 tiles [{rows * cols}, 3, T, T], got {tiles.dtype} "
                             f"{tuple(tiles.shape)}")
        if source is not None:
            pixels, row_stride, pixel_stride = source
            _bicubic.resize_tiles(pixels, image.width, image.height, row_stride, pixel_stride,
                                  cols * tile, rows * tile, tile, tiles.numpy())
            continue
        resized = image.resize((cols * tile, rows * tile), Image.Resampling.BICUBIC)
        # [rows*T, cols*T, 3] -> [rows, cols, 3, T, T]: one strided copy instead of crop + ToTensor per tile
        grid = _as_tensor(resized).view(rows, tile, cols, tile, 3).permute(0, 2, 4, 1, 3)
        tiles.view(rows, cols, 3, tile, tile).copy_(grid)


def _pixel_buffer(image: Image.Image) -> tuple[object, int, int]:
    """(buffer, row stride, pixel stride) of an RGB image's pixels: Pillow's own 4-byte pixels when they are
    one block (Arrow export, no copy), else a packed copy."""
    try:
        return pa.array(image).flatten().buffers()[1], image.width * 4, 4
    except ValueError:  # large images live in several blocks, which Arrow cannot describe
        return np.asarray(image), image.width * 3, 3


def _as_tensor(image: Image.Image) -> torch.Tensor:
    """HWC uint8 view of an RGB image, read-only."""
    pixels, _, pixel_stride = _pixel_buffer(image)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns that numpy's views are read-only
        flat = torch.from_numpy(np.frombuffer(pixels, dtype=np.uint8, count=image.width * image.height * pixel_stride))
    return flat.view(image.height, image.width, pixel_stride)[..., :3]
