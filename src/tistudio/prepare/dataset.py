"""The training images: found, checked, normalised and captioned, with a reason for every file left out.

Every file in the folder (not sub-folders, as in A1111) is tried as an image by its content; caption files
(``IMAGE.txt``) and hidden files are not images. An image is read with its EXIF orientation applied, 16-bit
scaled to 8-bit, CMYK converted, transparency flattened on a neutral grey, the first frame of animations;
then cropped to a centred square and resized with Lanczos to the training size (A1111 squashes instead, which
distorts faces). Unreadable files are skipped with their reason; training stops only if none is left.

Masks: an alpha channel, or ``IMAGE.mask.png`` (OneTrainer's ``IMAGE-masklabel.png``) beside the image - white the
subject - says where the subject is (train/masks.py weights the loss with it); mask files are not training images.

Captions: ``IMAGE.txt`` beside the image if present, else the file name without leading digits and dashes
(A1111's rule: ``00012-0-a woman smiling.jpg`` gives ``a woman smiling``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from tistudio.errors import DatasetError

log = logging.getLogger(__name__)

MAX_PIXELS = 64_000_000
MIN_SIDE = 16
KEEP_SIDE = 2048
CAPTION_SUFFIXES = {".txt", ".caption"}


def image_format(head: bytes) -> str | None:
    """A photo's format from its first bytes (JPEG, PNG, WebP, GIF, BMP, TIFF, HEIC/HEIF/AVIF), else None: what a
    photo set takes, whatever the file's name says."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:2] == b"BM":
        return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"heif", b"mif1", b"msf1", b"hevc", b"avif"):
        return "HEIC"
    return None


MAX_CAPTION_BYTES = 16_384
NEUTRAL = (128, 128, 128)


@dataclass
class TrainImage:
    path: Path
    caption: str
    image: Image.Image  # RGB, short side at most KEEP_SIDE
    original_size: tuple[int, int]
    # From a prepared set's manifest: the source photo's (width, height) and the square prepare cut from it
    # (left, top, right, bottom in the photo's pixels, mirrored for a -flip output); SDXL is conditioned on them.
    source_size: tuple[int, int] | None = None
    source_crop: tuple[int, int, int, int] | None = None
    # Where the subject is (mode L, the image's size, white the subject): an alpha channel or a mask file beside
    # the photo (train/masks.py weights the loss with it); None: no mask.
    mask: Image.Image | None = None


@dataclass
class Dataset:
    folder: Path
    images: list[TrainImage]
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def summary(self) -> str:
        text = f"{len(self.images)} images from {self.folder}"
        if self.skipped:
            text += f"; {len(self.skipped)} skipped: " + "; ".join(f"{p.name}: {r}" for p, r in self.skipped[:5])
            if len(self.skipped) > 5:
                text += f"; and {len(self.skipped) - 5} more"
        return text


CAMERA_NAME = re.compile(
    r"^(img|dsc|dscn|dscf|dcim|pxl|mvimg|photo|image|screenshot|screen shot|whatsapp image|"
    r"signal|vid|p)[\s_-]*\d",
    re.IGNORECASE,
)


def caption_file(path: Path) -> Path | None:
    """The caption file beside an image that is read for it: IMAGE.txt, else IMAGE.caption; None if neither."""
    return next((p for p in (path.with_suffix(".txt"), path.with_suffix(".caption")) if p.is_file()), None)


def sidecar_caption(path: Path) -> str | None:
    """The text of IMAGE.txt (or IMAGE.caption) beside an image, at most MAX_CAPTION_BYTES; None if there is none
    or it cannot be read."""
    sidecar = caption_file(path)
    if sidecar is None:
        return None
    try:
        if sidecar.stat().st_size > MAX_CAPTION_BYTES:
            log.warning("%s: caption over %d bytes, using the first part", sidecar, MAX_CAPTION_BYTES)
        with open(sidecar, "rb") as handle:
            raw = handle.read(MAX_CAPTION_BYTES)
        return raw.decode("utf-8", errors="replace").strip()
    except OSError as exc:
        log.warning("%s: cannot read the caption (%s); using the file name", sidecar, exc)
    return None


def filename_words(stem: str) -> str:
    """Caption words from a file name, A1111-style (leading digits and dashes dropped, '_' as spaces); camera
    names such as IMG_1234 and hex ids give none."""
    text = re.sub(r"^[-\d]+\s*", "", stem)
    if not text or CAMERA_NAME.match(stem) or re.fullmatch(r"[0-9a-fA-F-]{16,}", stem):
        return ""
    text = re.sub(r"[_]+", " ", text)
    text = re.sub(r"\s+", " ", text).strip(" -")
    return "" if re.fullmatch(r"[\d\s-]*", text) else text


def caption_for(path: Path) -> str:
    """The caption of an image, the one rule for training and preparing: its sidecar text if it has one, else
    the words of its file name."""
    text = sidecar_caption(path)
    return filename_words(path.stem) if text is None else text


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: 16/32-bit scaled (not clamped), CMYK converted, alpha flattened on grey."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        import numpy as np

        data = np.asarray(image, dtype=np.float64)
        high = 65535.0 if image.mode.startswith("I;16") or data.max() > 255 else 255.0
        image = Image.fromarray((np.clip(data / high, 0, 1) * 255 + 0.5).astype("uint8"), "L")
    elif image.mode == "F":
        import numpy as np

        data = np.asarray(image, dtype=np.float64)
        scale = 255.0 if data.max() <= 1.0 else 1.0
        image = Image.fromarray(np.clip(data * scale + 0.5, 0, 255).astype("uint8"), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "PA"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, NEUTRAL)
        background.paste(image, mask=image.getchannel("A"))
        return background
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


def enable_heif() -> bool:
    """Let Pillow read HEIC/HEIF (iPhone photos) when pillow-heif is installed."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def read_image(path: Path, box: int = 0) -> tuple[Image.Image, tuple[int, int]]:
    """An image file as RGB (orientation applied, large images reduced), or DatasetError with the reason. With
    `box`, reduced to fit in box x box as it is decoded (JPEG's draft) and before any conversion, so a thumbnail
    of a 64-megapixel photo holds one decoded copy, never several (the size returned is still the file's)."""
    image, _, size = decode_image(path, box)
    return image, size


def decode_image(
    path: Path, box: int = 0, alpha: bool = False
) -> tuple[Image.Image, Image.Image | None, tuple[int, int]]:
    """read_image's picture, with `alpha` also its transparency as a mask (mode L, the picture's size; None where
    the file has none or every pixel is opaque), and the file's size."""
    enable_heif()
    transparency = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                width, height = opened.size
                if width * height > MAX_PIXELS:
                    raise DatasetError(f"{width}x{height} pixels is too large (over {MAX_PIXELS:,} pixels)")
                if min(width, height) < MIN_SIDE:
                    raise DatasetError(f"{width}x{height} is too small (under {MIN_SIDE} px)")
                opened.seek(0)
                if box:
                    opened.draft("RGB", (box, box))
                    opened.thumbnail((box, box))
                opened.load()
                image = ImageOps.exif_transpose(opened) or opened
                if alpha:
                    transparency = alpha_mask(image)
                image = to_rgb(image)
                if image is opened:
                    image = image.copy()
    except DatasetError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DatasetError(f"refused as a decompression bomb ({exc})") from None
    except UnidentifiedImageError:
        raise DatasetError("not an image (unknown format)") from None
    except PermissionError:
        raise DatasetError("permission denied") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
        raise DatasetError(f"cannot read the image: {exc}") from None
    size = image.size
    if min(size) > KEEP_SIDE:
        image = image.copy()
        image.thumbnail((KEEP_SIDE * size[0] // min(size), KEEP_SIDE * size[1] // min(size)), Image.LANCZOS)
    if transparency is not None and transparency.size != image.size:
        transparency = transparency.resize(image.size, Image.BILINEAR)
    return image, transparency, size


def alpha_mask(image: Image.Image) -> Image.Image | None:
    """An image's alpha channel (mode L), or None where it has none or it is opaque everywhere."""
    if (image.mode == "P" and "transparency" not in image.info) or image.mode not in ("RGBA", "LA", "PA", "P"):
        return None
    channel = image.convert("RGBA").getchannel("A")
    return None if channel.getextrema()[0] == 255 else channel


MASK_SUFFIXES = (".mask.png", "-masklabel.png")  # tistudio's and OneTrainer's names for a photo's mask


def is_mask_file(name: str) -> bool:
    return name.lower().endswith(MASK_SUFFIXES)


def mask_file(path: Path) -> Path | None:
    """The mask file beside a photo: IMAGE.mask.png, else OneTrainer's IMAGE-masklabel.png; None where neither is."""
    return next(
        (
            candidate
            for candidate in (path.with_name(path.stem + suffix) for suffix in MASK_SUFFIXES)
            if candidate.is_file()
        ),
        None,
    )


def photo_mask(path: Path, image: Image.Image, transparency: Image.Image | None) -> Image.Image | None:
    """A photo's mask: IMAGE.mask.png or IMAGE-masklabel.png beside it (white the subject), else its alpha; the
    photo's size. DatasetError where the mask file cannot be read or its shape is not the photo's."""
    candidate = mask_file(path)
    if candidate is None:
        return transparency
    try:
        mask, _ = read_image(candidate)
    except DatasetError as exc:
        raise DatasetError(f"its mask {candidate.name}: {exc}") from None
    if abs(mask.width * image.height - mask.height * image.width) > 0.02 * mask.width * image.height:
        raise DatasetError(
            f"its mask {candidate.name} is {mask.width}x{mask.height}, the photo "
            f"{image.width}x{image.height}; a mask must have the photo's shape"
        )
    return mask.convert("L").resize(image.size, Image.BILINEAR)


def kept_part(image: Image.Image) -> Image.Image:
    """What training keeps of a very wide or tall image: the centre square it trains on (square()), so that a
    1000x63990 strip costs a megapixel while the set is held, not 64 (a 300-photo set of such could need 80 GB)."""
    width, height = image.size
    if max(width, height) <= 2 * min(width, height):
        return image
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


def load_dataset(folder: str | Path) -> Dataset:
    """All usable images of a folder; DatasetError if the folder is missing or has no usable image."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise DatasetError(f"dataset folder {folder} does not exist; pass the folder of your training photos")
    if not folder.is_dir():
        raise DatasetError(f"dataset {folder} is a file; pass the folder that holds your training photos")
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        raise DatasetError(f"cannot list the dataset folder {folder}: {exc.strerror}") from None
    images: list[TrainImage] = []
    skipped: list[tuple[Path, str]] = []
    sources = prepared_sources(folder)
    for name in names:
        path = folder / name
        if name.startswith(".") or path.suffix.lower() in CAPTION_SUFFIXES or is_mask_file(name):
            continue
        if sources and name in PREPARED_FILES:  # a prepared set's own manifest and report are not photos
            continue
        try:
            if path.is_dir():
                continue
            if not path.is_file():  # a named pipe, a device or a dangling link: opening it could block or fail
                raise DatasetError("not a regular file" if path.exists() else "a broken or looping symbolic link")
            image, transparency, size = decode_image(path, alpha=True)
            mask = photo_mask(path, image, transparency)
        except DatasetError as exc:
            skipped.append((path, str(exc)))
            continue
        source_size, source_crop = sources.get(name, (None, None))
        images.append(
            TrainImage(
                path=path,
                caption=caption_for(path),
                image=kept_part(image),
                original_size=size,
                source_size=source_size,
                source_crop=source_crop,
                mask=None if mask is None else kept_part(mask),
            )
        )
    for path, reason in skipped:
        log.warning("skipped %s: %s", path.name, reason)
    if not images:
        if not skipped:
            raise DatasetError(f"dataset folder {folder} has no images; put 5-30 photos of your subject in it")
        reasons = "; ".join(f"{p.name}: {r}" for p, r in skipped[:3])
        raise DatasetError(f"dataset folder {folder} has no usable image ({len(skipped)} files skipped: {reasons})")
    return Dataset(folder=folder, images=images, skipped=skipped)


PREPARED_FILES = {"manifest.json", "report.html"}


def prepared_sources(folder: Path) -> dict[str, tuple[tuple[int, int], tuple[int, int, int, int]]]:
    """For a folder `prepare` wrote: each output picture's source photo size and the square cut from it, from
    manifest.json (only for photos prepare cut one square from); {} for any other folder or a damaged manifest."""
    try:
        data = json.loads((folder / "manifest.json").read_text("utf-8"))
        files = data.get("files", {}) if isinstance(data, dict) else {}
        found = {}
        for item in files.values() if isinstance(files, dict) else ():
            pictures = [o for o in item.get("outputs", []) if str(o).endswith(".png") and not is_mask_file(str(o))]
            crop, size = item.get("crop"), item.get("original_size")
            if item.get("status") != "ok" or not crop or not size or item.get("framing") == "split":
                continue  # a split photo's squares are several; the manifest keeps the first
            width, height = int(size[0]), int(size[1])
            left, top, right, bottom = (int(v) for v in crop)
            for picture in pictures:
                mirrored = (width - right, top, width - left, bottom)
                found[picture] = (
                    (width, height),
                    mirrored if picture.endswith("-flip.png") else (left, top, right, bottom),
                )
        return found
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def square(image: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square and resize to size x size with Lanczos."""
    return ImageOps.fit(image, (size, size), method=Image.LANCZOS, centering=(0.5, 0.5))
