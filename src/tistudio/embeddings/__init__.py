"""Embedding files: every format tistudio reads and writes (safetensors, A1111 .pt and PNG, ...).

Its main entry points are importable from here.
"""

from __future__ import annotations

from tistudio.embeddings.files import Embedding, read_embedding, write_embedding

__all__ = ["Embedding", "read_embedding", "write_embedding"]
