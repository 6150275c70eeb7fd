"""Generating images with embeddings: prompts, samplers, styles, infotexts."""
