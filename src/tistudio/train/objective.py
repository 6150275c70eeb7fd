"""What training minimises, behind one seam: the denoiser adapter.

A :class:`Denoiser` owns the frozen model's denoising backbone (its UNet, or a compiled one for the training steps),
the text conditioning (the prompt encoder, with the trained vectors spliced in; see models/conditioning.py) and the
noise schedule. It offers what the loop, the fixed-batch evaluator and the batch probe need: how timesteps and noise are
drawn, the training target, and the loss of a batch. k-diffusion's ``external.py`` is the model: one adapter class per
kind of objective. :class:`NoisePrediction` is the DDPM kind of Stable Diffusion 1.x, 2.x and SDXL - noise or v
prediction, zero-SNR schedules included. A flow-matching model (SD3.5, Flux) would be a second class with its own
draws, target and loss; nothing that calls a Denoiser changes.

How a run is judged - the fixed evaluation batch and the best-step rules - is in train/evaluation.py.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, Protocol

import torch

from tistudio.errors import ModelError
from tistudio.models.conditioning import PromptEncoder
from tistudio.models.loading import SDModel


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


class Denoiser(Protocol):
    """The frozen model as training sees it: one implementation per kind of objective."""

    model: SDModel
    encoder: PromptEncoder

    def with_backbone(self, backbone: Any) -> Denoiser:
        """The same denoiser computing with another backbone (e.g. the compiled UNet of the training steps)."""
        ...

    def draw_timesteps(self, count: int, generator: torch.Generator, stratified: bool = False) -> torch.Tensor:
        """`count` training timesteps (CPU) from `generator`; `stratified`: one in each of `count` equal strata,
        the strata shuffled."""
        ...

    def draw_noise(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """Noise of `shape` (CPU) from `generator`, drawn after the timesteps."""
        ...

    def loss(
        self,
        clean: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        prompts: list[str],
        time_ids: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The mean loss of a batch of clean latents at timesteps t with this noise, conditioned on the prompts."""
        ...


class NoisePrediction:
    """DDPM denoising (Stable Diffusion 1.x, 2.x, SDXL): the UNet predicts the noise, or v, of latents noised along
    the model's alphas_cumprod; the loss is the mean squared error of that prediction."""

    def __init__(
        self,
        model: SDModel,
        encoder: PromptEncoder,
        backbone: Any = None,
        schedule: tuple[torch.Tensor, int] | None = None,
    ) -> None:
        self.model, self.encoder = model, encoder
        self.backbone = model.unet if backbone is None else backbone
        alphas, self.timesteps = schedule if schedule is not None else noise_schedule(model)
        self.alphas = alphas.to(model.device)

    def with_backbone(self, backbone: Any) -> NoisePrediction:
        return NoisePrediction(self.model, self.encoder, backbone, (self.alphas, self.timesteps))

    def draw_timesteps(self, count: int, generator: torch.Generator, stratified: bool = False) -> torch.Tensor:
        if not stratified:
            return torch.randint(0, self.timesteps, (count,), generator=generator)
        strata = torch.randperm(count, generator=generator)
        return (
            ((strata + torch.rand(count, generator=generator)) * self.timesteps / count)
            .long()
            .clamp(max=self.timesteps - 1)
        )

    def draw_noise(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        return torch.randn(shape, generator=generator)

    def noisy(self, clean: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The clean latents noised to timesteps t, in the model's dtype."""
        a = self.alphas[t].view(-1, 1, 1, 1)
        return (a.sqrt() * clean.float() + (1 - a).sqrt() * noise.float()).to(self.model.dtype)

    def target(self, clean: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the UNet should predict (float32): the noise, or v for a v-prediction model."""
        if self.model.prediction_type != "v_prediction":
            return noise.float()
        a = self.alphas[t].view(-1, 1, 1, 1)
        return a.sqrt() * noise.float() - (1 - a).sqrt() * clean.float()

    def conditioning(self, prompts: list[str], clean: torch.Tensor, time_ids: torch.Tensor | None) -> Any:
        """The prompts' conditioning; a family with size conditioning (SDXL) takes each image's time_ids [batch, 6]
        (without them, each is taken as uncropped at the latents' size)."""
        conditioning = self.encoder.encode(prompts).to(self.model.dtype)
        if not self.model.spec.size_conditioning:
            return conditioning
        if time_ids is None:
            side = (clean.shape[-2] * self.model.vae_scale, clean.shape[-1] * self.model.vae_scale)
            time_ids = torch.tensor([size_ids(side, (0, 0), side)] * clean.shape[0])
        return conditioning.with_sizes(time_ids)

    def loss(
        self,
        clean: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        prompts: list[str],
        time_ids: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean squared error of the prediction; `weights` [batch, 1, h, w] (train/masks.py; each image's average 1)
        weigh the squared error pixel by pixel."""
        noisy, objective = self.noisy(clean, t, noise), self.target(clean, t, noise)
        conditioning = self.conditioning(prompts, clean, time_ids)
        prediction = self.backbone(noisy, t, **conditioning.unet_inputs()).sample
        if weights is None:
            return torch.nn.functional.mse_loss(prediction.float(), objective)
        return ((prediction.float() - objective).pow(2) * weights.float()).mean()


# The adapter of each kind of objective a family can name (models/families.py: Family.objective).
OBJECTIVES: dict[str, Callable[[SDModel, PromptEncoder], Denoiser]] = {"noise": NoisePrediction}


def denoiser_for(model: SDModel, encoder: PromptEncoder) -> Denoiser:
    """The denoiser adapter of a loaded model, by the objective its family names."""
    try:
        return OBJECTIVES[model.spec.objective](model, encoder)
    except KeyError:
        raise ModelError(
            f"{model.spec.label} is trained with the {model.spec.objective!r} objective, which tistudio "
            "cannot train with yet"
        ) from None


def batch_loss(denoiser: Denoiser, batch: Any) -> torch.Tensor:
    """The loss of a training micro-batch (anything with clean, timesteps, noise, prompts, time_ids, weights)."""
    return denoiser.loss(
        batch.clean, batch.timesteps, batch.noise, batch.prompts, time_ids=batch.time_ids, weights=batch.weights
    )
