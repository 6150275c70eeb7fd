"""tistudio: learn a new word for Stable Diffusion from a few photos (textual inversion), then use it."""

__version__ = "0.1.0"
