"""Generating images with embeddings: prompts, samplers, styles, infotexts.

Its main entry points are importable from here.
"""

from __future__ import annotations

from tistudio.generate.images import generate

__all__ = ["generate"]
