"""What training minimises: the textual-inversion objective, and the noise schedule it is drawn from.

``diffusion_loss`` is the MSE of the UNet's noise (or v) prediction for clean latents noised to timesteps t, the
UNet conditioned on the prompts (with the trained vectors spliced in; see conditioning.py). How a run is judged -
the fixed evaluation batch and the best-step rules - is in evaluation.py.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from .conditioning import PromptEncoder
from .models import SDModel


def seed_for(*parts: int) -> int:
    """A 63-bit seed from integers (a run's seed, a purpose, a step, ...): independent streams that resume exactly."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def noise_schedule(model: SDModel) -> tuple[torch.Tensor, int]:
    """alphas_cumprod of the model's training noise schedule, and its number of timesteps."""
    from diffusers import DDPMScheduler

    config = {k: v for k, v in model.scheduler_config.items() if not k.startswith("_")}
    scheduler = DDPMScheduler.from_config(config)
    return scheduler.alphas_cumprod.to(torch.float32), int(scheduler.config.num_train_timesteps)


def size_ids(original: tuple[int, int], crop: tuple[int, int], target: tuple[int, int]) -> list[float]:
    """SDXL's size and crop conditioning of one image: original (h, w), crop top-left (top, left), target (h, w)."""
    return [float(v) for v in (*original, *crop, *target)]


def diffusion_loss(model: SDModel, encoder: PromptEncoder, alphas: torch.Tensor, clean: torch.Tensor,
                   t: torch.Tensor, noise: torch.Tensor, prompts: list[str], unet: Any = None,
                   time_ids: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error of the UNet's noise (or v) prediction for clean latents noised to timesteps t (with
    `unet` in place of the model's own, e.g. a compiled one, if given). A family with size conditioning (SDXL)
    takes each image's time_ids [batch, 6]; without them, each is taken as uncropped at the latents' size.
    `weights` [batch, 1, h, w] (masks.py; each image's average 1) weigh the squared error pixel by pixel."""
    a = alphas[t].view(-1, 1, 1, 1)
    noisy = (a.sqrt() * clean.float() + (1 - a).sqrt() * noise.float()).to(model.dtype)
    if model.prediction_type == "v_prediction":
        objective = a.sqrt() * noise.float() - (1 - a).sqrt() * clean.float()
    else:
        objective = noise.float()
    conditioning = encoder.encode(prompts).to(model.dtype)
    if model.spec.size_conditioning:
        if time_ids is None:
            side = (clean.shape[-2] * model.vae_scale, clean.shape[-1] * model.vae_scale)
            time_ids = torch.tensor([size_ids(side, (0, 0), side)] * clean.shape[0])
        conditioning = conditioning.with_sizes(time_ids)
    prediction = (model.unet if unet is None else unet)(noisy, t, **conditioning.unet_inputs()).sample
    if weights is None:
        return torch.nn.functional.mse_loss(prediction.float(), objective)
    return ((prediction.float() - objective).pow(2) * weights.float()).mean()
