"""Where the loss looks: per-pixel weights that put the diffusion loss on the subject, not on its surroundings.

A photo's mask (prepare/dataset.py reads it: an alpha channel, or ``IMAGE.mask.png`` / OneTrainer's
``IMAGE-masklabel.png`` beside the photo; white is the subject) or a head-and-shoulders shape around the face the
detector finds becomes a weight per latent pixel: cut to the training picture (a square, or the photo's
aspect-ratio bucket) as the photo is, reduced to the latent grid, its edge softened, the left-out part keeping
``mask_background`` of the weight, then scaled so that every image's weights average 1 (a masked image teaches
as much as an unmasked one and the learning rate means what it did). Images without a mask weigh every pixel
alike. Where no image has a mask there are no weights at all, and the loss is the plain mean.

Which photos get a face shape (``--loss-mask``): ``auto`` (the default) where the run learns a subject - not with a
style template, whose word is the whole picture's look - and a face is found in at least FACE_SHARE of the photos
without a mask of their own (a set of faces, not a car with a passer-by); ``face`` wherever a face is found;
``masks`` only the photos' own masks; ``off`` never. On the demo world the head-and-shoulders weighting raised the
share of unseen-prompt pictures showing the person in every seed (bench/norms.py --masks).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from tistudio.prepare.buckets import Size, fit, per_picture
from tistudio.prepare.dataset import Dataset

log = logging.getLogger(__name__)

FACE_SHARE = 0.5  # --loss-mask auto: faces must be found in at least this share of the photos without a mask
STYLE_LINE = re.compile(r"(\bby|\bstyle of|\bin the style of)\s+\[name\]|\[name\]\s+style", re.IGNORECASE)

FaceFinder = Callable[[Image.Image], tuple[float, float, float, float] | None]  # a picture -> its face's box


def head_and_shoulders(size: tuple[int, int], box: tuple[float, float, float, float]) -> Image.Image:
    """A mask (mode L) of the head, hair and shoulders around a face box (x1, y1, x2, y2, in the picture's pixels):
    an ellipse a little larger than the face, raised for the hair, and a wide one below the chin."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    draw.ellipse([cx - 0.85 * w, cy - 1.15 * h, cx + 0.85 * w, cy + 0.75 * h], fill=255)  # head and hair
    draw.rectangle([cx - 0.35 * w, cy + 0.3 * h, cx + 0.35 * w, y2 + 0.6 * h], fill=255)  # neck
    draw.ellipse([cx - 1.7 * w, y2 + 0.35 * h, cx + 1.7 * w, y2 + 2.4 * h], fill=255)  # shoulders
    return mask


def face_finder() -> FaceFinder:
    """The largest confident face's box in a picture, by the MTCNN detector prepare uses (prepare/faces.py)."""
    from tistudio.prepare.faces import FaceDetector

    detector = FaceDetector()

    def find(picture: Image.Image) -> tuple[float, float, float, float] | None:
        faces = [face for face in detector.detect(picture) if face.score >= 0.9]
        return max(faces, key=lambda f: f.width * f.height).box if faces else None

    return find


def latent_weights(mask: Image.Image, bucket: Size, scale: int, background: float) -> np.ndarray:
    """A photo's mask as weights on the latent grid (a cell per `scale` pixels) of its training picture - the
    bucket's size, cut as the photo is (prepare/buckets.py) - averaging 1."""
    grid = (bucket[0] // scale, bucket[1] // scale)
    cut = fit(mask.convert("L"), bucket).resize(grid, Image.BOX)
    soft = cut.filter(ImageFilter.GaussianBlur(max(0.5, min(grid) / 32)))  # a soft edge: about 1/32 of the picture
    subject = np.asarray(soft, dtype=np.float32) / 255.0
    weights = background + (1.0 - background) * subject
    mean = float(weights.mean())
    return weights / mean if mean > 1e-6 else np.ones_like(weights)


def style_template(lines: tuple[str, ...]) -> bool:
    """Whether a template teaches a style (most lines say "art by [name]", "in the style of [name]", ...): the word
    is then the whole picture's look, and no face shape should narrow the loss."""
    return sum(bool(STYLE_LINE.search(line)) for line in lines) * 2 > len(lines)


def mask_mode(asked: str, template: tuple[str, ...], recorded: str | None, resumed: bool) -> str:
    """The --loss-mask a run trains with. A resumed run keeps the one it began with (recorded in its resume state;
    a run begun before auto existed began with "masks"), so that its loss and its fixed-batch curve stay one. `auto`
    is "masks" for a style template, else "auto" (face shapes where most photos show a face: loss_weights)."""
    if asked != "auto":
        return asked
    if resumed:
        return recorded or "masks"
    return "masks" if style_template(template) else "auto"


def face_masks(dataset: Dataset, mode: str, finder: FaceFinder) -> list[Image.Image | None]:
    """Each photo's own mask, or (modes "face" and "auto") the head-and-shoulders around its face; with "auto",
    none drawn unless faces were found in at least FACE_SHARE of the photos without a mask."""
    own = [item.mask for item in dataset.images]
    boxes = {i: finder(item.image) for i, item in enumerate(dataset.images) if own[i] is None}
    found = {i: box for i, box in boxes.items() if box is not None}
    if mode == "auto" and len(found) < FACE_SHARE * len(boxes):
        if found:
            log.info(
                "a face in only %d of %d photos without a mask: the set is not of a face, so no face shapes "
                "weigh the loss",
                len(found),
                len(boxes),
            )
        return own
    if found:
        log.info(
            "head and shoulders weigh the loss in the %d of %d photos without a mask where a face was found",
            len(found),
            len(boxes),
        )
    return [
        head_and_shoulders(item.image.size, found[i]) if i in found else own[i] for i, item in enumerate(dataset.images)
    ]


def loss_weights(
    dataset: Dataset,
    buckets: int | Sequence[Size],
    scale: int,
    flip: bool,
    mode: str,
    background: float,
    find_face: FaceFinder | None = None,
) -> list[torch.Tensor] | None:
    """Each latent's [1, h, w] weights in encode_latents' order (each image, then its mirror with `flip`), or None
    where no image has a mask (mode "off", or no mask given and none found). `buckets`: each image's training size
    (an int: the same square for all); `scale`: pixels per latent cell. `mode`: "masks" uses the photos' masks;
    "face" also draws head-and-shoulders around the face found (`find_face`, the detector by default) in photos
    without one; "auto" does so where most of those photos show a face (mask_mode resolves the option)."""
    sizes = per_picture(buckets, len(dataset.images))
    if mode == "off":
        return None
    if mode in ("face", "auto") and any(item.mask is None for item in dataset.images):
        masks = face_masks(dataset, mode, find_face or face_finder())
    else:
        masks = [item.mask for item in dataset.images]
    given = sum(mask is not None for mask in masks)
    if not given:
        if mode == "face":
            log.info("--loss-mask face: no face found in the photos, so every pixel weighs alike")
        return None
    log.info(
        "the loss is weighted toward the subject in %d of %d images (the rest weighs %g)", given, len(masks), background
    )
    rows = []
    for mask, bucket in zip(masks, sizes, strict=True):
        variants = [mask, ImageOps.mirror(mask)] if flip and mask is not None else [mask] * (2 if flip else 1)
        for variant in variants:
            grid = (bucket[1] // scale, bucket[0] // scale)
            weights = (
                np.ones(grid, np.float32) if variant is None else latent_weights(variant, bucket, scale, background)
            )
            rows.append(torch.from_numpy(weights).unsqueeze(0))
    return rows
