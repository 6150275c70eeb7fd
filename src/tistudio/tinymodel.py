"""Tiny Stable Diffusion models with seeded random weights, for the demo and the tests.

They have exactly Stable Diffusion's architecture and file layout - a CLIP text encoder with the real
49,408-token vocabulary, a 4-level UNet2DConditionModel with cross-attention, a 4-level (/8) AutoencoderKL and
the SD noise schedule - only narrower, so every code path (single-file conversion included) treats them like a
real checkpoint. Their pictures are noise: they prove that the software works, not that it makes good images.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

DEMO_VERSION = "2"
TEXT_WIDTH = 64
# Random cross-attention barely changes a tiny UNet's output; scaling its value and output projections makes the
# text (and so an embedding) steer the prediction measurably, as it does in a trained model.
TEXT_GAIN = 16.0


def unet_config(family: str, native_size: int) -> dict[str, Any]:
    widths = [32, 32, 64, 64]
    return {
        "sample_size": native_size // 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
        "block_out_channels": widths,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "cross_attention_dim": TEXT_WIDTH, "norm_num_groups": 32,
        "attention_head_dim": 8 if family == "sd1" else [max(1, w // 64) for w in widths],
        "use_linear_projection": family == "sd2", "upcast_attention": family == "sd2",
    }


def vae_config(native_size: int) -> dict[str, Any]:
    return {
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1,
        "block_out_channels": [32, 32, 64, 64], "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4, "norm_num_groups": 32, "sample_size": native_size,
        "scaling_factor": 0.18215,
    }


def text_config(family: str) -> dict[str, Any]:
    return {
        "vocab_size": 49408, "hidden_size": TEXT_WIDTH, "intermediate_size": 2 * TEXT_WIDTH, "num_hidden_layers": 2,
        "num_attention_heads": TEXT_WIDTH // 64, "max_position_embeddings": 77, "projection_dim": TEXT_WIDTH,
        "hidden_act": "quick_gelu" if family == "sd1" else "gelu", "bos_token_id": 0, "pad_token_id": 1,
        "eos_token_id": 2,
    }


def build_tiny_model(folder: Path, family: str = "sd1", seed: int = 0, native_size: int = 64,
                     prediction_type: str | None = None, text_gain: float = TEXT_GAIN) -> Path:
    """Write a tiny SD-architecture diffusers folder with seeded random weights.

    text_gain scales the cross-attention value and output projections (each by its square root), so that the
    prompt changes the UNet's prediction enough for training to have something to learn.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .models import scheduler_config
    from .storage import write_json
    from .tokenizer import load_tokenizer, write_tokenizer

    if family not in ("sd1", "sd2"):
        raise ValueError(f"family must be sd1 or sd2, not {family!r}")
    prediction = prediction_type or ("epsilon" if family == "sd1" else "v_prediction")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config(family)))
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**unet_config(family, native_size))
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if ".attn2.to_v." in name or ".attn2.to_out.0.weight" in name:
                parameter.mul_(text_gain**0.5)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(**vae_config(native_size))
    text_encoder.save_pretrained(folder / "text_encoder")
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    load_tokenizer(family).save_pretrained(folder / "tokenizer")
    write_tokenizer(folder / "tokenizer", family)
    write_json(folder / "scheduler" / "scheduler_config.json", scheduler_config(prediction))
    write_json(folder / "model_index.json", {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]})
    (folder / "TINY-MODEL.txt").write_text(
        "A tiny Stable Diffusion model with seeded random weights, built by tistudio for its demo and tests.\n"
        "It proves that the software works; its pictures are noise and mean nothing.\n", "utf-8")
    return folder


def demo_model_dir(cache_dir: Path) -> Path:
    """The built-in demo model, built once into the cache (atomically: a half-built folder is never used)."""
    target = Path(cache_dir) / "models" / f"tiny-sd1-v{DEMO_VERSION}"
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("building the tiny demo model in %s (once)", target)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        build_tiny_model(staging, family="sd1", seed=0)
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / "model_index.json").is_file():  # not a concurrent build that won the race
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
