"""Aspect-ratio buckets: picture sizes of about one training area, as kohya's BucketManager and OneTrainer define
them, so that a portrait trains as a portrait instead of a square cut out of it.

For a training size S the buckets are the (width, height) pairs whose sides are multiples of a step (64 at S >= 512,
S / 8 below, as the tiny test models need), whose area is at most S x S and as near it as the step allows, and whose
long side is at most MAX_ASPECT times the short one. For 512: 384x640, 448x576, 512x512, 576x448, 640x384; for
1024 the same rule gives SDXL's own list (768x1344, 832x1216, 896x1152, 960x1088, 1024x1024 and their turns). A
picture goes to the bucket nearest its aspect (by the log of the ratio, so that tall and wide count alike), and is
resized to cover it and cropped minimally, around its centre."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from PIL import Image, ImageOps

MAX_ASPECT = 2.0  # the longest side at most twice the shortest: SDXL's list, clipped at its 2:1 end
Size = tuple[int, int]  # (width, height) in pixels


def bucket_step(size: int) -> int:
    """The sides' step: 64 pixels (8 latent cells) at the usual sizes, size / 8 for small test sizes, multiples of 8."""
    return max(8, min(64, size // 8) // 8 * 8)


def bucket_sizes(size: int) -> list[Size]:
    """The buckets of a training size, narrowest first: each short side in steps up to the size, the longest side
    in steps that keeps the area at most size x size, kept where the aspect is at most MAX_ASPECT, standing and
    lying."""
    step, area = bucket_step(size), size * size
    found = {(size, size)}
    for short in range(step, size + 1, step):
        long = area // short // step * step
        if long >= short and long <= MAX_ASPECT * short:
            found |= {(short, long), (long, short)}
    return sorted(found, key=lambda wh: wh[0] / wh[1])


def by_nearness(width: int, height: int, buckets: Sequence[Size]) -> list[Size]:
    """The buckets, the one whose aspect is nearest the picture's first (log ratio: 2:1 and 1:2 are equally far
    from square; of two equally near, the larger)."""
    aspect = math.log(max(1, width) / max(1, height))
    return sorted(buckets, key=lambda wh: (abs(math.log(wh[0] / wh[1]) - aspect), -wh[0] * wh[1]))


def nearest_bucket(width: int, height: int, buckets: Sequence[Size]) -> Size:
    """The bucket whose aspect is nearest the picture's."""
    return by_nearness(width, height, buckets)[0]


def choose_buckets(pictures: Sequence[Size], size: int, on: bool) -> list[Size]:
    """Each picture's training size: its nearest bucket, or the size x size square with buckets off."""
    if not on:
        return [(size, size)] * len(pictures)
    buckets = bucket_sizes(size)
    return [nearest_bucket(width, height, buckets) for width, height in pictures]


def per_picture(size: int | Sequence[Size], count: int) -> list[Size]:
    """Each of `count` pictures' training size: `size` as given (one per picture), or an int's square for all."""
    return [(size, size)] * count if isinstance(size, int) else list(size)


def most_common(chosen: Sequence[Size]) -> Size:
    """The bucket most pictures use (on a tie, the squarest, then the widest): where previews are drawn."""
    counts = Counter(chosen)
    return max(counts, key=lambda wh: (counts[wh], -abs(math.log(wh[0] / wh[1])), wh[0]))


def cover_crop(width: int, height: int, bucket: Size) -> tuple[float, tuple[int, int]]:
    """How a width x height picture is fitted to a bucket: the scale that makes it cover the bucket, and the
    top-left corner (left, top) of the bucket in the scaled picture (the excess cut evenly on both sides)."""
    scale = max(bucket[0] / max(1, width), bucket[1] / max(1, height))
    left = round((width * scale - bucket[0]) / 2)
    top = round((height * scale - bucket[1]) / 2)
    return scale, (max(0, left), max(0, top))


def fit(image: Image.Image, bucket: Size, resample: int = Image.LANCZOS) -> Image.Image:
    """The picture resized to cover the bucket and cropped to it around its centre (a minimal crop)."""
    return ImageOps.fit(image, bucket, method=resample, centering=(0.5, 0.5))


def describe(chosen: Sequence[Size]) -> str:
    """'3 x 384x640, 2 x 512x512': how many pictures each bucket holds, the fullest first."""
    counts = Counter(chosen)
    return ", ".join(f"{n} x {w}x{h}" for (w, h), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
