"""vlm_hpc._bicubic against Pillow 13's own resize: every SIMD path, both pixel layouts, byte for byte."""

from __future__ import annotations

import math
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_hpc.preprocess import resampling
from vlm_hpc.preprocess.resampling import resize_into_tiles

bicubic = pytest.importorskip("vlm_hpc._bicubic", reason="the C resampler was not built (no compiler at install)")
ALL_PATHS = ("scalar", "avx2", "avx512")
PATHS = ALL_PATHS[: ALL_PATHS.index(bicubic.simd()) + 1]  # scalar always; SIMD levels this CPU has

FIXED_CASES = [  # (in_w, in_h, out_w, out_h): copies, one pass skipped, both pass orders, extremes
    (1, 1, 448, 448), (3, 2, 448, 448), (1, 2000, 448, 896), (2000, 1, 896, 448), (448, 448, 448, 448),
    (896, 448, 896, 448), (448, 300, 448, 448), (300, 448, 448, 448), (449, 448, 448, 448),
    (4032, 3024, 1792, 1344), (3840, 2160, 448, 448), (4000, 500, 3584, 448), (300, 2400, 448, 3584),
    (300, 2400, 448, 448), (1344, 1000, 1344, 896), (1000, 1344, 896, 1344), (10000, 10, 448, 448),
    (10, 4000, 448, 448), (2, 2, 3584, 3584), (37, 5, 101, 3), (600, 7, 8, 7), (5000, 9, 448, 9),
    (856, 400, 444, 623),  # a padding quad after the last real one once made AVX-512 read past the row
]


def random_cases(count: int, seed: int) -> list[tuple[int, int, int, int]]:
    """Web-like sizes to 448-multiples, plus steep downscales around the AVX-512 kernel's window limit."""
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        if rng.random() < 0.3:
            out_w = rng.choice([448, 101, 37, 8, 3])
            source_w = int(out_w * rng.uniform(6, 14)) + rng.randint(0, 5)
            cases.append((source_w, rng.randint(1, 30), out_w, rng.randint(1, 30)))
        else:
            cases.append((rng.randint(1, 1600), rng.randint(1, 1600), 448 * rng.randint(1, 4), 448 * rng.randint(1, 4)))
    return cases


def content(width: int, height: int, seed: int) -> np.ndarray:
    """Noise, with saturated stripes on odd seeds so that the 0..255 clamp is exercised."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    if seed % 2:
        pixels[:, ::7] = 255
        pixels[::5] = 0
    return pixels


def pillow_planes(pixels: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize((out_w, out_h), Image.Resampling.BICUBIC)).transpose(2, 0, 1)


def ours_planes(pixels: np.ndarray, out_w: int, out_h: int, path: str, pixel_stride: int) -> np.ndarray:
    height, width, _ = pixels.shape
    source = pixels if pixel_stride == 3 else np.pad(pixels, ((0, 0), (0, 0), (0, 1)))
    tile = math.gcd(out_w, out_h)
    tiles = np.empty((out_h // tile, out_w // tile, 3, tile, tile), np.uint8)
    bicubic.resize_tiles(source, width, height, width * pixel_stride, pixel_stride, out_w, out_h, tile, tiles,
                         path=path)
    return tiles.transpose(2, 0, 3, 1, 4).reshape(3, out_h, out_w)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("pixel_stride", [3, 4])
def test_every_path_equals_pillow(path: str, pixel_stride: int) -> None:
    cases = FIXED_CASES + random_cases(60, seed=pixel_stride)
    bad = []
    for seed, (in_w, in_h, out_w, out_h) in enumerate(cases):
        pixels = content(in_w, in_h, seed)
        ours = ours_planes(pixels, out_w, out_h, path, pixel_stride)
        if not np.array_equal(ours, pillow_planes(pixels, out_w, out_h)):
            bad.append((in_w, in_h, out_w, out_h))
    assert bad == [], f"{path} stride {pixel_stride}: differs from Pillow on {bad}"


@pytest.mark.parametrize("size", [(1010, 944), (2400, 2100)])  # one block (Arrow, stride 4); several (stride 3)
def test_resize_into_tiles_matches_the_pillow_path(size: tuple[int, int]) -> None:
    image = Image.fromarray(content(*size, seed=3))
    ours = torch.empty((7, 3, 448, 448), dtype=torch.uint8)
    pillow = torch.empty_like(ours)
    resize_into_tiles(image, [(7, 1, ours)])
    resize_into_tiles(image, [(7, 1, pillow)], use_pillow=True)
    assert torch.equal(ours, pillow)
    assert resampling.resampler().startswith("vlm_hpc._bicubic")


def test_bad_arguments_raise_value_errors() -> None:
    source = bytes(10 * 10 * 3)
    with pytest.raises(ValueError, match="."):
        bicubic.resize_tiles(source, 10, 10, 30, 3, 448, 448, 448, bytearray(5))
    with pytest.raises(ValueError):
        bicubic.resize_tiles(source, 10, 11, 30, 3, 448, 448, 448, bytearray(3 * 448 * 448))
    with pytest.raises(ValueError):
        bicubic.resize_tiles(source, 10, 10, 30, 2, 448, 448, 448, bytearray(3 * 448 * 448))


GUARD_PAGE_SCRIPT = textwrap.dedent("""
    import ctypes, math, mmap, random, sys
    import numpy as np
    from vlm_hpc import _bicubic

    libc = ctypes.CDLL(None)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

    def before_guard_page(data: bytes) -> np.ndarray:
        # data placed so that its last byte is the last one before an unreadable page
        pages = -(-len(data) // mmap.PAGESIZE) + 1
        area = mmap.mmap(-1, pages * mmap.PAGESIZE)
        start = (pages - 1) * mmap.PAGESIZE - len(data)
        area[start:start + len(data)] = data
        address = ctypes.addressof(ctypes.c_char.from_buffer(area))
        assert libc.mprotect(address + (pages - 1) * mmap.PAGESIZE, mmap.PAGESIZE, 0) == 0  # PROT_NONE
        keep.append(area)
        return np.frombuffer(area, np.uint8, count=len(data), offset=start)

    keep = []
    rng, r = np.random.default_rng(0), random.Random(0)
    cases = [(856, 400, 444, 623), (3000, 20, 448, 20), (1, 1, 448, 448), (900, 700, 1344, 896)]
    cases += [(r.randint(1, 1200), r.randint(1, 60), r.randint(1, 500), r.randint(1, 60)) for _ in range(150)]
    for in_w, in_h, out_w, out_h in cases:
        for stride in (3, 4):
            size = (in_h - 1) * in_w * stride + (in_w - 1) * stride + 3  # ends at the last pixel's blue byte
            source = before_guard_page(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
            tile = math.gcd(out_w, out_h)
            for path in sys.argv[1:]:
                out = np.empty(3 * out_w * out_h, np.uint8)
                _bicubic.resize_tiles(source, in_w, in_h, in_w * stride, stride, out_w, out_h, tile, out, path=path)
    print("ok")
""")


def test_no_path_reads_past_the_source() -> None:
    """Sources end right before an unreadable page: any over-read would crash the child process."""
    result = subprocess.run([sys.executable, "-c", GUARD_PAGE_SCRIPT, *PATHS], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", (result.returncode, result.stderr[-2000:])
