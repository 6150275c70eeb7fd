"""Model families: what differs between Stable Diffusion 1.x, 2.x and SDXL, one table entry each.

A family names its text encoders by the key an embedding file keeps that encoder's vectors under (``clip`` for SD1
and SD2; SDXL's files use ``clip_l`` and ``clip_g``), says where a diffusers folder keeps each encoder and its
tokenizer (which are also the generation pipeline's component names), which layer the UNet is conditioned on, and
which diffusers pipeline generates with it. Loading (models/loading.py), the prompt encoder
(models/conditioning.py), creating and training an embedding and generating read this table; none of them names a
family. This module does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tistudio.errors import ModelError


@dataclass(frozen=True)
class EncoderSlot:
    """One text encoder of a family."""

    key: str  # the key of this encoder's vectors in an embedding file
    text_encoder: str = "text_encoder"  # its subfolder in a diffusers folder, and its pipeline component name
    tokenizer: str = "tokenizer"
    # Condition on the layer before the last, without the final layer norm (SDXL). SD1 and SD2 use the last layer
    # as loaded (an SD2 checkpoint's last layer is dropped when it is read, as its UNet was trained on the one before).
    penultimate: bool = False
    # This encoder's projection of its end-of-text position is the pooled text vector (SDXL's clip_g: text_embeds).
    pooled: bool = False


@dataclass(frozen=True)
class Family:
    """A model family: its text encoders, in the order their hidden states are concatenated, and its pipeline."""

    key: str  # "sd1", "sd2": recorded in embedding files (model_family) and run options
    label: str  # in words, for messages
    encoders: tuple[EncoderSlot, ...]
    pipeline: str = "StableDiffusionPipeline"  # the diffusers pipeline class that generates with it
    # Further keyword arguments that pipeline is built with (besides the UNet, VAE, scheduler and text encoders).
    pipeline_extras: tuple[tuple[str, Any], ...] = (("safety_checker", None), ("feature_extractor", None),
                                                    ("requires_safety_checker", False))
    # The UNet is also conditioned on each image's original size, crop and target size (SDXL's time_ids).
    size_conditioning: bool = False

    @property
    def keys(self) -> tuple[str, ...]:
        """The embedding file's keys, one per text encoder."""
        return tuple(slot.key for slot in self.encoders)


CLIP = EncoderSlot("clip")
CLIP_L = EncoderSlot("clip_l", penultimate=True)  # CLIP ViT-L/14, 768 wide
CLIP_G = EncoderSlot("clip_g", "text_encoder_2", "tokenizer_2", penultimate=True, pooled=True)  # OpenCLIP bigG, 1280
FAMILIES: dict[str, Family] = {
    "sd1": Family("sd1", "Stable Diffusion 1.x", (CLIP,)),
    "sd2": Family("sd2", "Stable Diffusion 2.x", (CLIP,)),
    "sdxl": Family("sdxl", "SDXL", (CLIP_L, CLIP_G), pipeline="StableDiffusionXLPipeline",
                   pipeline_extras=(("add_watermarker", False),), size_conditioning=True),
}


def family(key: str) -> Family:
    """The table entry of a family key."""
    try:
        return FAMILIES[key]
    except KeyError:
        raise ModelError(f"unknown model family {key!r}; known: {', '.join(FAMILIES)}") from None
