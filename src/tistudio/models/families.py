"""Model families: what differs between Stable Diffusion 1.x, 2.x and SDXL, one table entry each.

A family names its text encoders by the key an embedding file keeps that encoder's vectors under (``clip`` for SD1
and SD2; SDXL's files use ``clip_l`` and ``clip_g``), says where a diffusers folder keeps each encoder and its
tokenizer (which are also the generation pipeline's component names), which layer the UNet is conditioned on, which
diffusers pipeline generates with it, and what a single checkpoint file of it holds (how its text encoders are kept,
its native size, its VAE's scale, the UNet's heads, the prediction type it has unless the file says). Loading
(models/loading.py), the prompt encoder (models/conditioning.py), creating and training an embedding and generating
read this table; none of them branches on a family's name. Only detection maps what a file holds to a family: the
marks of each family's text encoders are in this table too. This module does not import torch.
"""

from __future__ import annotations

from collections.abc import Callable
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
    pad_token: str = "<|endoftext|>"  # its tokenizer's padding token (OpenCLIP's encoders pad with "!")
    lora_prefix: str = "lora_te"  # how LoRA files (kohya's layout) name this encoder's layers


@dataclass(frozen=True)
class CheckpointText:
    """How a single checkpoint file keeps one text encoder."""

    prefix: str  # its keys' prefix
    openclip: bool = False  # in OpenCLIP's layout (else transformers' CLIP)
    drop_last: bool = False  # its last layer is dropped when read (SD2: the UNet was trained on the one before)


@dataclass(frozen=True)
class Family:
    """A model family: its text encoders, in the order their hidden states are concatenated, and its pipeline."""

    key: str  # "sd1", "sd2": recorded in embedding files (model_family) and run options
    label: str  # in words, for messages
    encoders: tuple[EncoderSlot, ...]
    pipeline: str = "StableDiffusionPipeline"  # the diffusers pipeline class that generates with it
    # Further keyword arguments that pipeline is built with (besides the UNet, VAE, scheduler and text encoders).
    pipeline_extras: tuple[tuple[str, Any], ...] = (
        ("safety_checker", None),
        ("feature_extractor", None),
        ("requires_safety_checker", False),
    )
    # The UNet is also conditioned on each image's original size, crop and target size (SDXL's time_ids).
    size_conditioning: bool = False
    # What its denoiser is trained to do (train/objective.py's OBJECTIVES): "noise" is DDPM's noise or v prediction.
    objective: str = "noise"
    # What a single checkpoint file (A1111's, ComfyUI's) of this family holds:
    checkpoint_text: tuple[CheckpointText, ...] = ()  # its text encoders, in `encoders`' order (detection: all)
    native_size: int = 512  # the size its pictures are trained at ...
    native_size_v: int = 0  # ... and at v prediction, where that differs (SD2's 768 models)
    vae_scaling: float = 0.18215  # the VAE's latent scaling factor
    vae_force_upcast: bool = False  # its VAE overflows in fp16 (encode in fp32)
    unet_heads: int = 0  # a fixed number of attention heads (SD1: 8); 0: one head per 64 channels
    unet_depth_list: bool = False  # transformer depth given per level even where it is the same (SDXL)
    upcast_attention_v: bool = False  # attention upcast in its v-prediction models (SD2)
    # In a diffusers folder whose pipeline class several families share: its text encoder's activation ("": any other)
    text_activation: str = ""
    # The prediction type of a checkpoint that does not say (and why), and the global steps of known epsilon bases.
    prediction: tuple[str, str] = ("epsilon", "models of this family predict noise")
    epsilon_steps: tuple[tuple[str, str], ...] = ()

    def native(self, prediction: str) -> int:
        """The native size of a model of this family with this prediction type."""
        return self.native_size_v if prediction == "v_prediction" and self.native_size_v else self.native_size

    @property
    def keys(self) -> tuple[str, ...]:
        """The embedding file's keys, one per text encoder."""
        return tuple(slot.key for slot in self.encoders)


OPENCLIP_PAD = "!"
CLIP = EncoderSlot("clip")
OPEN_CLIP = EncoderSlot("clip", pad_token=OPENCLIP_PAD)  # SD2's OpenCLIP ViT-H, under the same key
CLIP_L = EncoderSlot("clip_l", penultimate=True, lora_prefix="lora_te1")  # CLIP ViT-L/14, 768 wide
CLIP_G = EncoderSlot(
    "clip_g",
    "text_encoder_2",
    "tokenizer_2",
    penultimate=True,
    pooled=True,
    pad_token=OPENCLIP_PAD,
    lora_prefix="lora_te2",
)  # OpenCLIP bigG, 1280
CLIP_PREFIX = "cond_stage_model.transformer."  # SD1's CLIP ViT-L in a checkpoint file
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD2's OpenCLIP ViT-H
XL_CLIP_L = "conditioner.embedders.0.transformer."  # SDXL's CLIP ViT-L, in transformers' layout
XL_CLIP_G = "conditioner.embedders.1.model."  # SDXL's OpenCLIP ViT-bigG, in OpenCLIP's
FAMILIES: dict[str, Family] = {
    "sd1": Family(
        "sd1",
        "Stable Diffusion 1.x",
        (CLIP,),
        checkpoint_text=(CheckpointText(CLIP_PREFIX),),
        unet_heads=8,
        text_activation="quick_gelu",
        prediction=("epsilon", "SD 1.x models predict noise"),
    ),
    "sd2": Family(
        "sd2",
        "Stable Diffusion 2.x",
        (OPEN_CLIP,),
        checkpoint_text=(CheckpointText(OPENCLIP_PREFIX, openclip=True, drop_last=True),),
        native_size_v=768,
        upcast_attention_v=True,
        prediction=("v_prediction", "SD 2.x 768 models predict v; pass --prediction-type epsilon for a 512 base model"),
        epsilon_steps=(("875000", "SD 2.x base (global_step 875000)"),),
    ),
    "sdxl": Family(
        "sdxl",
        "SDXL",
        (CLIP_L, CLIP_G),
        pipeline="StableDiffusionXLPipeline",
        pipeline_extras=(("add_watermarker", False),),
        size_conditioning=True,
        checkpoint_text=(CheckpointText(XL_CLIP_L), CheckpointText(XL_CLIP_G, openclip=True)),
        native_size=1024,
        vae_scaling=0.13025,
        vae_force_upcast=True,
        unet_depth_list=True,
        prediction=("epsilon", "SDXL models predict noise unless the file says v (a v_pred key or modelspec metadata)"),
    ),
}


def checkpoint_family(has: Callable[[str], bool]) -> Family | None:
    """The family whose text encoders a checkpoint file holds (`has(prefix)`: whether any key starts so)."""
    return next(
        (
            entry
            for entry in sorted(FAMILIES.values(), key=lambda f: -len(f.checkpoint_text))
            if entry.checkpoint_text and all(has(text.prefix) for text in entry.checkpoint_text)
        ),
        None,
    )


def folder_family(pipeline: str, activation: str) -> Family | None:
    """The family of a diffusers folder: by its pipeline class, and where several share one, by the activation
    of its text encoder."""
    matches = [entry for entry in FAMILIES.values() if entry.pipeline == pipeline]
    if len(matches) > 1:
        exact = [entry for entry in matches if entry.text_activation == activation]
        matches = exact or [entry for entry in matches if not entry.text_activation] or matches
    return matches[0] if matches else None


def family(key: str) -> Family:
    """The table entry of a family key."""
    try:
        return FAMILIES[key]
    except KeyError:
        raise ModelError(f"unknown model family {key!r}; known: {', '.join(FAMILIES)}") from None
