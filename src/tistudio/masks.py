"""Where the loss looks: per-pixel weights that put the diffusion loss on the subject, not on its surroundings.

A photo's mask (dataset.py reads it: an alpha channel, or ``IMAGE.mask.png`` / OneTrainer's
``IMAGE-masklabel.png`` beside the photo; white is the subject) or, with ``--loss-mask face``, a head-and-shoulders
shape around the face the detector finds, becomes a weight per latent pixel: cut to the training square as the
photo is, reduced to the latent grid, its edge softened, the left-out part keeping ``mask_background`` of the
weight, then scaled so that every image's weights average 1 (a masked image teaches as much as an unmasked one and
the learning rate means what it did). Images without a mask weigh every pixel alike. Where no image has a mask
there are no weights at all, and the loss is the plain mean.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from .dataset import Dataset, square

log = logging.getLogger(__name__)

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
    """The largest confident face's box in a picture, by the MTCNN detector prepare uses (faces.py)."""
    from .faces import FaceDetector

    detector = FaceDetector()

    def find(picture: Image.Image) -> tuple[float, float, float, float] | None:
        faces = [face for face in detector.detect(picture) if face.score >= 0.9]
        return max(faces, key=lambda f: f.width * f.height).box if faces else None

    return find


def latent_weights(mask: Image.Image, size: int, side: int, background: float) -> np.ndarray:
    """A photo's mask as weights on the side x side latent grid of its size x size training square, averaging 1."""
    cut = square(mask.convert("L"), size).resize((side, side), Image.BOX)
    soft = cut.filter(ImageFilter.GaussianBlur(max(0.5, side / 32)))  # a soft edge: about 1/32 of the picture
    subject = np.asarray(soft, dtype=np.float32) / 255.0
    weights = background + (1.0 - background) * subject
    mean = float(weights.mean())
    return weights / mean if mean > 1e-6 else np.ones_like(weights)


def loss_weights(dataset: Dataset, size: int, side: int, flip: bool, mode: str, background: float,
                 find_face: FaceFinder | None = None) -> torch.Tensor | None:
    """[count, 1, side, side] weights in encode_latents' order (each image, then its mirror with `flip`), or None
    where no image has a mask (mode "off", or no mask given and none found). `mode`: "masks" uses the photos'
    masks; "face" also draws head-and-shoulders around the face found (`find_face`, the detector by default) in
    photos without one."""
    if mode == "off":
        return None
    masks: list[Image.Image | None] = []
    finder = (find_face or face_finder()) if mode == "face" else None
    for item in dataset.images:
        mask = item.mask
        if mask is None and finder is not None:
            box = finder(item.image)
            mask = None if box is None else head_and_shoulders(item.image.size, box)
        masks.append(mask)
    given = sum(mask is not None for mask in masks)
    if not given:
        if mode == "face":
            log.info("--loss-mask face: no face found in the photos, so every pixel weighs alike")
        return None
    log.info("the loss is weighted toward the subject in %d of %d images (the rest weighs %g)", given, len(masks),
             background)
    rows = []
    for mask in masks:
        variants = [mask, ImageOps.mirror(mask)] if flip and mask is not None else [mask] * (2 if flip else 1)
        for variant in variants:
            rows.append(np.ones((side, side), np.float32) if variant is None else
                        latent_weights(variant, size, side, background))
    return torch.from_numpy(np.stack(rows)).unsqueeze(1)
