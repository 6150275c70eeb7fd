"""Loading Stable Diffusion checkpoints, the model families' table, and the text conditioning.

Its main entry points are importable from here.
"""

from __future__ import annotations

from tistudio.models.loading import SDModel, load_model

__all__ = ["SDModel", "load_model"]
