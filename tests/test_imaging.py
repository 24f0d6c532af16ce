"""Decoding of bad and odd inputs: clear rejections with a reason, valid extremes accepted."""

from __future__ import annotations

import io
import zlib
import struct

import pytest
from PIL import Image

from vlm_hpc.errors import ImageRejected
from vlm_hpc.imaging import MAX_PIXELS, decode_image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A valid, tiny PNG header declaring a huge grey image: the classic decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(("data", "reason"), [
    (None, "missing"),
    (b"", "empty"),
    (b"this is not an image at all", "undecodable"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "undecodable"),
])
def test_bad_bytes_are_rejected_with_a_reason(data: bytes | None, reason: str) -> None:
    with pytest.raises(ImageRejected) as info:
        decode_image(data)
    assert info.value.reason == reason
    assert str(info.value).startswith(reason)


def test_decompression_bomb_is_rejected_before_decoding() -> None:
    with pytest.raises(ImageRejected) as info:
        decode_image(bomb_png(30000, 30000))
    assert info.value.reason == "too_many_pixels"
    assert str(MAX_PIXELS) in str(info.value) or "pixels" in str(info.value)


@pytest.mark.parametrize("size", [(1, 1), (100000, 10)])
def test_valid_extreme_sizes_decode(size: tuple[int, int]) -> None:
    decoded = decode_image(png_bytes(Image.new("RGB", size, (200, 100, 50))))
    assert decoded.image.size == size and decoded.image.mode == "RGB" and not decoded.truncated


def test_truncated_png_decodes_partially_and_says_so() -> None:
    full = png_bytes(Image.effect_noise((300, 200), 64).convert("RGB"))
    decoded = decode_image(full[: len(full) * 6 // 10])
    assert decoded.truncated
    assert decoded.image.size == (300, 200)
    assert decoded.image.getpixel((299, 199)) == (0, 0, 0)  # the missing part is black, as in the original


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "I;16", "CMYK", "1"])
def test_every_mode_comes_out_rgb(mode: str) -> None:
    image = Image.new("RGB", (20, 10), (30, 60, 90)).convert(mode if mode != "I;16" else "I").convert(mode) \
        if mode != "I;16" else Image.new("I;16", (20, 10), 500)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if mode == "CMYK" else "PNG")
    assert decode_image(buffer.getvalue()).image.mode == "RGB"


def test_transparent_pixels_become_white() -> None:
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert decode_image(png_bytes(rgba)).image.getpixel((0, 0)) == (255, 255, 255)
