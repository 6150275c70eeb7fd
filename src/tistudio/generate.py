"""txt2img with embeddings, as A1111 does it, and PNGs that other tools can read.

Every embedding in the embeddings folder whose name appears in the prompt or the negative prompt is used
(names are file stems, matched by CLIP tokens as in A1111); multi-vector names expand to all their vectors.
Image i of a batch uses seed + i and its starting noise is drawn on the CPU from that seed alone, so the same
seed gives the same image on any device and in any batch. Each PNG carries A1111's ``parameters`` text
(prompt, Negative prompt, Steps, Sampler, CFG scale, Seed, Size, Model hash, Model, TI hashes, Version).
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .conditioning import PromptEncoder
from .config import GenerateOptions, parse_size, validate_generate
from .embedding import Embedding, list_embedding_files, read_embedding, short_hash
from .errors import EmbeddingError, OptionError
from .models import SDModel, load_model
from .samplers import check_sampler, make_scheduler
from .storage import atomic_write

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GeneratedImage:
    path: Path | None
    seed: int
    infotext: str
    image: Image.Image


@dataclass(frozen=True)
class GenerateProgress:
    step: int
    total: int
    elapsed_s: float


def _quote(value: str) -> str:
    """A1111's infotext quoting: values with ',', ':' or newlines become JSON strings."""
    if not any(c in value for c in ",:\n"):
        return value
    return json.dumps(value, ensure_ascii=False)


def infotext(prompt: str, negative: str, steps: int, sampler: str, cfg: float, seed: int, width: int, height: int,
             model: SDModel, ti_hashes: dict[str, str], clip_skip: int = 1) -> str:
    """A1111's `parameters` text, which its PNG Info tab, Civitai and prompt readers parse."""
    from . import __version__

    fields: list[tuple[str, str]] = [
        ("Steps", str(steps)), ("Sampler", sampler), ("CFG scale", f"{cfg:g}"), ("Seed", str(seed)),
        ("Size", f"{width}x{height}"),
    ]
    if model.hash:
        fields.append(("Model hash", model.hash))
    fields.append(("Model", model.name))
    if clip_skip > 1:
        fields.append(("Clip skip", str(clip_skip)))
    if ti_hashes:
        fields.append(("TI hashes", ", ".join(f"{name}: {digest}" for name, digest in ti_hashes.items())))
    fields.append(("Version", f"tistudio {__version__}"))
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in fields))
    return "\n".join(lines)


def initial_noise(seeds: list[int], height: int, width: int, scale: int, channels: int = 4) -> torch.Tensor:
    """Starting latents, one CPU generator per seed: the same seed gives the same noise everywhere."""
    return torch.stack([torch.randn((channels, height // scale, width // scale),
                                    generator=torch.Generator("cpu").manual_seed(seed)) for seed in seeds])


class Renderer:
    """A diffusers StableDiffusionPipeline around a loaded model, fed with our own prompt encodings."""

    def __init__(self, model: SDModel, encoder: PromptEncoder) -> None:
        from diffusers import StableDiffusionPipeline

        self.model = model
        self.encoder = encoder
        self.pipe = StableDiffusionPipeline(
            vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
            scheduler=make_scheduler("DDIM", model.scheduler_config), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
        self.pipe.set_progress_bar_config(disable=True)

    @torch.no_grad()
    def render(self, prompt: str, negative: str, seeds: list[int], steps: int, sampler: str, cfg: float,
               width: int, height: int, on_step: Callable[[int], None] | None = None,
               stop: threading.Event | None = None) -> list[Image.Image]:
        model = self.model
        self.pipe.scheduler = make_scheduler(sampler, model.scheduler_config)
        embeds = self.encoder.encode([prompt] * len(seeds)).to(model.dtype)
        negative_embeds = self.encoder.encode([negative] * len(seeds)).to(model.dtype)
        if negative_embeds.shape[1] != embeds.shape[1]:  # pad the shorter with empty chunks to the same length
            longest = max(embeds.shape[1], negative_embeds.shape[1])
            embeds = self._pad(embeds, longest, len(seeds))
            negative_embeds = self._pad(negative_embeds, longest, len(seeds))
        latents = initial_noise(seeds, height, width, model.vae_scale).to(model.device, model.dtype)
        generators = [torch.Generator("cpu").manual_seed(seed + 1_000_003) for seed in seeds]

        def callback(pipe: Any, index: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if on_step is not None:
                on_step(index + 1)
            if stop is not None and stop.is_set():
                pipe._interrupt = True
            return kwargs

        result = self.pipe(prompt_embeds=embeds, negative_prompt_embeds=negative_embeds, latents=latents,
                           generator=generators, num_inference_steps=steps, guidance_scale=cfg, height=height,
                           width=width, output_type="pil", callback_on_step_end=callback)
        return list(result.images)

    def _pad(self, embeds: torch.Tensor, length: int, batch: int) -> torch.Tensor:
        if embeds.shape[1] == length:
            return embeds
        empty = self.encoder.encode([""] * batch).to(embeds.dtype)
        repeats = (length - embeds.shape[1]) // empty.shape[1]
        return torch.cat([embeds, *([empty] * repeats)], dim=1)


def find_embeddings(encoder: PromptEncoder, folder: Path, texts: list[str],
                    extra: dict[str, Embedding] | None = None) -> dict[str, tuple[Embedding, Path | None]]:
    """The embeddings named in the texts: files of `folder` by stem, plus in-memory ones (`extra`)."""
    files = list_embedding_files(folder)
    candidates: dict[str, tuple[int, ...]] = {}
    for name in [*files, *(extra or {})]:
        ids = encoder.token_ids(name)
        if ids:
            candidates[name] = ids
    used: dict[str, tuple[Embedding, Path | None]] = {}
    for text in texts:
        for name in encoder.names_in(text, candidates):
            if name in used:
                continue
            if extra and name in extra:
                used[name] = (extra[name], None)
            else:
                used[name] = (read_embedding(files[name]), files[name])
    return used


def check_fits(embedding: Embedding, model: SDModel) -> None:
    if embedding.is_sdxl:
        raise EmbeddingError(f"embedding {embedding.name!r} is an SDXL embedding (clip_l + clip_g); SDXL is not "
                             f"supported yet and it does not fit {model.name}")
    if embedding.width != model.width:
        raise EmbeddingError(f"embedding {embedding.name!r} is {embedding.width} wide ({embedding.fits()}) but the "
                             f"model {model.name} has a {model.width}-wide text encoder; use the embedding with a "
                             "model of its family")


def next_index(folder: Path) -> int:
    """A1111 numbers outputs 00000-SEED.png, 00001-SEED.png, ...; continue after the highest."""
    highest = -1
    if folder.is_dir():
        for path in folder.iterdir():
            match = re.match(r"^(\d{5,})-", path.name)
            if match:
                highest = max(highest, int(match.group(1)))
    return highest + 1


def save_png(image: Image.Image, path: Path, text: str) -> Path:
    info = PngInfo()
    info.add_text("parameters", text)
    return atomic_write(path, lambda temp: image.save(temp, format="PNG", pnginfo=info))


def generate(options: GenerateOptions, *, cache_dir: Path, model: SDModel | None = None,
             on_progress: Callable[[GenerateProgress], None] | None = None,
             stop: threading.Event | None = None, save: bool = True) -> list[GeneratedImage]:
    """Generate options.batch images and (with save) write them as PNGs with their parameters."""
    validate_generate(options)
    sampler = check_sampler(options.sampler)
    if model is None:
        model = load_model(options, cache_dir)
    size = parse_size(options.size) or (model.native_size, model.native_size)
    width, height = size
    if width % (model.vae_scale) or height % (model.vae_scale):
        raise OptionError("size", options.size, f"each side must be a multiple of {model.vae_scale}")
    encoder = PromptEncoder(model.tokenizer, model.text_encoder, options.clip_skip)
    used = find_embeddings(encoder, Path(options.embeddings_dir), [options.prompt, options.negative_prompt])
    for embedding, _ in used.values():
        check_fits(embedding, model)
    encoder.set_embeddings({name: emb.tensor.to(model.device) for name, (emb, _) in used.items()})
    if used:
        log.info("using embeddings: %s", ", ".join(f"{n} ({e.count} vectors, step {e.step})"
                                                    for n, (e, _) in used.items()))
    hashes = {name: short_hash(path) for name, (_, path) in used.items() if path is not None}
    seed = options.seed if options.seed >= 0 else random.SystemRandom().randrange(2**32 - options.batch)
    seeds = [seed + i for i in range(options.batch)]
    renderer = Renderer(model, encoder)
    started = time.monotonic()

    def on_step(step: int) -> None:
        if on_progress is not None:
            on_progress(GenerateProgress(step=step, total=options.steps, elapsed_s=time.monotonic() - started))

    images = renderer.render(options.prompt, options.negative_prompt, seeds, options.steps, sampler, options.cfg,
                             width, height, on_step=on_step, stop=stop)
    if stop is not None and stop.is_set():
        log.info("stopped before the images were finished; nothing was saved")
        return []
    results = []
    out_dir = Path(options.out_dir)
    index = next_index(out_dir) if save else 0
    for offset, (image, image_seed) in enumerate(zip(images, seeds, strict=True)):
        text = infotext(options.prompt, options.negative_prompt, options.steps, sampler, options.cfg, image_seed,
                        width, height, model, hashes, options.clip_skip)
        path = save_png(image, out_dir / f"{index + offset:05d}-{image_seed}.png", text) if save else None
        results.append(GeneratedImage(path=path, seed=image_seed, infotext=text, image=image))
    return results
