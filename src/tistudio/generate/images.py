"""txt2img with embeddings, as A1111 does it, and PNGs that other tools can read.

Every embedding in the embeddings folder whose name appears in the prompt or the negative prompt is used
(names are file stems, matched by CLIP tokens as in A1111); multi-vector names expand to all their vectors.
Image i of a batch uses seed + i and its starting noise is drawn on the CPU from that seed alone, so the same
seed gives the same image on any device and in any batch. Each PNG carries A1111's ``parameters`` text
(prompt, Negative prompt, Steps, Sampler, CFG scale, Seed, Size, Model hash, Model, TI hashes, Version).

Pictures are drawn by the diffusers pipeline the model's family names (models/families.py), fed with tistudio's own
prompt encodings, so that A1111's prompt syntax and the embeddings work the same in every family. LoRAs are called
as in A1111 (``<lora:NAME:weight>``; generate/networks.py), and an embedding trained with one calls it itself.
"""

from __future__ import annotations

import inspect
import json
import logging
import random
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from tistudio.config import GenerateOptions, parse_size, validate_generate
from tistudio.embeddings.bundle import list_lora_files
from tistudio.embeddings.files import Embedding, prompt_words, read_embedding, short_hash
from tistudio.errors import EmbeddingError, OptionError
from tistudio.generate.networks import (
    LoadedLora,
    auto_calls,
    bundled_words,
    load_called,
    lora_hashes,
    model_networks,
    option_calls,
    take_networks,
)
from tistudio.models.conditioning import Conditioning, PromptEncoder
from tistudio.models.loading import SDModel, load_model
from tistudio.models.lora import merged
from tistudio.progress import Event, Progress, Reporter
from tistudio.samplers import check_sampler, make_scheduler, split
from tistudio.storage import atomic_write

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    """What one txt2img call draws: the same for generation, previews and the demo's pictures."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    sampler: str = "DPM++ 2M Karras"  # an A1111 name (check_sampler gives the canonical one)
    cfg: float = 7.0
    width: int = 512
    height: int = 512
    seeds: tuple[int, ...] = (0,)  # one image per seed


@dataclass(frozen=True)
class GeneratedImage:
    path: Path | None
    seed: int
    infotext: str
    image: Image.Image


def _quote(value: str) -> str:
    """A1111's infotext quoting: values with ',', ':' or newlines become JSON strings."""
    if not any(c in value for c in ",:\n"):
        return value
    return json.dumps(value, ensure_ascii=False)


def infotext(
    params: SamplingParams,
    seed: int,
    model: SDModel,
    ti_hashes: dict[str, str],
    clip_skip: int = 1,
    extra: Sequence[tuple[str, str]] = (),
) -> str:
    """A1111's `parameters` text of one image, which its PNG Info tab, Civitai and prompt readers parse: the prompt,
    the negative prompt, then one line of settings in A1111 1.10's order, sampler and schedule type apart. A1111
    reads only the last line as settings, so anything else, such as a preview's embedding and step, is a field of
    that line: `extra`. `RNG: CPU`: tistudio draws its starting noise on the CPU, which A1111 reproduces only when
    told."""
    from tistudio import __version__

    sampler, schedule = split(params.sampler)
    fields: list[tuple[str, str]] = [
        ("Steps", str(params.steps)),
        ("Sampler", sampler),
        ("Schedule type", schedule),
        ("CFG scale", f"{params.cfg:g}"),
        ("Seed", str(seed)),
        ("Size", f"{params.width}x{params.height}"),
    ]
    if model.hash:
        fields.append(("Model hash", model.hash))
    fields.append(("Model", model.name))
    if clip_skip > 1:
        fields.append(("Clip skip", str(clip_skip)))
    fields.append(("RNG", "CPU"))
    if ti_hashes:
        fields.append(("TI hashes", ", ".join(f"{name}: {digest}" for name, digest in ti_hashes.items())))
    fields.extend(extra)
    fields.append(("Version", f"tistudio {__version__}"))
    lines = [params.prompt]
    if params.negative_prompt:
        lines.append(f"Negative prompt: {params.negative_prompt}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in fields))
    return "\n".join(lines)


def initial_noise(seeds: list[int], height: int, width: int, scale: int, channels: int = 4) -> torch.Tensor:
    """Starting latents, one CPU generator per seed: the same seed gives the same noise everywhere."""
    return torch.stack(
        [
            torch.randn((channels, height // scale, width // scale), generator=torch.Generator("cpu").manual_seed(seed))
            for seed in seeds
        ]
    )


def build_pipeline(model: SDModel, scheduler: Any) -> Any:
    """The model family's diffusers pipeline around the loaded parts (the components it takes, by the names the
    family's slots give them; it is only ever fed prompt encodings, never prompts)."""
    import diffusers

    spec = model.spec
    cls = getattr(diffusers, spec.pipeline)
    accepted = inspect.signature(cls.__init__).parameters
    parts: dict[str, Any] = {}
    for slot in spec.encoders:
        text = model.text[slot.key]
        parts[slot.text_encoder], parts[slot.tokenizer] = text.module, text.tokenizer
    parts = {name: part for name, part in parts.items() if name in accepted}
    return cls(vae=model.vae, unet=model.unet, scheduler=scheduler, **parts, **dict(spec.pipeline_extras))


class Renderer:
    """Draws pictures through the family's pipeline, fed with our own prompt encodings."""

    def __init__(self, model: SDModel, encoder: PromptEncoder) -> None:
        self.model = model
        self.encoder = encoder
        self.pipe = build_pipeline(model, make_scheduler("DDIM", model.scheduler_config))
        self.pipe.set_progress_bar_config(disable=True)

    @torch.no_grad()
    def render(
        self, params: SamplingParams, on_step: Callable[[int], None] | None = None, stop: threading.Event | None = None
    ) -> list[Image.Image]:
        model, seeds = self.model, list(params.seeds)
        self.pipe.scheduler = make_scheduler(params.sampler, model.scheduler_config, seed=seeds[0])
        positive = self.encoder.encode([params.prompt] * len(seeds)).to(model.dtype)
        negative = self.encoder.encode([params.negative_prompt] * len(seeds)).to(model.dtype)
        if negative.hidden.shape[1] != positive.hidden.shape[1]:  # pad the shorter with empty chunks
            longest = max(positive.hidden.shape[1], negative.hidden.shape[1])
            positive, negative = self._pad(positive, longest, len(seeds)), self._pad(negative, longest, len(seeds))
        latents = initial_noise(seeds, params.height, params.width, model.vae_scale).to(model.device, model.dtype)
        generators = [torch.Generator("cpu").manual_seed(seed + 1_000_003) for seed in seeds]

        def callback(pipe: Any, index: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if on_step is not None:
                on_step(index + 1)
            if stop is not None and stop.is_set():
                pipe._interrupt = True
            return kwargs

        result = self.pipe(
            **pipeline_inputs(positive, negative),
            latents=latents,
            generator=generators,
            num_inference_steps=params.steps,
            guidance_scale=params.cfg,
            height=params.height,
            width=params.width,
            output_type="pil",
            callback_on_step_end=callback,
        )
        return list(result.images)

    def _pad(self, conditioning: Conditioning, length: int, batch: int) -> Conditioning:
        hidden = conditioning.hidden
        if hidden.shape[1] == length:
            return conditioning
        empty = self.encoder.encode([""] * batch).hidden.to(hidden.dtype)
        repeats = (length - hidden.shape[1]) // empty.shape[1]
        return Conditioning(
            hidden=torch.cat([hidden, *([empty] * repeats)], dim=1),
            pooled=conditioning.pooled,
            extra=conditioning.extra,
        )


def pipeline_inputs(positive: Conditioning, negative: Conditioning) -> dict[str, Any]:
    """A diffusers pipeline's prompt-encoding arguments (the pooled ones too, where the family has them)."""
    inputs = {"prompt_embeds": positive.hidden, "negative_prompt_embeds": negative.hidden}
    if positive.pooled is not None:
        inputs.update(pooled_prompt_embeds=positive.pooled, negative_pooled_prompt_embeds=negative.pooled)
    return inputs


def find_embeddings(
    encoder: PromptEncoder, folder: Path, texts: list[str], extra: dict[str, Embedding] | None = None
) -> dict[str, tuple[Embedding, Path | None]]:
    """The embeddings named in the texts: files of `folder` by stem, plus in-memory ones (`extra`). A file that is
    not a readable embedding - a plain picture that happens to share a prompt word's name, a damaged file - is
    skipped with a warning and its name stays plain words, as A1111 skips it when it loads its folder."""
    files = prompt_words(folder)
    candidates: dict[str, tuple[int, ...]] = {}
    for name in [*files, *(extra or {})]:
        ids = encoder.token_ids(name)
        if ids:
            candidates[name] = ids
    used: dict[str, tuple[Embedding, Path | None]] = {}
    skipped: set[str] = set()
    for text in texts:
        for name in encoder.names_in(text, candidates):
            if name in used or name in skipped:
                continue
            if extra and name in extra:
                used[name] = (extra[name], None)
                continue
            try:
                used[name] = (read_embedding(files[name]), files[name])
            except EmbeddingError as exc:
                log.warning("skipped %s: %s", files[name].name, exc)
                skipped.add(name)
    return used


def fitting(used: dict[str, tuple[Embedding, Path | None]], model: SDModel) -> dict[str, tuple[Embedding, Path | None]]:
    """The embeddings a prompt names that fit the model; one that does not (an SD 1.5 embedding with an SDXL model,
    say) is skipped with a warning and its name stays plain words, as A1111 does, rather than failing the picture."""
    kept = {}
    for name, (embedding, path) in used.items():
        try:
            check_fits(embedding, model)
        except EmbeddingError as exc:
            log.warning("skipped the embedding %s: %s", name, exc)
            continue
        kept[name] = (embedding, path)
    return kept


def check_fits(embedding: Embedding, model: SDModel) -> None:
    """That the embedding has vectors for each of the model's text encoders, each as wide as that encoder."""
    widths = model.widths
    if set(embedding.vectors) != set(widths):
        if embedding.is_sdxl:
            raise EmbeddingError(
                f"embedding {embedding.name!r} is an SDXL embedding (clip_l + clip_g); it does not "
                f"fit {model.name} ({model.spec.label}): use it with an SDXL model"
            )
        raise EmbeddingError(
            f"embedding {embedding.name!r} ({embedding.fits()}) has vectors for "
            f"{', '.join(embedding.vectors)}, but the model {model.name} "
            f"({model.spec.label}) needs them for {', '.join(widths)}; use it with a model of its "
            "family"
        )
    for key, width in widths.items():
        if embedding.vectors[key].shape[1] != width:
            size = f"{embedding.width} wide" if len(widths) == 1 else f"{embedding.vectors[key].shape[1]} wide in {key}"
            own = f"a {width}-wide text encoder" if len(widths) == 1 else f"a {width}-wide {key} text encoder"
            raise EmbeddingError(
                f"embedding {embedding.name!r} is {size} ({embedding.fits()}) but the model "
                f"{model.name} has {own}; use the embedding with a model of its family"
            )


def next_index(folder: Path) -> int:
    """A1111 numbers outputs 00000-SEED.png, 00001-SEED.png, ...; continue after the highest."""
    highest = -1
    if folder.is_dir():
        for path in folder.iterdir():
            match = re.match(r"^(\d{5,})-", path.name)
            if match:
                highest = max(highest, int(match.group(1)))
    return highest + 1


def save_png(image: Image.Image, path: Path, text: str, chunks: dict[str, str] | None = None) -> Path:
    """A PNG with A1111's `parameters` text and any further text chunks."""
    info = PngInfo()
    info.add_text("parameters", text)
    for key, value in (chunks or {}).items():
        info.add_text(key, value)
    return atomic_write(path, lambda temp: image.save(temp, format="PNG", pnginfo=info))


@dataclass
class Calls:
    """The LoRAs a generation calls: from its prompt's tags, --lora, and the LoRAs its embeddings were trained with."""

    prompt: str  # what the text encoder reads (the tags taken out)
    shown: str  # what the infotext says (the prompt as written, with the LoRAs called for its embeddings)
    loaded: list[LoadedLora]
    words: dict[str, Embedding]  # the called LoRAs' bundled words (those the embeddings folder lacks)
    folder: Path
    files: dict[str, Path]  # the LoRA folder's files by name, listed once

    @classmethod
    def of(cls, options: GenerateOptions, embeddings_dir: Path) -> Calls:
        prompt, calls = take_networks(options.prompt)
        extra = option_calls(options.lora)
        folder = Path(options.loras_dir)
        files = list_lora_files(folder)
        loaded = load_called(calls + extra, folder, files)
        shown = " ".join([options.prompt, *(call.tag for call in extra)])
        words = bundled_words(loaded, set(prompt_words(embeddings_dir)))
        return cls(prompt, shown, loaded, words, folder, files)

    def add_auto(self, used: dict[str, tuple[Embedding, Path | None]]) -> None:
        """Call the LoRAs the prompt's embeddings were trained with (and show the calls in the infotext)."""
        auto = auto_calls(used, [lora.call for lora in self.loaded], self.folder, self.files)
        self.loaded += load_called(auto, self.folder, self.files)
        for call in auto:
            log.info("using %s, the LoRA %s was trained with", call.tag, call.name)
        self.shown = " ".join([self.shown, *(call.tag for call in auto)])


def generate(
    options: GenerateOptions,
    *,
    cache_dir: Path,
    model: SDModel | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    stop: threading.Event | None = None,
    save: bool = True,
) -> list[GeneratedImage]:
    """Generate options.batch images options.batch_count times and (with save) write them as PNGs with their
    parameters. A stop keeps the batches finished (A1111's interrupt gives what was made) and drops the one drawn."""
    validate_generate(options)
    sampler = check_sampler(options.sampler)
    if model is None:
        model = load_model(options, cache_dir)
    width, height = parse_size(options.size) or (model.native_size, model.native_size)
    if width % model.vae_scale or height % model.vae_scale:
        raise OptionError("size", options.size, f"each side must be a multiple of {model.vae_scale}")
    encoder = PromptEncoder.for_model(model, options.clip_skip)
    calls = Calls.of(options, Path(options.embeddings_dir))
    used = fitting(
        find_embeddings(encoder, Path(options.embeddings_dir), [calls.prompt, options.negative_prompt], calls.words),
        model,
    )
    calls.add_auto(used)
    encoder.set_embeddings(
        {name: {key: tensor.to(model.device) for key, tensor in emb.vectors.items()} for name, (emb, _) in used.items()}
    )
    if used:
        log.info(
            "using embeddings: %s", ", ".join(f"{n} ({e.count} vectors, step {e.step})" for n, (e, _) in used.items())
        )
    hashes = {name: short_hash(path) for name, (_, path) in used.items() if path is not None}
    with merged(model, model_networks(model, calls.loaded)):
        return _draw(options, model, encoder, sampler, (width, height), hashes, calls, on_progress, stop, save)


def _draw(
    options: GenerateOptions,
    model: SDModel,
    encoder: PromptEncoder,
    sampler: str,
    size: tuple[int, int],
    hashes: dict[str, str],
    calls: Calls,
    on_progress: Callable[[Progress], None] | None,
    stop: threading.Event | None,
    save: bool,
) -> list[GeneratedImage]:
    """generate()'s batches, once the model, its embeddings and LoRAs are in place."""
    width, height = size
    extra = [("Lora hashes", lora_hashes(calls.loaded))] if calls.loaded else []
    total = options.batch * options.batch_count
    seed = options.seed if options.seed >= 0 else random.SystemRandom().randrange(2**32 - total)
    renderer, report = Renderer(model, encoder), Reporter(on_progress)
    out_dir, results = Path(options.out_dir), []
    index = next_index(out_dir) if save else 0
    for batch in range(options.batch_count):  # A1111's batch count: batches one after another, seeds running on
        first = seed + batch * options.batch
        params = SamplingParams(
            prompt=calls.prompt,
            negative_prompt=options.negative_prompt,
            steps=options.steps,
            sampler=sampler,
            cfg=options.cfg,
            width=width,
            height=height,
            seeds=tuple(first + i for i in range(options.batch)),
        )
        done = batch * options.steps
        images = renderer.render(
            params,
            stop=stop,
            on_step=lambda step, done=done: report(Event.STEP, done + step, options.steps * options.batch_count),
        )
        if stop is not None and stop.is_set():
            log.info(
                "stopped: %d of %d images were finished and kept; the batch being drawn was dropped",
                len(results),
                total,
            )
            break
        for image, image_seed in zip(images, params.seeds, strict=True):
            text = infotext(replace(params, prompt=calls.shown), image_seed, model, hashes, options.clip_skip, extra)
            path = save_png(image, out_dir / f"{index + len(results):05d}-{image_seed}.png", text) if save else None
            results.append(GeneratedImage(path=path, seed=image_seed, infotext=text, image=image))
    return results
