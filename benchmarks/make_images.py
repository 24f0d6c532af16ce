"""Write a small, deterministic synthetic image corpus that resembles web images, for benchmarks/preprocess.py.

    python benchmarks/make_images.py DIR [--count 60] [--seed 1234]

What it contains (for the default 60 images; a smaller count keeps an evenly spaced subset of the special
images, a larger one adds more web-sized images):
* "web" images, long side 300-1024 px, aspect 1:2 to 2:1 (log-uniform, so about half portrait). This is most of a
  web-crawled corpus, and it sets the median cost.
* a few big ones: 4K 3840x2160, 12 MP 4032x3024, 1920x1080 (landscape and portrait), 1280x720, 1600x1200.
  They are few but dominate decode and resize time, as on the web.
* extreme aspect ratios (4000x500, 500x4000, 3000x400, 2400x300): many-tile grids such as 9x1.
* the modes that take other code paths: RGBA, P with a transparent palette index, L, and one JPEG.

Content: "photo-like" images are a smooth colour gradient with blurred shapes and Gaussian noise (sigma 1-6),
so PNG compression lands at a realistic 10-15 bits/pixel; "graphic-like" images are flat colours, rectangles
and text, which compress well. The same seed and the same Pillow/numpy versions give byte-identical files.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


@dataclass(frozen=True)
class ImageSpec:
    """One file to write: its name stem, what kind of content/mode it gets, and its size."""

    kind: str  # photo | graphic | rgba | palette | gray | jpeg
    width: int
    height: int

    def file_name(self, index: int) -> str:
        suffix = "jpg" if self.kind == "jpeg" else "png"
        return f"i{index:03d}_{self.kind}_{self.width}x{self.height}.{suffix}"


# The fixed part of the corpus: sizes and modes that exercise particular paths of the pipeline.
SPECIAL_SPECS: tuple[ImageSpec, ...] = (
    ImageSpec("photo", 3840, 2160),
    ImageSpec("photo", 3840, 2160),
    ImageSpec("graphic", 3840, 2160),
    ImageSpec("photo", 4032, 3024),
    ImageSpec("photo", 1920, 1080),
    ImageSpec("photo", 1920, 1080),
    ImageSpec("graphic", 1920, 1080),
    ImageSpec("photo", 1080, 1920),
    ImageSpec("photo", 1280, 720),
    ImageSpec("graphic", 1280, 720),
    ImageSpec("photo", 1600, 1200),
    ImageSpec("photo", 4000, 500),
    ImageSpec("photo", 500, 4000),
    ImageSpec("graphic", 3000, 400),
    ImageSpec("photo", 2400, 300),
    ImageSpec("rgba", 1280, 720),
    ImageSpec("rgba", 640, 480),
    ImageSpec("rgba", 512, 512),
    ImageSpec("palette", 800, 600),
    ImageSpec("palette", 400, 300),
    ImageSpec("gray", 1024, 768),
    ImageSpec("gray", 600, 800),
    ImageSpec("jpeg", 1024, 768),
)


DEFAULT_COUNT = 60


def plan_corpus(count: int, rng: np.random.Generator) -> list[ImageSpec]:
    """The specials first, then web-sized photo/graphic images (3 photos to 1 graphic).

    Below the default count an evenly spaced subset of the specials is kept, so that a small corpus has
    about the same share of big and odd images as the default one."""
    if count >= DEFAULT_COUNT:
        specs = list(SPECIAL_SPECS)
    else:
        keep = max(1, round(count * len(SPECIAL_SPECS) / DEFAULT_COUNT))
        specs = [SPECIAL_SPECS[i] for i in np.linspace(0, len(SPECIAL_SPECS) - 1, keep).round().astype(int)]
    while len(specs) < count:
        long_side = int(rng.integers(300, 1025))
        aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))  # width/height, log-uniform in [1/2, 2]
        if aspect >= 1:
            width, height = long_side, max(16, round(long_side / aspect))
        else:
            width, height = max(16, round(long_side * aspect)), long_side
        kind = "graphic" if rng.random() < 0.25 else "photo"
        specs.append(ImageSpec(kind, width, height))
    return specs


def _gradient(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """float32 HxWx3 smooth colour field: a linear ramp between two random colours plus a low-frequency wave."""
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    start, end = rng.uniform(0, 255, 3).astype(np.float32), rng.uniform(0, 255, 3).astype(np.float32)
    angle = rng.uniform(0, np.pi)
    ramp = np.cos(angle) * x + np.sin(angle) * y
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    field = start + (end - start) * ramp
    frequency = rng.uniform(1.0, 4.0, 2).astype(np.float32)
    wave = np.sin(2 * np.pi * frequency[0] * x + rng.uniform(0, 6.3)) * np.cos(2 * np.pi * frequency[1] * y)
    return field + 30.0 * wave


def _draw_shapes(image: Image.Image, count: int, rng: np.random.Generator, *, text: bool) -> None:
    """Random ellipses, rectangles and lines (and optionally text) drawn in place."""
    draw = ImageDraw.Draw(image)
    width, height = image.size
    for _ in range(count):
        x0, x1 = sorted(rng.integers(0, width, 2).tolist())
        y0, y1 = sorted(rng.integers(0, height, 2).tolist())
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = int(rng.integers(0, 3))
        if shape == 0:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif shape == 1:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(1, 12)))
    if text:
        size = max(10, height // 20)
        for _ in range(int(rng.integers(3, 9))):
            position = (int(rng.integers(0, max(1, width - 200))), int(rng.integers(0, max(1, height - size))))
            draw.text(position, "Sample caption TEXT 123", fill=(0, 0, 0), font_size=size)


def photo_like(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Gradient + blurred shapes + Gaussian noise: compresses like a photo saved as PNG."""
    base = Image.fromarray(np.clip(_gradient(width, height, rng), 0, 255).astype(np.uint8), "RGB")
    _draw_shapes(base, int(rng.integers(4, 12)), rng, text=False)
    base = base.filter(ImageFilter.GaussianBlur(radius=max(1.0, min(width, height) / 300)))
    pixels = np.asarray(base, dtype=np.float32)
    sigma = float(rng.uniform(1.0, 6.0))
    pixels = pixels + rng.standard_normal(pixels.shape, dtype=np.float32) * sigma
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def graphic_like(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Flat background, sharp shapes and text: compresses like a screenshot or banner."""
    background = tuple(int(c) for c in rng.integers(180, 256, 3))
    image = Image.new("RGB", (width, height), background)
    _draw_shapes(image, int(rng.integers(5, 15)), rng, text=True)
    return image


def make_image(spec: ImageSpec, rng: np.random.Generator) -> Image.Image:
    """The PIL image for one spec, already in the mode it is saved in."""
    if spec.kind == "graphic":
        return graphic_like(spec.width, spec.height, rng)
    photo = photo_like(spec.width, spec.height, rng)
    if spec.kind == "rgba":
        # Alpha: a horizontal ramp, a fully transparent block and an opaque band, so every blend case occurs.
        alpha = np.tile(np.linspace(0, 255, spec.width, dtype=np.float32), (spec.height, 1))
        alpha[: spec.height // 6, :] = 255
        alpha[spec.height // 2 : spec.height // 2 + spec.height // 5, : spec.width // 4] = 0
        rgba = np.dstack([np.asarray(photo), np.rint(alpha).astype(np.uint8)])
        return Image.fromarray(rgba, "RGBA")
    if spec.kind == "palette":
        palette = photo.quantize(colors=64, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        palette.info["transparency"] = 2  # one palette index is transparent -> the blend-onto-white path
        return palette
    if spec.kind == "gray":
        return photo.convert("L")
    return photo  # photo and jpeg


def write_corpus(directory: Path, count: int, seed: int) -> list[Path]:
    """Write `count` images into `directory`; returns the paths in corpus order."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index, spec in enumerate(plan_corpus(count, rng)):
        # A child generator per image: one image's content does not shift the next one's.
        image = make_image(spec, np.random.default_rng([seed, index]))
        path = directory / spec.file_name(index)
        if spec.kind == "jpeg":
            image.save(path, format="JPEG", quality=90)
        elif spec.kind == "palette":
            image.save(path, format="PNG", transparency=image.info["transparency"])
        else:
            image.save(path, format="PNG")  # Pillow's default compress_level 6, as most web encoders
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="output folder (created if missing)")
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT, help=f"number of images (default {DEFAULT_COUNT})")
    parser.add_argument("--seed", type=int, default=1234, help="random seed (default 1234)")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    paths = write_corpus(args.directory, args.count, args.seed)
    total_bytes = sum(path.stat().st_size for path in paths)
    print(f"wrote {len(paths)} images, {total_bytes / 1e6:.1f} MB, to {args.directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
