"""Embedding files: every format tistudio reads and writes (safetensors, A1111 .pt and PNG, ...)."""
