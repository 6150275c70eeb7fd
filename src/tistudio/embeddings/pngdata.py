"""An embedding kept in a picture's pixels, in the layout A1111 reads when a PNG has no ``sd-ti-embedding`` text
(sites that strip metadata keep the pixels).

The layout, as A1111's loader reads it: the zlib-compressed JSON is split into nibbles; the low nibbles fill a
strip left of the picture, the high nibbles one right of it, each strip ``height`` rows by as many columns as it
needs, 3 bytes a pixel, row by row. Each strip's nibbles are XORed with A1111's noise (its LCG, ``seed ← (1664525
× seed + 1013904223) mod 2³²``, each value ``seed mod 255``, low 4 bits, restarted for each strip). One black
column separates each strip from the picture. A pixel's high nibble is free: here a pattern that keeps every strip
pixel non-black, so the reader's border crop and separator search see the strips whole.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

LCG_A, LCG_C, LCG_M = 1664525, 1013904223, 2**32
MAX_PIXELS = 3000 * 3000  # pictures larger than this are not decoded to look for data in them
# The most an embedding's JSON (A1111's form: each tensor as nested lists) can be: 75 vectors of 2048 floats (SDXL's
# 768 + 1280) at about 24 characters each is 3.7 MB. Anything that unpacks to more is not an embedding: it is refused
# before it is decoded (a 48 KB PNG unpacking to 64 MB of JSON took 9 s and 1.45 GB to refuse).
MAX_PAYLOAD = 5 * 1024 * 1024
BLOCK = 4096


def noise(count: int) -> np.ndarray:
    """A1111's XOR noise: the first `count` values of its LCG from seed 0, mod 255, low 4 bits. Computed a block
    at a time: `BLOCK` steps of the LCG are one affine map, applied to a whole block of seeds at once."""
    first = np.empty(min(count, BLOCK) or 1, dtype=np.uint64)
    seed = 0
    for index in range(first.size):
        seed = (LCG_A * seed + LCG_C) % LCG_M
        first[index] = seed
    jump_a, jump_c = 1, 0
    for _ in range(BLOCK):
        jump_a, jump_c = (LCG_A * jump_a) % LCG_M, (LCG_A * jump_c + LCG_C) % LCG_M
    blocks, current = [first], first
    for _ in range(1, -(-count // BLOCK)):
        current = (current * np.uint64(jump_a) + np.uint64(jump_c)) & np.uint64(LCG_M - 1)
        blocks.append(current)
    seeds = np.concatenate(blocks)[:count]
    return ((seeds % np.uint64(255)) & np.uint64(0x0F)).astype(np.uint8)


def _strip(nibbles: np.ndarray, mask: np.ndarray, shade: np.ndarray) -> np.ndarray:
    height, columns = shade.shape
    return (nibbles ^ mask).reshape(height, columns, 3) | shade.reshape(height, columns, 1)


def _shade(height: int, columns: int, phase: int) -> np.ndarray:
    """A quiet diagonal pattern for the free high nibbles: 1..15, never 0."""
    rows, cols = np.indices((height, columns))
    return ((((rows // 4 + cols + phase) % 15) + 1) << 4).astype(np.uint8)


def hide(picture: Any, payload: bytes) -> Any:
    """`picture` (a PIL image) widened by the two data strips that hold `payload`."""
    from PIL import Image

    rgb = np.asarray(picture.convert("RGB"), dtype=np.uint8)
    height, width = rgb.shape[:2]
    data = np.frombuffer(zlib.compress(payload, 9), dtype=np.uint8)
    columns = -(-data.size // (height * 3))
    padded = np.zeros(height * columns * 3, dtype=np.uint8)  # zeros after the stream: zlib stops at its end
    padded[: data.size] = data
    mask = noise(padded.size)  # both strips are the same size, so they share the noise
    canvas = np.zeros((height, 2 * columns + width + 2, 3), dtype=np.uint8)
    canvas[:, :columns] = _strip(padded & 0x0F, mask, _shade(height, columns, 0))
    canvas[:, columns + 1 : columns + 1 + width] = rgb
    canvas[:, columns + 2 + width :] = _strip(padded >> 4, mask, _shade(height, columns, 7))
    return Image.fromarray(canvas, mode="RGB")


def png_size(path: Path) -> tuple[int, int] | None:
    """A PNG's width and height from its header, without decoding anything."""
    with open(path, "rb") as handle:
        head = handle.read(24)
    if len(head) < 24 or head[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def find(path: Path) -> bytes | None:
    """The payload hidden in a PNG's pixels, or None when it holds none (a plain picture). Pictures over
    MAX_PIXELS are not decoded; the payload may unpack to at most MAX_PAYLOAD bytes."""
    from PIL import Image

    size = png_size(path)
    if size is None or size[0] * size[1] > MAX_PIXELS or size[0] < 5:
        return None
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    lit = (rgb > 0).all(axis=2)
    rows, cols = np.flatnonzero(lit.any(axis=1)), np.flatnonzero(lit.any(axis=0))
    if rows.size == 0:
        return None
    low = rgb[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] & 0x0F  # the reader's crop of black borders
    dark = np.flatnonzero(low.sum(axis=(0, 2)) == 0)
    if dark.size < 2:
        return None
    lower, upper = low[:, : dark[0]], low[:, dark[-1] + 1 :]
    if lower.shape != upper.shape or lower.size == 0:
        return None
    mask = noise(upper.size)
    joined = ((upper.reshape(-1) ^ mask) << 4) | (lower.reshape(-1) ^ mask)
    inflater = zlib.decompressobj()
    try:
        payload = inflater.decompress(joined.astype(np.uint8).tobytes(), MAX_PAYLOAD)
    except zlib.error:
        return None
    if inflater.unconsumed_tail:
        raise ValueError(f"the data in its pixels unpacks to more than an embedding can be ({MAX_PAYLOAD // 2**20} MB)")
    if not inflater.eof:
        return None
    return payload
