"""Time `tistudio prepare` per photo on phone-sized photos.

    python bench/prepare.py [--count 12] [--megapixels 12]

Makes `count` JPEGs of the given size from the two real test portraits (enlarged, shifted, re-lit, quality 92:
what a phone writes), runs prepare with face crops and mirrored copies, and prints seconds per photo for a first
run and for an unchanged rerun. Timings depend on the machine: state where you ran it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageEnhance

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=12)
    parser.add_argument("--megapixels", type=float, default=12.0)
    args = parser.parse_args()
    from tistudio.config import PrepareOptions
    from tistudio.prepare.preprocess import prepare

    width = int((args.megapixels * 1e6 * 4 / 3) ** 0.5)
    height = width * 3 // 4
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as folder:
        photos = Path(folder) / "photos"
        photos.mkdir()
        sources = [
            Image.open(ROOT / "tests" / "data" / name).convert("RGB") for name in ("astronaut.jpg", "grace_hopper.jpg")
        ]
        for index in range(args.count):
            base = sources[index % 2]
            canvas = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
            portrait = base.resize((height * base.width // base.height, height), Image.BICUBIC)
            canvas.paste(portrait, (rng.randrange(0, max(1, width - portrait.width)), 0))
            canvas = ImageEnhance.Brightness(canvas).enhance(rng.uniform(0.7, 1.2))
            canvas.save(photos / f"photo-{index:02d}.jpg", quality=92)
        options = PrepareOptions(photos=str(photos), out=str(Path(folder) / "out"), size=512, flip=True)
        started = time.perf_counter()
        first = prepare(options)
        first_s = time.perf_counter() - started
        started = time.perf_counter()
        prepare(options)
        rerun_s = time.perf_counter() - started
    faces = sum(1 for item in first.items if item.faces)
    result = {
        "photos": args.count,
        "size": f"{width}x{height}",
        "faces_found": faces,
        "seconds_per_photo": round(first_s / args.count, 3),
        "rerun_seconds_per_photo": round(rerun_s / args.count, 3),
        "cpu_count": os.cpu_count(),
    }
    print(
        f"{args.count} photos of {width}x{height} ({args.megapixels:g} MP): {result['seconds_per_photo']} s per "
        f"photo (faces found in {faces}); unchanged rerun {result['rerun_seconds_per_photo']} s per photo"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
