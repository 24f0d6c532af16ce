"""Image bytes to an RGB picture, exactly as the original pipeline (ROVI's `process_types_of_img`) decodes them.

Transparent images are blended onto white; everything else goes through Pillow's `convert('RGB')`, with its
quirks kept on purpose (16-bit grey clips at 255, EXIF orientation is ignored). Truncated files decode as far
as they go, as the original does, and the caller is told so. Pillow reads every header; the pixels of plain
8-bit RGB/RGBA PNGs (most web images) come from libspng, which inflates faster and yields the same bytes.
"""

from __future__ import annotations

import io
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyspng
from PIL import Image, ImageFile

from vlm_hpc.errors import ImageRejected

# Decompression-bomb guard. 50 Mpx admits 8K (33 Mpx) and 12-50 MP photos; beyond that a web image is
# almost surely a bomb, and its RGBA decode alone would take 200+ MB per worker.
MAX_PIXELS = 50_000_000

# Modes the original converts to RGBA and blends onto white (plus P with a transparency entry).
_BLENDED_MODES = frozenset({"RGBA", "LA", "RGBa", "La", "CMYK"})

# Pillow's truncation switch is a module global; flipping it must not race between threads.
_TRUNCATION_LOCK = threading.Lock()


@dataclass(frozen=True)
class DecodedImage:
    """An RGB picture ready for tiling, whether its file was cut short (decoded partly, rest black), and the
    file's format as Pillow names it ("PNG", "JPEG", ...)."""

    image: Image.Image
    truncated: bool
    format: str | None


def decode_image(data: bytes | None, max_pixels: int = MAX_PIXELS) -> DecodedImage:
    """Decode image bytes (PNG, JPEG, WebP, ...) to RGB exactly as the original; raises ImageRejected."""
    if data is None:
        raise ImageRejected("missing", "the image cell is empty (None)")
    if len(data) == 0:
        raise ImageRejected("empty", "the image has zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageRejected("too_many_pixels", str(exc)) from None
    except Image.UnidentifiedImageError:
        raise ImageRejected("undecodable", "not in any image format Pillow can read") from None
    except Exception as exc:  # Pillow raises many types for garbage input
        raise ImageRejected("undecodable", f"unreadable image header ({type(exc).__name__}: {exc})") from None
    width, height = opened.size
    if width * height > max_pixels:
        raise ImageRejected(
            "too_many_pixels", f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}"
        )
    if width == 0 or height == 0:
        raise ImageRejected("undecodable", f"image has a zero dimension ({width}x{height})")
    fast = _decode_plain_png(opened, data)
    if fast is not None:
        return DecodedImage(image=_to_rgb(fast), truncated=False, format=opened.format)
    file_format = opened.format
    truncated = _load_pixels(opened, data)
    if truncated:
        opened = _load_truncated(data)
    return DecodedImage(image=_to_rgb(opened), truncated=truncated, format=file_format)


def _decode_plain_png(opened: Image.Image, data: bytes) -> Image.Image | None:
    """8-bit RGB or RGBA PNG without a tRNS chunk decoded by libspng; None means "let Pillow do it".

    For these files both decoders only inflate and unfilter, so the pixels are the same bytes; libspng is
    about 20% faster. Gamma and colour chunks are ignored by both. Any libspng error (a truncated or corrupt
    file) falls back to Pillow, whose lenient truncation handling is the original's behaviour.
    """
    if opened.format != "PNG" or "transparency" in opened.info or len(opened.tile) != 1:
        return None
    if getattr(opened, "n_frames", 1) != 1:  # APNG: Pillow's frame handling decides what frame 0 is
        return None
    rawmode = opened.tile[0].args  # "RGB;16B" etc. for 16-bit files, which take Pillow's path
    if rawmode not in ("RGB", "RGBA") or opened.mode != rawmode:
        return None
    try:
        # Four bytes per pixel is Pillow's own layout for RGB too, so the image can wrap this memory as it is.
        pixels = pyspng.load(data, format="RGBA")
    except Exception:  # noqa: BLE001 - every libspng failure means: decode with Pillow instead
        return None
    return _wrap_rgbx(pixels, rawmode)


def _wrap_rgbx(pixels: np.ndarray, mode: str) -> Image.Image:
    """A Pillow RGB/RGBA image over [h, w, 4] uint8 memory, without copying it (Arrow import)."""
    flat = pa.Array.from_buffers(pa.uint8(), pixels.size, [None, pa.py_buffer(pixels)])
    return Image.fromarrow(pa.FixedSizeListArray.from_arrays(flat, 4), mode, (pixels.shape[1], pixels.shape[0]))


def _load_pixels(opened: Image.Image, data: bytes) -> bool:
    """Load the pixels strictly; return True when the file is truncated (caller then decodes it leniently)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opened.load()
        return False
    except OSError:
        return True
    except Exception as exc:
        raise ImageRejected("undecodable", f"pixel data is corrupt ({type(exc).__name__}: {exc})") from None


def _load_truncated(data: bytes) -> Image.Image:
    """Decode a truncated file the way the original does (LOAD_TRUNCATED_IMAGES: the missing part is black)."""
    with _TRUNCATION_LOCK:
        previous = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                image = Image.open(io.BytesIO(data))
                image.load()
            return image
        except Exception as exc:
            raise ImageRejected("undecodable", f"truncated beyond repair ({type(exc).__name__}: {exc})") from None
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _to_rgb(image: Image.Image) -> Image.Image:
    """The original's mode handling: blend transparency onto white, else convert('RGB')."""
    if image.mode in _BLENDED_MODES or (image.mode == "P" and "transparency" in image.info):
        return blend_onto_white(image.convert("RGBA"))
    if image.mode == "RGB":
        return image  # the original's convert('RGB') would be an identical copy
    return image.convert("RGB")


def blend_onto_white(rgba: Image.Image) -> Image.Image:
    """rint(alpha/255*rgb + 255 - alpha) per channel; Pillow's masked paste gives the same bytes, without float64."""
    white = Image.new("RGB", rgba.size, (255, 255, 255))
    white.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
    return white
