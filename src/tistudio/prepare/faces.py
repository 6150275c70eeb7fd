"""Face detection on the CPU: a small MTCNN (three cascaded convolutional networks) written for tistudio.

MTCNN (Zhang et al., 2016) proposes candidate windows with a fully convolutional net run over an image
pyramid (P-Net), rejects most of them with a second net on 24x24 crops (R-Net), and refines the survivors with a
third on 48x48 crops (O-Net), which also places five landmarks (eyes, nose, mouth corners). The weights are the
ones distributed in the facenet-pytorch wheel (see data/mtcnn/LICENSE-mtcnn.txt), read as plain tensors.

It needs only torch: no OpenCV, no torchvision. On two CPU cores it takes a fraction of a second for a photo
reduced to 800 px, which is all the accuracy a training crop needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

DETECT_SIDE = 800  # photos are reduced so that their long side is at most this before detection


@dataclass(frozen=True)
class Face:
    """A detected face in image pixels: box (x1, y1, x2, y2), confidence, and 5 landmarks (x, y)."""

    box: tuple[float, float, float, float]
    score: float
    landmarks: tuple[tuple[float, float], ...]

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def center(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2

    def yaw(self) -> str:
        """'frontal', 'left' or 'right': where the nose sits between the eyes."""
        (lx, _), (rx, _), (nx, _) = self.landmarks[0], self.landmarks[1], self.landmarks[2]
        span = (rx - lx) or 1.0
        offset = (nx - (lx + rx) / 2) / span
        if offset < -0.25:
            return "left"
        if offset > 0.25:
            return "right"
        return "frontal"


class _PNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1, self.conv4_2 = nn.Conv2d(32, 2, 1), nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return F.softmax(self.conv4_1(x), dim=1), self.conv4_2(x)


class _RNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1, self.dense5_2 = nn.Linear(128, 2), nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        x = self.prelu4(self.dense4(x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)))  # Caffe's flattening order
        return F.softmax(self.dense5_1(x), dim=1), self.dense5_2(x)


class _ONet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1, self.dense6_2, self.dense6_3 = nn.Linear(256, 2), nn.Linear(256, 4), nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.dense5(x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)))
        return F.softmax(self.dense6_1(x), dim=1), self.dense6_2(x), self.dense6_3(x)


def _load(net: nn.Module, name: str) -> nn.Module:
    with resources.files("tistudio").joinpath("data", "mtcnn", f"{name}.pt").open("rb") as handle:
        state = torch.load(handle, map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    return net.eval().requires_grad_(False)


def nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float, mode: str = "union") -> torch.Tensor:
    """Greedy non-maximum suppression; indices of the kept boxes, best first."""
    order = scores.argsort(descending=True)
    areas = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    keep = []
    while order.numel():
        best, rest = order[0], order[1:]
        keep.append(int(best))
        if not rest.numel():
            break
        x1 = torch.maximum(boxes[best, 0], boxes[rest, 0])
        y1 = torch.maximum(boxes[best, 1], boxes[rest, 1])
        x2 = torch.minimum(boxes[best, 2], boxes[rest, 2])
        y2 = torch.minimum(boxes[best, 3], boxes[rest, 3])
        inter = (x2 - x1 + 1).clamp(min=0) * (y2 - y1 + 1).clamp(min=0)
        if mode == "min":
            overlap = inter / torch.minimum(areas[best], areas[rest])
        else:
            overlap = inter / (areas[best] + areas[rest] - inter)
        order = rest[overlap <= threshold]
    return torch.tensor(keep, dtype=torch.long)


def _regress(boxes: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    width = boxes[:, 2] - boxes[:, 0] + 1
    height = boxes[:, 3] - boxes[:, 1] + 1
    size = torch.stack([width, height, width, height], dim=1)
    return boxes[:, :4] + offsets * size


def _square(boxes: torch.Tensor) -> torch.Tensor:
    width = boxes[:, 2] - boxes[:, 0]
    height = boxes[:, 3] - boxes[:, 1]
    side = torch.maximum(width, height)
    x1 = boxes[:, 0] + width / 2 - side / 2
    y1 = boxes[:, 1] + height / 2 - side / 2
    return torch.stack([x1, y1, x1 + side, y1 + side], dim=1)


def _crops(image: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crops of the boxes (zero-padded where they leave the image), resized to size x size."""
    _, _, height, width = image.shape
    out = []
    for x1, y1, x2, y2 in boxes.round().long().tolist():
        x2, y2 = max(x2, x1 + 1), max(y2, y1 + 1)
        patch = torch.zeros((1, 3, y2 - y1, x2 - x1))
        sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)
        if sx2 > sx1 and sy2 > sy1:
            patch[:, :, sy1 - y1 : sy2 - y1, sx1 - x1 : sx2 - x1] = image[:, :, sy1:sy2, sx1:sx2]
        out.append(F.interpolate(patch, size=(size, size), mode="area"))
    return torch.cat(out)


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels - 127.5) * 0.0078125


class FaceDetector:
    """MTCNN on the CPU. ``detect(image)`` returns the faces of a PIL image, most confident first."""

    def __init__(
        self, min_face: int = 20, thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7), factor: float = 0.709
    ) -> None:
        self.pnet = _load(_PNet(), "pnet")
        self.rnet = _load(_RNet(), "rnet")
        self.onet = _load(_ONet(), "onet")
        self.min_face, self.thresholds, self.factor = min_face, thresholds, factor

    @torch.no_grad()
    def detect(self, image: Any) -> list[Face]:
        rgb = image.convert("RGB")
        scale = min(1.0, DETECT_SIDE / max(rgb.size))
        if scale < 1.0:
            rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), 1)  # LANCZOS
        pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float32).copy()).permute(2, 0, 1).unsqueeze(0)
        faces = self._detect(pixels)
        return [
            Face(
                box=tuple(v / scale for v in f.box),
                score=f.score,  # type: ignore[arg-type]
                landmarks=tuple((x / scale, y / scale) for x, y in f.landmarks),
            )
            for f in faces
        ]

    def _detect(self, image: torch.Tensor) -> list[Face]:
        _, _, height, width = image.shape
        if min(height, width) < 12:
            return []
        # 1. P-Net over an image pyramid.
        candidates = []
        scale = 12.0 / self.min_face
        smallest = min(height, width) * scale
        while smallest >= 12:
            h, w = int(height * scale + 1), int(width * scale + 1)
            probability, offsets = self.pnet(_normalise(F.interpolate(image, size=(h, w), mode="area")))
            hit = probability[0, 1] >= self.thresholds[0]
            if hit.any():
                ys, xs = hit.nonzero(as_tuple=True)
                score = probability[0, 1][hit]
                corner = torch.stack([xs, ys], dim=1).float()
                q1 = ((2 * corner + 1) / scale).floor()
                q2 = ((2 * corner + 12) / scale).floor()
                boxes = torch.cat([q1, q2, score[:, None], offsets[0][:, hit].T], dim=1)
                candidates.append(boxes[nms(boxes[:, :4], score, 0.5)])
            scale *= self.factor
            smallest *= self.factor
        if not candidates:
            return []
        boxes = torch.cat(candidates)
        boxes = boxes[nms(boxes[:, :4], boxes[:, 4], 0.7)]
        boxes = _square(_regress(boxes[:, :4], boxes[:, 5:9]))
        # 2. R-Net on 24x24 crops.
        probability, offsets = self.rnet(_normalise(_crops(image, boxes, 24)))
        keep = probability[:, 1] > self.thresholds[1]
        if not keep.any():
            return []
        boxes, scores, offsets = boxes[keep], probability[keep, 1], offsets[keep]
        keep = nms(boxes, scores, 0.7)
        boxes = _square(_regress(boxes[keep], offsets[keep]))
        # 3. O-Net on 48x48 crops, with landmarks.
        probability, offsets, points = self.onet(_normalise(_crops(image, boxes, 48)))
        keep = probability[:, 1] > self.thresholds[2]
        if not keep.any():
            return []
        boxes, scores, offsets, points = boxes[keep], probability[keep, 1], offsets[keep], points[keep]
        width_, height_ = (boxes[:, 2] - boxes[:, 0] + 1)[:, None], (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
        xs = boxes[:, 0:1] + width_ * points[:, 0:5]
        ys = boxes[:, 1:2] + height_ * points[:, 5:10]
        boxes = _regress(boxes, offsets)
        keep = nms(boxes, scores, 0.7, mode="min")
        faces = []
        for index in keep.tolist():
            x1, y1, x2, y2 = boxes[index].tolist()
            box = (max(0.0, x1), max(0.0, y1), min(float(width), x2), min(float(height), y2))
            landmarks = tuple((float(xs[index, i]), float(ys[index, i])) for i in range(5))
            faces.append(Face(box=box, score=float(scores[index]), landmarks=landmarks))
        return faces
