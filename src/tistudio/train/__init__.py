"""Training: the loop, what trains (trainables), the denoiser adapter, evaluation, the run folder.

Its main entry points are importable from here.
"""

from __future__ import annotations

from tistudio.train.create import create_embedding
from tistudio.train.loop import TrainResult, train

__all__ = ["TrainResult", "create_embedding", "train"]
