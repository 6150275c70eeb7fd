"""Test helper: the corner-case image files phones, cameras and downloads produce, generated on the fly."""

from __future__ import annotations

import random
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def exif_rotated(path: Path) -> None:
    """A 40x80 portrait stored as 80x40 landscape with EXIF orientation 6 (rotate 90° clockwise to view)."""
    image = Image.new("RGB", (80, 40), (200, 0, 0))
    image.paste((0, 0, 200), (0, 0, 40, 40))  # left half blue: after rotation it is the top half
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, exif=exif)


def png_bomb(path: Path, side: int = 30000) -> None:
    """A tiny PNG whose header claims side x side pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def bad_files(folder: Path, good: Path) -> set[str]:
    """Write the unusable kinds into folder; returns their names."""
    data = good.read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "zero-byte.jpg").write_bytes(b"")
    Image.new("RGB", (1, 1)).save(folder / "one-pixel.png")
    png_bomb(folder / "bomb.png")
    (folder / "fake.jpg").write_text("not an image at all")
    (folder / "loop-a.jpg").symlink_to(folder / "loop-b.jpg")
    (folder / "loop-b.jpg").symlink_to(folder / "loop-a.jpg")
    return {"truncated.jpg", "zero-byte.jpg", "one-pixel.png", "bomb.png", "fake.jpg", "loop-a.jpg", "loop-b.jpg"}


def odd_but_good_files(folder: Path, base: Image.Image) -> set[str]:
    """Write the awkward-but-usable kinds (EXIF rotation, CMYK, 16-bit, palette with alpha); returns names."""
    exif = Image.Exif()
    exif[0x0112] = 6
    base.rotate(90, expand=True).save(folder / "exif-rotated.jpg", exif=exif)
    base.convert("CMYK").save(folder / "cmyk.jpg")
    grey = np.asarray(base.convert("L"), dtype=np.uint16) * 257
    Image.fromarray(grey).save(folder / "sixteen-bit.png")
    base.convert("P").save(folder / "palette-alpha.png", transparency=0)
    return {"exif-rotated.jpg", "cmyk.jpg", "sixteen-bit.png", "palette-alpha.png"}


def draw_toy(rng: random.Random, size: int = 96) -> Image.Image:
    """Test helper: a toy figure (round head, eyes, red cap) in a random pose, place, light and background."""
    background = tuple(rng.randrange(40, 220) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    cx, cy = rng.randrange(36, size - 36), rng.randrange(40, size - 30)
    radius = rng.randrange(18, 26)
    draw.rectangle([cx - radius // 2, cy + radius - 4, cx + radius // 2, cy + 2 * radius], fill=(40, 90, 200))
    draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=(240, 200, 160))
    for side in (-1, 1):
        ex = cx + side * radius // 3
        draw.ellipse([ex - 3, cy - 5, ex + 3, cy + 1], fill=(20, 20, 20))
    draw.chord([cx - radius, cy - radius - 6, cx + radius, cy + radius // 2], 180, 360, fill=(210, 30, 40))
    image = image.rotate(rng.uniform(-15, 15), resample=Image.BICUBIC, fillcolor=background)
    light = rng.uniform(0.7, 1.25)
    image = image.point(lambda v: max(0, min(255, int(v * light))))
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.8)))


SHAPES = {"tall": (40, 70), "wide": (70, 40), "square": (60, 60)}  # at size 64, buckets 48x80, 80x48 and 64x64


def shaped_photos(folder: Path, per_shape: int = 3) -> Path:
    """Toy photos of three shapes (aspect-ratio buckets, issue 32)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(5)
    for kind, size in SHAPES.items():
        for index in range(per_shape):
            draw_toy(rng).resize(size, Image.LANCZOS).save(folder / f"{kind}-{index}.png")
    return folder


def make_photos(folder: Path, count: int = 10, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for index in range(count):
        draw_toy(rng).save(folder / f"{index:02d}-toy figure.png")
    (folder / "00-toy figure.txt").write_text("toy figure, red cap, blue shirt", "utf-8")
    return folder
