"""Decoding of bad and odd inputs: clear rejections with a reason, valid extremes accepted."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from vlm_hpc.errors import ImageRejected
from vlm_hpc.preprocess import decode as imaging
from vlm_hpc.preprocess.decode import MAX_PIXELS, decode_image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A valid, tiny PNG header declaring a huge grey image: the classic decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1024))
            + chunk(b"IEND", b""))


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


def interlaced_png(pixels: np.ndarray) -> bytes:
    """An Adam7-interlaced 8-bit RGB/RGBA PNG (Pillow cannot write one), rows alternately filtered None and Sub."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    height, width, channels = pixels.shape
    raw = bytearray()
    adam7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
    for x0, y0, dx, dy in adam7:
        sub_image = pixels[y0::dy, x0::dx]
        if sub_image.size == 0:
            continue  # empty passes have no scanlines at all
        for index, row in enumerate(sub_image.reshape(sub_image.shape[0], -1).astype(np.int16)):
            if index % 2:
                left = np.concatenate([np.zeros(channels, np.int16), row[:-channels]])
                raw += b"\1" + ((row - left) % 256).astype(np.uint8).tobytes()
            else:
                raw += b"\0" + row.astype(np.uint8).tobytes()
    color_type = {3: 2, 4: 6}[channels]
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 1)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(raw)))
            + chunk(b"IEND", b""))


def pillow_only(data: bytes, monkeypatch: pytest.MonkeyPatch) -> Image.Image:
    """decode_image with the libspng path switched off: what Pillow alone gives."""
    with monkeypatch.context() as patch:
        patch.setattr(imaging, "_decode_plain_png", lambda opened, data: None)
        return decode_image(data).image


def plain_pngs() -> dict[str, bytes]:
    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    rgba = rng.integers(0, 256, (29, 41, 4), dtype=np.uint8)
    return {
        "rgb": png_bytes(Image.fromarray(rgb)),
        "rgba": png_bytes(Image.fromarray(rgba)),
        "rgb interlaced": interlaced_png(rgb),
        "rgba interlaced": interlaced_png(rgba),
        "rgb 1x1 interlaced": interlaced_png(rgb[:1, :1]),
        "rgb 3x9 interlaced": interlaced_png(rgb[:9, :3]),
    }


@pytest.mark.parametrize("name", list(plain_pngs()))
def test_plain_pngs_take_libspng_and_give_pillows_bytes(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    data = plain_pngs()[name]
    assert imaging._decode_plain_png(Image.open(io.BytesIO(data)), data) is not None  # the fast path is taken
    decoded = decode_image(data)
    expected = pillow_only(data, monkeypatch)
    assert decoded.image.mode == expected.mode == "RGB" and not decoded.truncated
    assert decoded.image.tobytes() == expected.tobytes()


def test_golden_images_decode_as_with_pillow_alone(golden_images: dict[str, bytes],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    for key, data in golden_images.items():
        assert decode_image(data).image.tobytes() == pillow_only(data, monkeypatch).tobytes(), key


def test_pngs_libspng_must_not_take_go_to_pillow() -> None:
    rgb = Image.effect_noise((30, 20), 64).convert("RGB")
    sixteen_bit = png_bytes(Image.fromarray(np.full((4, 4), 700, np.uint16)))
    buffer = io.BytesIO()
    rgb.save(buffer, format="PNG", transparency=(0, 0, 0))
    full = png_bytes(rgb)
    animated = io.BytesIO()
    rgb.save(animated, format="PNG", save_all=True, append_images=[rgb.rotate(90)])
    for data in [buffer.getvalue(), sixteen_bit, full[: len(full) // 2], png_bytes(rgb.convert("P")),
                 animated.getvalue()]:
        assert imaging._decode_plain_png(Image.open(io.BytesIO(data)), data) is None
