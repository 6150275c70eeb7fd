"""``tistudio prepare``: a folder of ordinary photos becomes a training set, with a report on what is wrong with it.

Every file of the photo folder is read by its content (JPEG, PNG, WebP, HEIC with pillow-heif, any size), with
its EXIF orientation applied and odd colour modes converted (see dataset.read_image); files that are not usable
images are listed with the reason. The photo folder is only read.

Each photo is cropped to a square around the largest face (tistudio's MTCNN detector) - ``face`` frames the
head, ``head-and-shoulders`` more of the person, ``center`` is a plain centre crop - or, when no face is found,
around its most detailed region (edges and entropy); very wide or tall photos can be split into overlapping
squares instead. The square is resized with Lanczos to the output size; enlarging more than ``max_upscale``
leaves the photo out as too small. With aspect-ratio buckets (``--buckets``: on at SDXL's size by default; see
bucket_frame) the crop is a rectangle of the bucket nearest the photo's aspect instead, written at that bucket's
size. Captions come from an ``IMAGE.txt`` beside the photo and/or the file name.

A report - in the terminal and as ``report.html`` with thumbnails - gives per image the face and its size, the
sharpness (variance of the Laplacian), the enlargement and near-duplicates (a perceptual hash), and for the set
a plain-language verdict: too few or too many images, blurry ones, repeated photos, the same pose or the same
background over and over. ``manifest.json`` records every source file, its hash, what was done and why; running
again reuses what is done and redoes only what changed.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import re
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from tistudio.config import PrepareOptions, validate_prepare
from tistudio.errors import DatasetError, OptionError
from tistudio.prepare.buckets import bucket_sizes, by_nearness
from tistudio.prepare.buckets import describe as describe_buckets
from tistudio.prepare.dataset import (
    CAPTION_SUFFIXES,
    decode_image,
    filename_words,
    is_mask_file,
    mask_file,
    photo_mask,
    sidecar_caption,
)
from tistudio.progress import Event, Progress, Reporter
from tistudio.storage import atomic_write, file_sha256, write_json, write_text

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
FACE_SCORE = 0.9  # MTCNN confidence below which a detection is not trusted
BLUR_ABSOLUTE = 60.0  # variance of the Laplacian on a 512 px grey image
BLUR_RELATIVE = 0.35  # ... or this fraction of the set's median
DUPLICATE_BITS = 6  # perceptual-hash bits (of 64) that may differ between "the same photo"
# ... and then their 32x32 grey thumbnails must correlate this well: small, simple pictures (the demo's 64-px
# cartoons in varied poses) share hashes 4-6 bits apart while correlating 0.75-0.94; a re-saved, resized, brighter
# or more contrasted copy of a photo correlates 0.997 or more
SAME_LOOK = 0.98
WARN_UPSCALE = 1.25


@dataclass
class Item:
    """What happened to one source file."""

    source: str
    sha256: str = ""
    status: str = "ok"  # ok, skipped
    reason: str = ""
    outputs: list[str] = field(default_factory=list)
    caption: str = ""
    original_size: tuple[int, int] = (0, 0)
    faces: int = 0
    face_box: tuple[float, float, float, float] | None = None
    face_fraction: float = 0.0  # face height / crop side
    yaw: str = ""
    crop: tuple[int, int, int, int] | None = None  # in source pixels
    framing: str = ""  # face, head-and-shoulders, center, focal, split
    upscale: float = 1.0
    sharpness: float = 0.0
    phash: str = ""
    look: str = ""  # the photo's 32x32 grey thumbnail (base64), to confirm a near hash is the same photo
    background: tuple[float, float, float] = (0.0, 0.0, 0.0)
    notes: list[str] = field(default_factory=list)
    identity: list[float] | None = None  # the face's descriptor (prepare/identity.py), where it was described
    person_distance: float | None = None  # its average distance to the set's main person's other faces
    other_person: bool = False  # the face is not the set's main person's
    mask: str = ""  # where the photo's mask came from ("alpha channel", or its mask file's name); "" none
    mask_sha256: str = ""  # the mask file's hash (a changed mask is prepared again, like a changed photo)
    bucket: tuple[int, int] | None = None  # the pictures' (width, height): the photo's bucket, or the square


@dataclass
class PrepareResult:
    out: Path
    items: list[Item]
    verdict: list[str]
    processed: int
    reused: int
    removed: int
    report: Path

    @property
    def usable(self) -> list[Item]:
        return [i for i in self.items if i.status == "ok"]


# ----------------------------------------------------------------------------------------------------------------
# Pure image measurements


def laplacian_variance(image: Image.Image) -> float:
    """Sharpness: variance of the Laplacian of the grey image at 512 px, or at its own size where it is smaller
    (low means blurry). A small image is never enlarged for it: the 64-px demo's crisp photos measured 1-2 at 512
    px, far under the blur limit, and 1,000-2,500 at their own size; an enlargement is reported on its own."""
    grey = image.convert("L")
    side = min(512, max(grey.size))
    if grey.size != (side, side):
        grey = grey.resize((side, side), Image.BILINEAR)
    array = np.asarray(grey, dtype=np.float64)
    lap = -4 * array[1:-1, 1:-1] + array[:-2, 1:-1] + array[2:, 1:-1] + array[1:-1, :-2] + array[1:-1, 2:]
    return float(lap.var())


def perceptual_hash(image: Image.Image) -> str:
    """A 64-bit DCT hash (pHash): photos that look the same have hashes a few bits apart."""
    small = np.asarray(image.convert("L").resize((32, 32), Image.LANCZOS), dtype=np.float64)
    n = np.arange(32)
    basis = np.cos(np.pi * (2 * n[None, :] + 1) * n[:, None] / 64)
    low = (basis @ small @ basis.T)[:8, :8].flatten()
    bits = low[1:] > np.median(low[1:])
    value = 0
    for bit in bits:
        value = (value << 1) | int(bit)
    return f"{value:016x}"


def hash_distance(a: str, b: str) -> int:
    return bin(int(a, 16) ^ int(b, 16)).count("1")


def thumbnail_look(image: Image.Image) -> str:
    """The photo's 32x32 grey thumbnail as base64 (1,368 characters in the manifest)."""
    small = image.convert("L").resize((32, 32), Image.LANCZOS)
    return base64.b64encode(small.tobytes()).decode("ascii")


def look_correlation(a: str, b: str) -> float:
    """How alike two thumbnails are, brightness and contrast aside: 1 for the same picture."""
    x, y = (np.frombuffer(base64.b64decode(v), dtype=np.uint8).astype(np.float64) for v in (a, b))
    x, y = x - x.mean(), y - y.mean()
    norm = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(x @ y / norm) if norm > 0 else float(np.array_equal(x, y))


def same_photo(a: Item, b: Item) -> bool:
    """Near-identical hashes, confirmed by the thumbnails where both were recorded (an older manifest has none)."""
    if hash_distance(a.phash, b.phash) > DUPLICATE_BITS:
        return False
    return not (a.look and b.look) or look_correlation(a.look, b.look) >= SAME_LOOK


def border_colour(image: Image.Image) -> tuple[float, float, float]:
    """Mean colour of the outer 12% of a square image: a cheap stand-in for 'the background'."""
    array = np.asarray(image.convert("RGB").resize((64, 64), Image.BILINEAR), dtype=np.float64)
    mask = np.ones((64, 64), dtype=bool)
    mask[8:56, 8:56] = False
    return tuple(float(v) for v in array[mask].mean(axis=0))  # type: ignore[return-value]


def focal_offset(image: Image.Image, side: int) -> tuple[int, int]:
    """Top-left corner of the side x side square with the most detail (edges + entropy) along the long axis."""
    width, height = image.size
    if width == height:
        return 0, 0
    scale = 256 / max(width, height)
    grey = image.convert("L").resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BILINEAR)
    edges = np.asarray(grey.filter(ImageFilter.FIND_EDGES), dtype=np.float64)
    values = np.asarray(grey)
    window = max(1, round(side * scale))
    horizontal = width > height
    span = (grey.width if horizontal else grey.height) - window
    best, best_score = 0, -1.0
    positions = sorted({round(span * k / 24) for k in range(25)})
    scores = []
    for position in positions:
        part = (
            (slice(None), slice(position, position + window))
            if horizontal
            else (slice(position, position + window), slice(None))
        )
        histogram = np.bincount(values[part].ravel() // 8, minlength=32) / values[part].size
        entropy = -float(np.sum(histogram[histogram > 0] * np.log2(histogram[histogram > 0])))
        scores.append((float(edges[part].mean()), entropy))
    edge_max = max(s[0] for s in scores) or 1.0
    entropy_max = max(s[1] for s in scores) or 1.0
    for position, (edge, entropy) in zip(positions, scores, strict=True):
        score = edge / edge_max + 0.5 * entropy / entropy_max
        if score > best_score:
            best, best_score = position, score
    offset = round(best / scale)
    offset = min(max(0, offset), (width if horizontal else height) - side)
    return (offset, 0) if horizontal else (0, offset)


def face_square(
    face_box: tuple[float, float, float, float], framing: str, width: int, height: int, min_side: float = 0.0
) -> tuple[int, ...]:
    """The square (x1, y1, x2, y2) that frames a face: the head, or head and shoulders, clamped to the image.

    The square is at least min_side wide (so that a small photo is framed wider rather than enlarged a lot)."""
    x1, y1, x2, y2 = face_box
    face = max(x2 - x1, y2 - y1)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    if framing == "face":
        side, cy = 2.0 * face, cy - 0.1 * face  # hair above, chin and a little neck below
    else:
        side, cy = 3.4 * face, cy + 0.6 * face  # shoulders below
    side = min(max(side, min_side), width, height)
    left = min(max(0.0, cx - side / 2), width - side)
    top = min(max(0.0, cy - side / 2), height - side)
    return round(left), round(top), round(left + side), round(top + side)


def split_squares(width: int, height: int, overlap: float = 0.2) -> list[tuple[int, int, int, int]]:
    """Overlapping squares along the long side of a very wide or tall image (A1111's split)."""
    side = min(width, height)
    length = max(width, height)
    count = max(2, math.ceil((length - side * overlap) / (side * (1 - overlap))))
    step = (length - side) / (count - 1)
    boxes = []
    for index in range(count):
        start = round(index * step)
        boxes.append((start, 0, start + side, side) if width > height else (0, start, side, start + side))
    return boxes


def make_caption(source: Path, action: str) -> str:
    """A prepared photo's caption: the source's own caption (dataset.caption_for's sidecar) and the words of
    its file name, combined as caption_action says."""
    existing = sidecar_caption(source) or ""
    generated = filename_words(source.stem)
    if action == "copy":
        return existing or generated
    if action == "prepend":
        return f"{existing} {generated}".strip()
    if action == "append":
        return f"{generated} {existing}".strip()
    return generated


# ----------------------------------------------------------------------------------------------------------------
# The job


def _output_stem(source: Path, taken: set[str]) -> str:
    stem = re.sub(r"[^\w.-]+", "_", source.stem).strip("._") or "image"
    candidate, number = stem, 2
    while candidate.lower() in taken:
        candidate, number = f"{stem}-{number}", number + 1
    taken.add(candidate.lower())
    return candidate


def _save(image: Image.Image, path: Path) -> None:
    atomic_write(path, lambda temp: image.save(temp, format="PNG"))


def process_photo(
    source: Path, out: Path, stem: str, options: PrepareOptions, detector: Any, identity: Any = None
) -> Item:
    """Crop, resize and measure one photo; writes its outputs (and captions) into `out`. With an `identity`
    (identity.FaceIdentity), the largest face is described, if it is large enough to tell who it is."""
    item = Item(source=source.name)
    image, transparency, original = decode_image(source, alpha=True)
    mask = photo_mask(source, image, transparency)  # DatasetError for an unreadable or misshapen mask file
    if mask is not None:
        beside = mask_file(source)
        item.mask = beside.name if beside else "alpha channel"
        item.mask_sha256 = mask_digest(source)
        item.notes.append(f"its mask ({item.mask}) is cut with it and written beside the prepared picture")
    item.original_size = original
    to_original = original[0] / image.width  # read_image may have reduced a very large photo
    width, height = image.size
    squares: list[tuple[int, ...]] = []
    face_box = None  # the largest face, in `image`'s pixels
    if options.crop != "center" and detector is not None:
        faces = [f for f in detector.detect(image) if f.score >= FACE_SCORE]
        item.faces = len(faces)
        if faces:
            face = max(faces, key=lambda f: f.width * f.height)
            face_box = face.box
            item.face_box = tuple(round(v * to_original, 1) for v in face.box)  # type: ignore[assignment]
            item.yaw = face.yaw()
            least = options.size / options.max_upscale / to_original  # widest enlargement allowed, in these pixels
            squares = [face_square(face.box, options.crop, width, height, min_side=least)]
            item.framing = options.crop
            if (
                squares[0][2] - squares[0][0]
                > face_square(face.box, options.crop, width, height)[2]
                - face_square(face.box, options.crop, width, height)[0]
                + 1
            ):
                item.notes.append(
                    f"framed wider than '{options.crop}' to avoid enlarging more than {options.max_upscale:g}x"
                )
            item.face_fraction = round(face.height / (squares[0][2] - squares[0][0]), 3)
            if len(faces) > 1:
                item.notes.append(f"{len(faces)} faces: used the largest")
            if identity is not None:
                describe_face(item, identity, image, face.box)
    if not squares:
        side = min(width, height)
        if options.split and side / max(width, height) <= 0.5:
            squares, item.framing = split_squares(width, height), "split"
        elif options.crop == "center":
            left, top = (width - side) // 2, (height - side) // 2
            squares, item.framing = [(left, top, left + side, top + side)], "center"
        else:
            left, top = focal_offset(image, side)
            squares, item.framing = [(left, top, left + side, top + side)], "focal"
            item.notes.append("no face found: cropped around the most detailed region")
    bucket = (options.size, options.size)
    if bucketed(options) and item.framing != "split":
        bucket, squares[0] = bucket_frame(squares[0], item.framing, width, height, options.size, face_box)
    item.bucket = bucket
    side_original = (squares[0][2] - squares[0][0]) * to_original
    item.upscale = round(bucket[0] / side_original, 3)
    if item.upscale > options.max_upscale:
        raise DatasetError(
            f"too small: the crop is {side_original:.0f} px and would need enlarging "
            f"{item.upscale:.1f}x to {bucket[0]} px (at most {options.max_upscale:g}x); use a larger "
            "photo"
        )
    if item.upscale > WARN_UPSCALE:
        item.notes.append(f"small: enlarged {item.upscale:.1f}x")
    item.crop = tuple(round(v * to_original) for v in squares[0])  # type: ignore[assignment]
    item.caption = make_caption(source, options.caption_action)
    item.phash = perceptual_hash(image)
    item.look = thumbnail_look(image)
    outputs = []
    for index, square in enumerate(squares):
        crop = image.crop(square).resize(bucket, Image.LANCZOS)
        name = stem if len(squares) == 1 else f"{stem}-{index + 1}"
        outputs.append((name, crop))
        if options.flip:
            outputs.append((f"{name}-flip", ImageOps.mirror(crop)))
    first = outputs[0][1]
    item.sharpness = round(laplacian_variance(first), 1)
    item.background = tuple(round(v, 1) for v in border_colour(first))  # type: ignore[assignment]
    masks = square_masks(mask, squares, bucket, options.flip) if mask is not None else [None] * len(outputs)
    for (name, picture), cut in zip(outputs, masks, strict=True):
        _save(picture, out / f"{name}.png")
        item.outputs.append(f"{name}.png")
        if item.caption:
            write_text(out / f"{name}.txt", item.caption + "\n")
            item.outputs.append(f"{name}.txt")
        if cut is not None:
            _save(cut, out / f"{name}.mask.png")
            item.outputs.append(f"{name}.mask.png")
    return item


SDXL_SIZE = 1024  # --buckets auto: buckets from this size up (SDXL's), squares below (SD1's 512, SD2's 768)


def bucketed(options: PrepareOptions) -> bool:
    """Whether prepare cuts aspect-ratio buckets (--buckets, auto: at SDXL's size and above) or squares."""
    return options.buckets == "on" or (options.buckets == "auto" and options.size >= SDXL_SIZE)


def square_masks(
    mask: Image.Image, squares: list[tuple[int, ...]], size: tuple[int, int], flip: bool
) -> list[Image.Image | None]:
    """A photo's mask cut and resized as its pictures were (and mirrored for their -flip copies), in the order of
    the outputs, so that training weighs the prepared pictures where the photo said its subject is."""
    cuts: list[Image.Image | None] = []
    for square in squares:
        cut = mask.crop(square).resize(size, Image.BILINEAR)
        cuts += [cut, ImageOps.mirror(cut)] if flip else [cut]
    return cuts


def bucket_frame(
    square: tuple[int, ...],
    framing: str,
    width: int,
    height: int,
    size: int,
    face: tuple[float, float, float, float] | None,
) -> tuple[tuple[int, int], tuple[int, ...]]:
    """The bucket a photo's crop takes, and the crop: the bucket nearest the photo's aspect (prepare/buckets.py)
    whose rectangle keeps the whole face, else the next nearest; the square framing it is the square's choice."""
    for bucket in by_nearness(width, height, bucket_sizes(size)):
        box = bucket_box(square, bucket, framing, width, height)
        if face is None or contains(box, face):
            return bucket, box
    return (size, size), square


def bucket_box(
    square: tuple[int, ...], bucket: tuple[int, int], framing: str, width: int, height: int
) -> tuple[int, int, int, int]:
    """The rectangle of the bucket's aspect a framing cuts. Around a face, it has the square's area (the face keeps
    its size) and centres on it across, reaching downward where it is taller (the neck, shoulders and body are below a
    face); without one, it is the largest in the photo, centred on the square (the photo's centre, or its detail).
    Moved, and shrunk where the photo is too small, to lie inside the photo."""
    x1, y1, x2, y2 = square
    side, ratio = x2 - x1, bucket[0] / bucket[1]
    around_face = framing in ("face", "head-and-shoulders")
    if around_face:
        w, h = side * math.sqrt(ratio), side / math.sqrt(ratio)
    else:
        w, h = min(width, height * ratio), min(height, width / ratio)
    shrink = min(1.0, width / w, height / h)
    w, h = w * shrink, h * shrink
    cx = (x1 + x2) / 2
    cy = (y1 + y2) / 2 + (0.8 * max(0.0, h - side) / 2 if around_face else 0.0)
    left = min(max(0.0, cx - w / 2), width - w)
    top = min(max(0.0, cy - h / 2), height - h)
    return round(left), round(top), round(left + w), round(top + h)


def contains(box: tuple[int, ...], inner: tuple[float, float, float, float]) -> bool:
    return box[0] <= inner[0] + 1 and box[1] <= inner[1] + 1 and box[2] >= inner[2] - 1 and box[3] >= inner[3] - 1


def mask_digest(source: Path) -> str:
    """The hash of the mask file beside a photo ("" where there is none or it cannot be read)."""
    beside = mask_file(source)
    try:
        return file_sha256(beside) if beside else ""
    except OSError:
        return ""


def describe_face(item: Item, identity: Any, image: Image.Image, box: tuple[float, float, float, float]) -> None:
    from tistudio.prepare.identity import MIN_FACE_PX

    width = box[2] - box[0]
    if width < MIN_FACE_PX:
        item.notes.append(f"the face is too small to tell who it is ({width:.0f} px wide; at least {MIN_FACE_PX})")
        return
    item.identity = [round(float(v), 5) for v in identity.describe(image, box)]


def undescribed(old: dict[str, Any], identity: Any) -> bool:
    """A photo prepared before face identity was there (installed later): its face must be described now."""
    too_small = any("too small to tell who" in note for note in old.get("notes", []))
    return identity is not None and bool(old.get("face_box")) and old.get("identity") is None and not too_small


def tell_people_apart(items: list[Item]) -> list[list[Item]]:
    """Group the described faces by person (largest group first) and set each item's distance to the main
    person's faces and whether it is someone else; returns the groups."""
    from tistudio.prepare.identity import group_people

    described = [i for i in items if i.status == "ok" and i.identity]
    for item in items:
        item.person_distance, item.other_person = None, False
    if len(described) < 2:
        return [described] if described else []
    people = group_people([i.identity for i in described])
    for item, gap in zip(described, people.to_main, strict=True):
        item.person_distance = gap
    for index in people.others:
        described[index].other_person = True
    return [[described[i] for i in group] for group in people.groups]


def load_identity(choice: str) -> Any:
    """The face-identity model for prepare's --identity: None for off, or for auto without the extra."""
    from tistudio.extras import faces_available
    from tistudio.prepare.identity import FaceIdentity

    if choice == "off" or (choice == "auto" and not faces_available()):
        if choice == "auto":
            log.info("not checking who the photos show: pip install 'tistudio[faces]' to have it")
        return None
    return FaceIdentity()


def _settings(options: PrepareOptions) -> dict[str, Any]:
    return {k: v for k, v in asdict(options).items() if k not in ("photos", "out")}


def _load_manifest(path: Path, options: PrepareOptions) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        log.warning("%s is unreadable; preparing everything again", path)
        return {}
    if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION:
        return {}
    if data.get("options") != _settings(options):
        log.info("the options changed since the last run; preparing everything again")
        return {"files": {}, "stale": data.get("files", {})}
    return data


def photo_sources(photos: Path, out: Path) -> list[Path]:
    """The photos to prepare (not captions, masks, hidden files or folders), in order; refusals for a missing or
    empty photos folder, and for an output folder inside it."""
    if not photos.is_dir():
        raise DatasetError(
            f"photos folder {photos} does not exist"
            if not photos.exists()
            else f"photos {photos} is a file; pass the folder that holds your photos"
        )
    if out.resolve() == photos.resolve() or photos.resolve() in out.resolve().parents:
        raise OptionError("out", str(out), "must be outside the photos folder, which tistudio never changes")
    sources = sorted(
        p
        for p in photos.iterdir()
        if not p.name.startswith(".")
        and p.suffix.lower() not in CAPTION_SUFFIXES
        and not is_mask_file(p.name)
        and not p.is_dir()
    )
    if not sources:
        raise DatasetError(f"photos folder {photos} is empty; put 10-30 photos of your subject in it")
    return sources


def prepare_photo(
    source: Path,
    out: Path,
    old: dict[str, Any] | None,
    taken: set[str],
    options: PrepareOptions,
    detector: Any,
    identity: Any,
) -> tuple[Item, bool]:
    """One photo's item: the earlier one where the photo, its mask and its outputs are unchanged (False), else the
    photo prepared again (True; its earlier outputs deleted first). Adds its output names to `taken`."""
    try:
        digest = file_sha256(source) if source.is_file() else ""
    except OSError as exc:
        digest = ""
        log.debug("cannot hash %s: %s", source, exc)
    if (
        old
        and digest
        and old.get("sha256") == digest
        and old.get("status") == "ok"
        and all((out / name).is_file() for name in old.get("outputs", []))
        and old.get("mask_sha256", "") == mask_digest(source)
        and not undescribed(old, identity)
    ):
        tuples = ("original_size", "face_box", "crop", "background", "bucket")
        item = Item(**{k: tuple(v) if k in tuples and v else v for k, v in old.items()})
        taken.update(Path(name).stem.lower() for name in item.outputs)
        return item, False
    for name in old.get("outputs", []) if old else ():
        (out / name).unlink(missing_ok=True)
    stem = _output_stem(source, taken)
    try:
        if not source.is_file():
            raise DatasetError("not a regular file" if source.exists() else "a broken or looping symbolic link")
        item = process_photo(source, out, stem, options, detector, identity)
    except DatasetError as exc:
        item = Item(source=source.name, status="skipped", reason=str(exc))
    item.sha256 = digest
    return item, True


def remove_stale_outputs(out: Path, earlier: dict[str, Any], items: list[Item]) -> int:
    """Delete the outputs of earlier items (the manifest's, and those it noted as stale) that no item keeps now;
    returns how many."""
    keep = {name for item in items for name in item.outputs}
    removed = 0
    for name, old in earlier.items():
        for output in old.get("outputs", []):
            if output not in keep and (out / output).is_file():
                (out / output).unlink()
                removed += 1
        if name not in {i.source for i in items}:
            log.info("%s is no longer in the photos folder; its outputs were removed", name)
    return removed


def prepare(
    options: PrepareOptions,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    stop: threading.Event | None = None,
    detector: Any = None,
    identity: Any = None,
) -> PrepareResult:
    """Prepare (or update) a training set from a folder of photos; on_progress hears an Event.STEP per photo."""
    validate_prepare(options)
    report = Reporter(on_progress)
    photos, out = Path(options.photos).expanduser(), Path(options.out).expanduser()
    sources = photo_sources(photos, out)
    if identity is None and options.crop != "center":
        identity = load_identity(options.identity)  # before anything is written: --identity on may be refused
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    previous = _load_manifest(manifest_path, options)
    old_files: dict[str, Any] = previous.get("files", {})
    if options.crop != "center" and detector is None:
        from tistudio.prepare.faces import FaceDetector

        detector = FaceDetector()
    items: list[Item] = []
    taken: set[str] = set()  # the output names given so far
    processed = 0
    for index, source in enumerate(sources):
        if stop is not None and stop.is_set():
            break
        item, fresh = prepare_photo(source, out, old_files.get(source.name), taken, options, detector, identity)
        processed += fresh
        items.append(item)
        report(Event.STEP, index + 1, len(sources), message=source.name)
    reused = len(items) - processed
    removed = remove_stale_outputs(out, {**previous.get("stale", {}), **old_files}, items)
    verdict = assess(items)
    write_json(
        manifest_path,
        {
            "version": MANIFEST_VERSION,
            "tool": "tistudio prepare",
            "options": _settings(options),
            "photos": str(photos),
            "verdict": verdict,
            "files": {item.source: asdict(item) for item in items},
        },
    )
    report = write_report(out, items, verdict, options)
    if items and not any(i.status == "ok" for i in items) and (stop is None or not stop.is_set()):
        reasons = "; ".join(f"{i.source}: {i.reason}" for i in items[:3])
        raise DatasetError(f"none of the {len(items)} files in {photos} is a usable photo ({reasons}); see {report}")
    return PrepareResult(
        out=out, items=items, verdict=verdict, processed=processed, reused=reused, removed=removed, report=report
    )


# ----------------------------------------------------------------------------------------------------------------
# The verdict


def _count(n: int, singular: str, plural: str) -> str:
    return f"{n} {singular if n == 1 else plural}"


def _names(items: list[Item], limit: int = 6) -> str:
    names = [i.source for i in items]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def duplicate_groups(items: list[Item]) -> list[list[Item]]:
    """Groups of photos that are the same photo (same_photo)."""
    groups: list[list[Item]] = []
    for item in items:
        for group in groups:
            if any(same_photo(item, other) for other in group):
                group.append(item)
                break
        else:
            groups.append([item])
    return [g for g in groups if len(g) > 1]


def assess(items: list[Item]) -> list[str]:
    """The set's verdict, in plain sentences; the first says whether the set is ready. Where faces were described
    it tells the people apart first (tell_people_apart, which marks each item)."""
    usable = [i for i in items if i.status == "ok"]
    skipped = [i for i in items if i.status != "ok"]
    findings: list[str] = []
    count = len(usable)
    if count < 5:
        findings.append(
            f"Only {count} usable image{'s' if count != 1 else ''}: 10-30 photos with different poses, "
            "places and light work best."
        )
    elif count > 100:
        findings.append(
            f"{count} images is a lot: 10-30 varied photos are enough, and training takes longer per epoch with more."
        )
    if skipped:
        findings.append(
            f"{_count(len(skipped), 'file was', 'files were')} left out: "
            + "; ".join(f"{i.source} ({i.reason})" for i in skipped[:5])
            + ("; ..." if len(skipped) > 5 else "")
            + "."
        )
    if usable:
        findings += identity_findings(items)
        median = float(np.median([i.sharpness for i in usable]))
        blurry = [
            i for i in usable if i.sharpness < max(BLUR_ABSOLUTE, BLUR_RELATIVE * median) and i.sharpness < median
        ]
        if blurry:
            findings.append(
                f"{_count(len(blurry), 'image is', 'images are')} blurry: {_names(blurry)}; replace "
                f"{'it' if len(blurry) == 1 else 'them'} with sharp photos."
            )
        for group in duplicate_groups(usable):
            findings.append(f"{len(group)} are the same photo: {_names(group)}; keep one.")
        small = [i for i in usable if i.upscale > WARN_UPSCALE]
        if small:
            findings.append(
                f"{_count(len(small), 'image is', 'images are')} small and had to be enlarged: {_names(small)}."
            )
        no_face = [i for i in usable if i.framing in ("focal", "split")]
        with_face = [i for i in usable if i.face_box]
        if with_face and no_face:
            findings.append(
                f"No face was found in {_names(no_face)}; they were cropped around their most detailed region."
            )
        if len(with_face) >= 5:
            poses: dict[str, list[Item]] = {}
            for item in with_face:
                poses.setdefault(item.yaw, []).append(item)
            pose, same = max(poses.items(), key=lambda kv: len(kv[1]))
            if len(same) >= 0.8 * len(with_face):
                turned = "straight at the camera" if pose == "frontal" else f"turned to the {pose}"
                findings.append(
                    f"{len(same)} of {len(with_face)} show the face {turned}: add some photos turned "
                    "left and right, so the word learns the person rather than one pose."
                )
        if count >= 5:
            clusters: list[list[Item]] = []
            for item in usable:
                for cluster in clusters:
                    if math.dist(item.background, cluster[0].background) < 25:
                        cluster.append(item)
                        break
                else:
                    clusters.append([item])
            largest = max(clusters, key=len)
            if len(largest) >= 0.7 * count:
                findings.append(
                    f"{len(largest)} of {count} have much the same background: take photos in different "
                    "places, or the background becomes part of the word."
                )
    if not findings:
        return [f"Looks good: {count} sharp, distinct images with varied poses and backgrounds."]
    several_people = any(MANY_PEOPLE in finding for finding in findings)  # not "ready" above that (issue 33)
    head = "Ready to train, with a few things to improve:" if count >= 5 and not several_people else "Not ready yet:"
    return [head, *findings]


MANY_PEOPLE = "different people ("  # how the finding that no one person stands out reads


def identity_findings(items: list[Item]) -> list[str]:
    """Who the photos show: someone else in a few of them, several people with no clear one, faces too small."""
    from tistudio.prepare.identity import SAME_PERSON

    findings = []
    groups = tell_people_apart(items)
    described = sum(len(group) for group in groups)
    if len(groups) > 1 and 2 * len(groups[0]) <= described:
        findings.append(
            f"The photos show {len(groups)} {MANY_PEOPLE}"
            + "; ".join(_names(group, 3) for group in groups[:4])
            + "): an embedding learns one person; "
            "keep only the photos of the one you mean."
        )
    elif len(groups) > 1:
        others = [item for group in groups[1:] for item in group]
        findings.append(
            f"{_count(len(others), 'photo shows', 'photos show')} someone else than the rest: "
            + ", ".join(
                f"{i.source} ({i.person_distance:.2f} from the other faces; the same person is under {SAME_PERSON})"
                for i in others[:6]
            )
            + f"; remove {'it' if len(others) == 1 else 'them'}, or the word learns a blend of people."
        )
    small = [i for i in items if i.status == "ok" and any("too small to tell who" in n for n in i.notes)]
    if small and described:
        findings.append(
            f"The face in {_names(small)} is too small to tell who it is; closer photos let tistudio "
            "check that they show the same person."
        )
    return findings


# ----------------------------------------------------------------------------------------------------------------
# The report


def write_report(out: Path, items: list[Item], verdict: list[str], options: PrepareOptions) -> Path:
    from tistudio.pages import STYLE, data_uri

    rows = []
    for item in items:
        if item.status != "ok":
            rows.append(
                f"<tr class='bad'><td></td><td>{html.escape(item.source)}</td><td colspan=5>left out: "
                f"{html.escape(item.reason)}</td></tr>"
            )
            continue
        picture = out / next(o for o in item.outputs if o.endswith(".png"))
        face = (
            f"{item.faces} found, {item.face_fraction:.0%} of the frame, {item.yaw}"
            if item.face_box
            else "none"
            if options.crop != "center"
            else "not looked for"
        ) + who(item)
        bucket = item.bucket or (options.size, options.size)
        rows.append(
            f"<tr><td><img src='{data_uri(picture)}' alt='' width=96 height={round(96 * bucket[1] / bucket[0])}></td>"
            f"<td>{html.escape(item.source)}<br><span class='muted'>{item.original_size[0]}x{item.original_size[1]}"
            f" → {', '.join(html.escape(o) for o in item.outputs if o.endswith('.png') and not is_mask_file(o))}"
            f" ({bucket[0]}x{bucket[1]})</span></td>"
            f"<td>{html.escape(face)}</td><td>{item.sharpness:.0f}</td><td>{item.upscale:.2f}x</td>"
            f"<td>{html.escape(item.caption) or '<span class=muted>none</span>'}</td>"
            f"<td>{html.escape('; '.join(item.notes))}</td></tr>"
        )
    usable = sum(1 for i in items if i.status == "ok")
    page = (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Prepared training set</title>"
        f"<style>{STYLE} td,th{{border-bottom:1px solid #eee;padding:4px 8px;text-align:left}} "
        f"tr.bad td{{color:#a33}}</style></head><body><h1>Prepared training set</h1>"
        f"<p>{usable} of {len(items)} files usable, {html.escape(shapes(items, options))}, crop: {options.crop}"
        f"{', with mirrored copies' if options.flip else ''}.</p><h2>Verdict</h2><ul>"
        + "".join(f"<li>{html.escape(line)}</li>" for line in verdict)
        + "</ul><h2>Images</h2><table><tr><th></th><th>photo</th><th>face</th><th>sharpness</th>"
        "<th>enlarged</th><th>caption</th><th>notes</th></tr>" + "".join(rows) + "</table></body></html>"
    )
    return write_text(out / "report.html", page)


def shapes(items: list[Item], options: PrepareOptions) -> str:
    """The pictures' sizes: '384x640 buckets: 3 x 384x640, 2 x 512x512', or '512px squares'."""
    chosen = [item.bucket or (options.size, options.size) for item in items if item.status == "ok"]
    if not bucketed(options) or not chosen:
        return f"{options.size}px squares"
    return f"aspect-ratio buckets of about {options.size}x{options.size}: {describe_buckets(chosen)}"


def who(item: Item) -> str:
    if item.person_distance is None:
        return ""
    return f", {'SOMEONE ELSE' if item.other_person else 'the same person'} ({item.person_distance:.2f})"


def summary_lines(result: PrepareResult) -> list[str]:
    """The report for the terminal."""
    lines = [
        f"prepared {len(result.usable)} of {len(result.items)} files into {result.out} "
        f"({result.processed} processed, {result.reused} unchanged, {result.removed} old outputs removed)"
    ]
    for item in result.items:
        if item.status != "ok":
            lines.append(f"  left out  {item.source}: {item.reason}")
            continue
        face = (f"face {item.face_fraction:.0%} {item.yaw}" if item.face_box else item.framing) + who(item)
        notes = f"  ({'; '.join(item.notes)})" if item.notes else ""
        shape = f"{item.bucket[0]}x{item.bucket[1]}, " if item.bucket and item.bucket[0] != item.bucket[1] else ""
        lines.append(
            f"  ok        {item.source}: {shape}{face}, sharpness {item.sharpness:.0f}, x{item.upscale:.2f}{notes}"
        )
    lines += ["", *result.verdict, "", f"report: {result.report}"]
    return lines
