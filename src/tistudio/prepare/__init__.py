"""Photos to a prepared training set: cropping around the face, captions, masks, the quality report.

Its main entry points are importable from here.
"""

from __future__ import annotations

from tistudio.prepare.preprocess import prepare

__all__ = ["prepare"]
