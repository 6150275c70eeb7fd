"""Face likeness while training: do pictures from prompts the templates never used show the person of the photos?

At an evaluation, a few pictures are drawn with the current vectors (fixed seeds, few sampler steps, prompts that
put the word somewhere new: a painting, a city at night, ...), their largest face is described (prepare/identity.py) and
compared with the training photos' faces. A picture's score is ``1 - d / (2 * SAME_PERSON)`` clipped to 0..1, where
d is the face's average distance to the training faces: 1 is the same face, 0.5 dlib's same-person threshold, 0 far
away or no face at all. The likeness is the mean over the pictures; the trainer logs it beside the fixed-batch loss
and keeps the step where it is highest (train/evaluation.py). Where the training photos hold no face that can be
described (a pet, an object, a style), there is no face likeness and the loss chooses, as it says.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from tistudio.prepare.identity import MIN_FACE_PX, SAME_PERSON, distance

log = logging.getLogger(__name__)

# Prompts no template uses; "{}" is the embedding's name.
UNSEEN_PROMPTS = (
    "a painting of {}",
    "a photo of {} in a city at night",
    "a close-up photo of {}, smiling, outdoors",
    "a pencil drawing of {}",
)
MIN_REFERENCE_FACES = 2


def reference_faces(images: Sequence[Image.Image], detector: Any, identity: Any) -> list[np.ndarray]:
    """Descriptors of the largest face of each training image (where one is found and large enough)."""
    found = []
    for image in images:
        faces = [f for f in detector.detect(image) if f.score >= 0.9]
        if faces:
            face = max(faces, key=lambda f: f.width * f.height)
            if face.width >= MIN_FACE_PX:
                found.append(identity.describe(image, face.box))
    return found


def picture_score(picture: Image.Image, references: Sequence[np.ndarray], detector: Any, identity: Any) -> float:
    faces = [f for f in detector.detect(picture) if f.score >= 0.9]
    if not faces:
        return 0.0
    face = max(faces, key=lambda f: f.width * f.height)
    described = identity.describe(picture, face.box)
    gap = float(np.mean([distance(described, reference) for reference in references]))
    return float(min(1.0, max(0.0, 1.0 - gap / (2 * SAME_PERSON))))


class FaceLikeness:
    """A Likeness (train/evaluation.py) by face identity: called with the model and the prompt encoder that holds the
    current vectors; `every` steps (a multiple of the evaluation's) bounds its cost."""

    kind = "face identity"  # what a run's options.json and report call this likeness

    def __init__(
        self,
        references: Sequence[np.ndarray],
        name: str,
        size: int,
        *,
        pictures: int,
        steps: int,
        every: int,
        detector: Any,
        identity: Any,
        cfg: float = 7.0,
        sampler: str = "DPM++ 2M Karras",
        negative: str = "blurry, lowres",
    ) -> None:
        self.references, self.name, self.size = list(references), name, size
        self.pictures, self.steps, self.every, self.cfg, self.sampler = pictures, steps, every, cfg, sampler
        self.negative, self.detector, self.identity = negative, detector, identity
        self.renderer: Any = None

    def params(self) -> list[Any]:
        """One SamplingParams per picture: the unseen prompts in turn, seeds 1000, 1001, ..."""
        from tistudio.generate.images import SamplingParams

        return [
            SamplingParams(
                prompt=UNSEEN_PROMPTS[i % len(UNSEEN_PROMPTS)].format(self.name),
                negative_prompt=self.negative,
                steps=self.steps,
                sampler=self.sampler,
                cfg=self.cfg,
                width=self.size,
                height=self.size,
                seeds=(1000 + i,),
            )
            for i in range(self.pictures)
        ]

    def __call__(self, model: Any, encoder: Any) -> float:
        from tistudio.generate.images import Renderer

        if self.renderer is None or self.renderer.encoder is not encoder:
            self.renderer = Renderer(model, encoder)
        scores = [
            picture_score(self.renderer.render(params)[0], self.references, self.detector, self.identity)
            for params in self.params()
        ]
        return float(np.mean(scores))


def face_likeness(
    images: Sequence[Image.Image],
    name: str,
    size: int,
    *,
    pictures: int,
    steps: int,
    every: int,
    why_not: list[str] | None = None,
) -> FaceLikeness | None:
    """The face likeness of a run whose training images are `images`, or None (with the reason logged, and added to
    `why_not` for the run's options and the page) where the extra is missing or the images hold too few faces to
    know the person by."""
    why_not = why_not if why_not is not None else []
    from tistudio.extras import faces_available
    from tistudio.prepare.faces import FaceDetector
    from tistudio.prepare.identity import FaceIdentity

    if not faces_available():
        why_not.append("judging pictures by face identity needs pip install 'tistudio[faces]'")
        log.info("the loss chooses the step to keep: %s", why_not[-1])
        return None
    detector, identity = FaceDetector(), FaceIdentity()
    references = reference_faces(images, detector, identity)
    if len(references) < MIN_REFERENCE_FACES:
        why_not.append(
            f"no face likeness: {len(references)} of {len(images)} training images show a face large enough to know "
            "the person by (a pet, an object or a style? faces of under 40 pixels are too small)"
        )
        log.info("%s; the fixed-batch loss chooses the step to keep", why_not[-1])
        return None
    log.info(
        "face likeness every %d steps: %d pictures of %d sampler steps from unseen prompts, compared with the "
        "faces of %d training images",
        every,
        pictures,
        steps,
        len(references),
    )
    return FaceLikeness(
        references, name, size, pictures=pictures, steps=steps, every=every, detector=detector, identity=identity
    )
