"""Training an embedding: the usual textual-inversion recipe, made exact to resume.

Every weight of the model is frozen; the only trainable tensor is the embedding's own float32 vectors, spliced
into the text encoder (see conditioning.py), so the optimizer holds nothing else and the vocabulary is never
touched. Each image (and its mirror image, with ``flip``) is VAE-encoded once, with the posterior mean, and the
latents are kept. The loss is the MSE of the UNet's noise (or v) prediction.

Resume is exact: the data order, the prompts, the timesteps and the noise of step k are drawn from generators
seeded by (seed, k) alone, and the optimizer state is saved as safetensors + JSON beside the embedding copy;
so k steps, a stop, and N - k more steps give the same vectors as N steps straight.

Run folder (``runs/NAME`` by default)::

    options.json                 the resolved options, the model and the dataset
    loss.csv                     step, epoch, loss, lr
    embeddings/NAME-STEP.safetensors   a copy every save_every steps
    previews/NAME-STEP.png       a preview every preview_every steps (A1111 infotext inside)
    state/                       optimizer state and the step it belongs to (resume)
    NAME.safetensors             the final embedding (also written to the embeddings folder)
    report.html                  loss curve and previews
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .conditioning import PromptEncoder
from .config import TrainOptions, to_dict, validate_train
from .create import person_vectors
from .dataset import Dataset, load_dataset, square
from .embedding import Embedding, find_embedding_file, read_embedding, write_embedding
from .errors import EmbeddingError, TistudioError
from .generate import Renderer, SamplingParams, check_fits, infotext, save_png
from .models import SDModel, load_model
from .objective import (
    Evaluator,
    diffusion_loss,
    evaluation_batch,
    evaluation_loss,
    noise_schedule,
    seed_for,
)
from .runfolder import RunFolder, restore_optimizer
from .samplers import check_sampler
from .schedule import parse_schedule
from .storage import write_json
from .templates import fill_template, load_template, preview_prompt

log = logging.getLogger(__name__)

EVAL_SIZE = 16  # samples in the fixed evaluation batch
LOSS_FLUSH_STEPS = 25  # on GPUs the loss is read (a host-device sync) every this many steps


class TrainingDiverged(TistudioError):
    """The loss or the vectors became NaN or infinite."""


@dataclass(frozen=True)
class Progress:
    """What the trainer reports after each step and at each event."""

    event: str  # "encode", "start", "step", "preview", "save", "done", "stopped"
    step: int
    max_steps: int
    epoch: int = 0
    loss: float | None = None
    lr: float = 0.0
    elapsed_s: float = 0.0
    eta_s: float | None = None
    path: str | None = None
    message: str = ""


@dataclass
class TrainResult:
    embedding_path: Path
    run_dir: Path
    start_step: int
    step: int
    stopped: bool
    last_loss: float | None
    previews: list[Path] = field(default_factory=list)
    copies: list[Path] = field(default_factory=list)
    skipped_images: list[tuple[Path, str]] = field(default_factory=list)
    message: str = ""
    best_step: int | None = None  # the step kept as NAME.safetensors, when it is not the last
    converged_at: int | None = None  # where --stop auto ended the run


# ----------------------------------------------------------------------------------------------------------------
# Deterministic randomness: everything drawn at step k comes from (seed, k)


def epoch_order(seed: int, epoch: int, count: int) -> list[int]:
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed_for(seed, 1, epoch))).tolist()


def sample_indices(seed: int, first_sample: int, batch: int, count: int) -> list[int]:
    """Dataset indices of samples first_sample .. first_sample + batch - 1 (a fresh shuffle every epoch)."""
    out = []
    for sample in range(first_sample, first_sample + batch):
        epoch, position = divmod(sample, count)
        out.append(epoch_order(seed, epoch, count)[position])
    return out


# ----------------------------------------------------------------------------------------------------------------
# Batch size and fast math

AUTO_BATCH_LIMIT = 8  # --batch-size 0 tries 8, 4, 2, 1 (a common textual-inversion range)
AUTO_BATCH_HEADROOM = 0.9  # ... and takes the largest whose step peaks below this share of the GPU's memory


def largest_fitting(fits: Callable[[int], bool], largest: int) -> int:
    """The first of largest, largest // 2, ... for which fits(batch) holds; 1 if none does."""
    batch = max(1, largest)
    while batch > 1 and not fits(batch):
        batch //= 2
    return batch


def cuda_step_fits(model: SDModel, unet: Any, encoder: PromptEncoder, alphas: torch.Tensor, latents: torch.Tensor,
                   prompt: str, timesteps: int, vectors: torch.Tensor) -> Callable[[int], bool]:
    """fits(batch): whether one training forward and backward pass at this batch peaks below the headroom.

    It draws from its own generator and throws its gradient away, so the run itself is unchanged."""
    device = model.device

    def fits(batch: int) -> bool:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            generator = torch.Generator().manual_seed(0)
            t = torch.randint(0, timesteps, (batch,), generator=generator)
            noise = torch.randn((batch, *latents.shape[1:]), generator=generator).to(device)
            clean = latents[torch.arange(batch, device=device) % latents.shape[0]]
            diffusion_loss(model, encoder, alphas, clean, t.to(device), noise, [prompt] * batch, unet=unet).backward()
            torch.cuda.synchronize(device)
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            vectors.grad = None
            torch.cuda.empty_cache()
        peak = torch.cuda.max_memory_allocated(device)
        total = torch.cuda.get_device_properties(device).total_memory
        log.info("batch %d: a training step peaks at %.1f of %.1f GiB", batch, peak / 2**30, total / 2**30)
        return peak <= AUTO_BATCH_HEADROOM * total

    return fits


@contextmanager
def training_mode(model: SDModel, checkpointing: bool) -> Iterator[None]:
    """While training: gradient checkpointing if asked (only where gradients are on, so evaluation and previews are
    unaffected), and TF32 matmuls and convolutions on CUDA (Ampere and newer). Everything is restored after."""
    checkpointing = checkpointing and not model.unet.is_gradient_checkpointing
    cuda = model.device.type == "cuda"
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if checkpointing:
        model.unet.enable_gradient_checkpointing()
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        if cuda:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
        if checkpointing:
            model.unet.disable_gradient_checkpointing()


def choose_batch(options: TrainOptions, earlier: int | None, count: int, probe: Callable[[], Callable[[int], bool]]
                 | None) -> int:
    """The micro-batch: as asked; or (0, automatic) what the run began with, else the largest that `probe()`'s
    test lets fit (GPUs), else 1 (CPU and Mac: nothing is probed there; A1111's default)."""
    if options.batch_size:
        return min(options.batch_size, count)
    if earlier:
        batch = earlier
    elif probe is not None:
        batch = largest_fitting(probe(), min(AUTO_BATCH_LIMIT, count))
    else:
        batch = 1
    log.info("batch size %d (automatic%s)", batch, ", as this run began" if earlier else "")
    return batch


# ----------------------------------------------------------------------------------------------------------------
# Pieces of the run


@torch.no_grad()
def encode_latents(model: SDModel, dataset: Dataset, size: int, flip: bool) -> tuple[torch.Tensor, list[str]]:
    """One latent per image (and per mirror image): the VAE posterior mean times the scaling factor."""
    import numpy as np
    from PIL import ImageOps

    latents, captions = [], []
    for item in dataset.images:
        picture = square(item.image, size)
        variants = [picture, ImageOps.mirror(picture)] if flip else [picture]
        for variant in variants:
            array = torch.from_numpy(np.asarray(variant, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0
            pixels = array.unsqueeze(0).to(model.device, model.dtype)
            latent = model.vae.encode(pixels).latent_dist.mean.float() * model.scaling_factor
            latents.append(latent[0])  # kept in float32: the loss target should not be rounded to bf16
            captions.append(item.caption)
    return torch.stack(latents), captions


# ----------------------------------------------------------------------------------------------------------------
# Non-finite losses and gradients


class NonFiniteGuard:
    """Discards steps whose loss or gradient is NaN or infinite, halves the learning rate after each, and stops
    the run after `limit` of them in a row. The vectors never take a non-finite update."""

    def __init__(self, limit: int = 5, lr_factor: float = 1.0, in_a_row: int = 0) -> None:
        self.limit = limit
        self.lr_factor = lr_factor
        self.in_a_row = in_a_row
        self.discarded = 0

    def bad(self, step: int, saved_step: int) -> None:
        self.discarded += 1
        self.in_a_row += 1
        self.lr_factor *= 0.5
        log.warning("step %d: the loss or gradient was NaN or infinite; the step was discarded and the learning "
                    "rate halved (now x%g)", step, self.lr_factor)
        if self.in_a_row >= self.limit:
            raise TrainingDiverged(f"training stopped at step {step}: the loss or gradient was NaN or infinite "
                                   f"{self.in_a_row} steps in a row even after lowering the learning rate; the "
                                   f"embedding saved at step {saved_step} is intact; check the images and use a "
                                   "lower learning rate (or --precision fp32)")

    def good(self) -> None:
        self.in_a_row = 0

    def state(self) -> dict[str, Any]:
        return {"lr_factor": self.lr_factor, "nonfinite_in_a_row": self.in_a_row}


# ----------------------------------------------------------------------------------------------------------------
# The trainer


def train(options: TrainOptions, *, cache_dir: Path, model: SDModel | None = None,
          on_progress: Callable[[Progress], None] | None = None, stop: threading.Event | None = None,
          likeness: Callable[[SDModel, PromptEncoder], float | None] | None = None) -> TrainResult:
    """Train (or resume) an embedding; returns where everything was written.

    `likeness(model, encoder)`, if given, scores the current vectors (e.g. by generating pictures and reading
    them) at every evaluation; it is logged beside the fixed-batch loss in eval.csv, and where it measured every
    evaluation it chooses the step to keep (the highest likeness) instead of the loss.
    """
    started = time.monotonic()
    report = on_progress or (lambda progress: None)
    stop = stop or threading.Event()

    # 1. Check everything that needs no model.
    validate_train(options)
    preview_sampler = check_sampler(options.preview_sampler, "preview_sampler")
    template = load_template(options.template)
    embedding_path = find_embedding_file(options.embedding, options.embeddings_dir)
    embedding = read_embedding(embedding_path)
    if embedding.is_sdxl:
        raise EmbeddingError(f"embedding {embedding.name!r} is an SDXL embedding; SDXL training is not supported yet")
    name = embedding.name
    run = RunFolder(Path(options.run_dir or Path("runs") / name), name)
    target = embedding_path.with_suffix(".safetensors")  # where the trained embedding goes
    last_step = int(embedding.meta.get("last_step", "0") or 0)
    trained_to = max(embedding.step, last_step)
    if trained_to >= options.max_steps:
        message = (f"{name} is already trained to step {trained_to}, which is not below max_steps="
                   f"{options.max_steps}; raise --max-steps to train further")
        if last_step > embedding.step:
            message += f" (it keeps step {embedding.step}, the best)"
        log.info("%s", message)
        return TrainResult(embedding_path=embedding_path, run_dir=run.path, start_step=trained_to,
                           step=trained_to, stopped=False, last_loss=None, message=message)
    if last_step > embedding.step:
        # A finished run kept its best step as the embedding; training further continues from its last step.
        last_file = run.path / f"{name}-last.safetensors"
        if last_file.is_file():
            log.info("%s holds the best step %d; continuing from the last step %d", embedding_path.name,
                     embedding.step, last_step)
            embedding = replace(read_embedding(last_file), name=name)
        else:
            log.warning("%s is missing; continuing from the kept best step %d", last_file, embedding.step)
    start_step = embedding.step
    schedule = parse_schedule(options.learning_rate, max_steps=options.max_steps, start_step=start_step)
    dataset = load_dataset(options.dataset)
    log.info("%s", dataset.summary())

    # 2. The model, and what only it can tell.
    if model is None:
        model = load_model(options, cache_dir)
    check_fits(embedding, model)
    size = options.size or model.native_size
    if embedding.model_hash and model.hash and embedding.model_hash != model.hash:
        log.warning("%s was made with model %s (hash %s) and is now trained with %s (hash %s)", name,
                    embedding.model_name or "?", embedding.model_hash, model.name, model.hash)
    device = model.device
    encoder = PromptEncoder.for_model(model, options.clip_skip)
    if not encoder.token_ids(name):
        raise EmbeddingError(f"embedding name {name!r} gives no CLIP tokens; rename the file to a plain word")

    # 3. The run folder.
    earlier_batch = run.resolved_batch() if start_step > 0 else None  # a resumed run keeps its batch size
    run.open(start_step)
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        stale.unlink(missing_ok=True)  # left by a run killed while writing the embedding
    if target != embedding_path:
        log.info("%s is kept as it is; the trained embedding is written to %s", embedding_path, target)

    # 4. Latents, once.
    report(Progress("encode", start_step, schedule.end_step, message=f"encoding {len(dataset.images)} images"))
    latents, captions = encode_latents(model, dataset, size, options.flip)
    count = latents.shape[0]
    alphas, timesteps = noise_schedule(model)
    alphas = alphas.to(device)

    # 5. The trainable vectors, their optimizer, and the resume state.
    vectors = torch.nn.Parameter(embedding.tensor.to(device, torch.float32).clone())
    encoder.set_embeddings({name: vectors})
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW([vectors], lr=schedule.rate_at(start_step), weight_decay=options.weight_decay,
                                  fused=True if cuda else None)
    # On CUDA a GradScaler skips non-finite steps on the device, without a host sync; it also scales fp16 losses.
    scaler = None
    if cuda:
        fp16 = model.dtype == torch.float16
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**16 if fp16 else 1.0,
                                      growth_interval=2000 if fp16 else 2**30)
    guard = NonFiniteGuard()
    saved = None
    if start_step > 0:
        saved = run.load_state(start_step, embedding.tensor)
        if saved is not None:
            restore_optimizer(optimizer, saved, vectors)
            if scaler is not None and saved["meta"].get("grad_scaler"):
                scaler.load_state_dict(saved["meta"]["grad_scaler"])
            guard = NonFiniteGuard(lr_factor=float(saved["meta"].get("lr_factor", 1.0)),
                                   in_a_row=int(saved["meta"].get("nonfinite_in_a_row", 0)))
            log.info("resuming %s from step %d with its optimizer state", name, start_step)
        else:
            log.info("resuming %s from step %d", name, start_step)

    # Where the vectors started (for --init-pull), and how long a typical word's vector is (for --max-norm).
    initial = (saved["tensors"]["init_vectors"].to(device) if saved and "init_vectors" in saved["tensors"]
               else vectors.detach().clone())
    norm_limit = None
    if options.max_norm:
        table = model.text_encoder.get_input_embeddings().weight.detach().float()
        norm_limit = options.max_norm * float(table.norm(dim=1).median())
    evaluator = None
    if options.eval_every:
        batch_eval = evaluation_batch(count, captions, template, name, options.seed, tuple(latents.shape[1:]),
                                      timesteps, size=EVAL_SIZE)
        evaluator = Evaluator(model, encoder, alphas, latents, batch_eval, run.path / "eval.csv", likeness)
        evaluator.open(start_step, saved)
        if evaluator.neutral is None:
            # The loss's drop is counted from the person-like start; a run that started elsewhere measures it once.
            neutral = person_vectors(model, vectors.shape[0])["clip"].to(device)
            if not torch.equal(neutral, initial.to(torch.float32)):
                encoder.set_embeddings({name: neutral})
                try:
                    evaluator.neutral = evaluation_loss(model, encoder, alphas, latents, batch_eval)
                finally:
                    encoder.set_embeddings({name: vectors})
                log.info("fixed-batch loss of the person-like start: %.5f (the loss's drop is counted from it "
                         "where it is below this run's start)", evaluator.neutral)

    renderer = Renderer(model, encoder) if options.preview_every else None
    prompt_for_preview = options.preview_prompt or preview_prompt(template, name)
    result = TrainResult(embedding_path=target, run_dir=run.path, start_step=start_step, step=start_step,
                         stopped=False, last_loss=None, skipped_images=dataset.skipped)
    pending: list[tuple[int, int, torch.Tensor, float, torch.Tensor]] = []
    saved_step = start_step

    def flush() -> None:
        """Write the pending loss rows (one host read for all of them) and account for discarded steps."""
        if not pending:
            return
        values = torch.stack([torch.stack([loss, finite.float()]) for _, _, loss, _, finite in pending]).tolist()
        rows = list(zip(pending, values, strict=True))
        pending.clear()
        run.append_losses([f"{s},{e},{loss:.6f},{lr:g}" for (s, e, _, lr, _), (loss, _) in rows])
        for _, (loss, finite) in rows:
            if finite and loss == loss:
                result.last_loss = loss
        if cuda:  # on the CPU bad steps were handled as they happened
            for (s, _, _, _, _), (_, finite) in rows:
                if finite:
                    guard.good()
                else:
                    guard.bad(s, saved_step)

    def current(step: int) -> Embedding:
        return replace(embedding, vectors={"clip": vectors.detach().to("cpu", torch.float32).clone()}, step=step,
                       model_hash=model.hash, model_name=model.name,
                       meta={**embedding.meta, "model_family": model.family})

    def save(step: int, copy: bool, final: bool) -> None:
        """Copy (optional), resume state, the embedding; in that order, so a kill never orphans an embedding."""
        nonlocal saved_step
        flush()
        snapshot = current(step)
        if copy:
            path = write_embedding(replace(snapshot, name=f"{name}-{step}"), run.copy_path(step))
            if path not in result.copies:
                result.copies.append(path)
            report(Progress("save", step, schedule.end_step, path=str(path), elapsed_s=time.monotonic() - started))
        extra_meta, extra_tensors = evaluator.state() if evaluator is not None else ({}, {})
        run.save_state(step, vectors, optimizer, scaler, {**guard.state(), **extra_meta},
                       {**extra_tensors, "init_vectors": initial})
        write_embedding(snapshot, target)
        run.prune_states(keep=step)
        if final:
            write_embedding(snapshot, run.path / f"{name}.safetensors")
        saved_step = step

    def make_preview(step: int) -> None:
        path = run.preview_path(step)
        if renderer is None or (path.exists() and step == start_step):
            return
        params = SamplingParams(prompt=prompt_for_preview, negative_prompt=options.preview_negative_prompt,
                                steps=options.preview_steps, sampler=preview_sampler, cfg=options.preview_cfg,
                                width=size, height=size, seeds=(options.preview_seed,))
        image = renderer.render(params)[0]
        text = infotext(params, options.preview_seed, model, {}, options.clip_skip)
        save_png(image, path, text + f"\nEmbedding: {name}, Step: {step}")
        result.previews.append(path)
        report(Progress("preview", step, schedule.end_step, path=str(path), elapsed_s=time.monotonic() - started))

    def evaluate(step: int) -> None:
        loss, like = evaluator.evaluate(step, vectors, candidate=step > 0)
        shown = f"fixed-batch loss {loss:.5f}" + ("" if like is None else f", likeness {like:.2f}")
        report(Progress("eval", step, schedule.end_step, loss=loss, elapsed_s=time.monotonic() - started,
                        message=shown))

    if evaluator is not None and start_step == 0:
        evaluate(0)  # the untrained start, for the curve (a resume keeps the history it had)
    if options.preview_every:
        make_preview(start_step)
    report(Progress("start", start_step, schedule.end_step, lr=schedule.rate_at(start_step) * guard.lr_factor,
                    elapsed_s=time.monotonic() - started, message=dataset.summary()))

    # 6. The loop: one optimizer step = gradient_accumulation micro-batches of batch_size samples.
    accumulation = options.gradient_accumulation
    flush_every = LOSS_FLUSH_STEPS if cuda else 1  # reading the loss syncs a GPU: batch it there
    step = start_step
    # The training steps may use a compiled UNet; evaluation and previews use the model's own.
    unet = torch.compile(model.unet) if options.compile_unet else model.unet

    def probe() -> Callable[[int], bool]:
        longest = max((fill_template(line, name, caption, random.Random(0)) for line in template
                       for caption in captions), key=len)
        return cuda_step_fits(model, unet, encoder, alphas, latents, longest, timesteps, vectors)

    with training_mode(model, options.gradient_checkpointing):
        batch = choose_batch(options, earlier_batch, count, probe if cuda else None)
        per_step = batch * accumulation
        write_json(run.path / "options.json", {"options": to_dict(options), "resolved": {
            "embedding_file": str(embedding_path), "start_step": start_step, "end_step": schedule.end_step,
            "schedule": [list(pair) for pair in schedule.pairs], "size": size, "batch_size": batch,
            "device": str(device), "dtype": str(model.dtype).replace("torch.", ""), "model": model.describe(),
            "model_hash": model.hash, "family": model.family, "prediction_type": model.prediction_type,
            "images": len(dataset.images), "skipped_images": [[str(p), r] for p, r in dataset.skipped],
            "compiled_unet": options.compile_unet,
            "neutral_loss": None if evaluator is None else evaluator.neutral, "tistudio_version": __version__}})
        loop_started = time.monotonic()
        while step < schedule.end_step and not stop.is_set():
            lr = schedule.rate_at(step) * guard.lr_factor
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = torch.zeros((), device=device)
            for micro in range(accumulation):
                first = step * per_step + micro * batch
                indices = sample_indices(options.seed, first, batch, count)
                rng = random.Random(seed_for(options.seed, 2, step, micro))
                prompts = [fill_template(rng.choice(template), name, captions[i], rng, options.shuffle_tags,
                                         options.tag_dropout) for i in indices]
                generator = torch.Generator().manual_seed(seed_for(options.seed, 3, step, micro))
                t = torch.randint(0, timesteps, (batch,), generator=generator)
                noise = torch.randn((batch, *latents.shape[1:]), generator=generator).to(device)
                clean = latents[torch.tensor(indices, device=device)]
                loss = diffusion_loss(model, encoder, alphas, clean, t.to(device), noise, prompts,
                                      unet=unet) / accumulation
                if options.init_pull and micro == 0:
                    loss = loss + options.init_pull * (vectors - initial).pow(2).mean()
                if loss.requires_grad:  # a prompt without the name gives the vectors no gradient
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                step_loss += loss.detach()
            if scaler is not None:
                scaler.unscale_(optimizer)
            grad = vectors.grad if vectors.grad is not None else torch.zeros_like(vectors)
            finite = torch.isfinite(step_loss) & torch.isfinite(grad).all()
            if options.clip_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(vectors, options.clip_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)  # skipped on the device when the gradient is not finite
                scaler.update()
            elif bool(finite):
                optimizer.step()
                guard.good()
            else:
                guard.bad(step + 1, saved_step)
            optimizer.zero_grad(set_to_none=True)
            if norm_limit is not None:
                with torch.no_grad():
                    vectors.mul_((norm_limit / vectors.norm(dim=1, keepdim=True).clamp(min=1e-12)).clamp(max=1.0))
            step += 1
            result.step = step
            epoch = (step * per_step - 1) // count
            pending.append((step, epoch, step_loss, lr, finite))
            if len(pending) >= flush_every:
                flush()
            elapsed = time.monotonic() - loop_started
            report(Progress("step", step, schedule.end_step, epoch=epoch, loss=result.last_loss, lr=lr,
                            elapsed_s=time.monotonic() - started,
                            eta_s=elapsed / (step - start_step) * (schedule.end_step - step)))
            if evaluator is not None and step % options.eval_every == 0:
                evaluate(step)
                if options.stop == "auto" and evaluator.converged():
                    result.converged_at = step
                    log.info("the fixed-batch loss has converged at step %d; stopping (--stop auto)", step)
                    break
            if options.save_every and step % options.save_every == 0 and step < schedule.end_step:
                save(step, copy=True, final=False)
            if options.preview_every and step % options.preview_every == 0:
                make_preview(step)

    # 7. Save where we are: finished, converged, or stopped by the caller (Ctrl-C).
    result.stopped = step < schedule.end_step and result.converged_at is None
    if evaluator is not None and not result.stopped and step % options.eval_every:
        evaluate(step)  # the last step is always a candidate for the best
    save(step, copy=bool(options.save_every) and not result.stopped, final=True)
    best = evaluator.best if evaluator is not None else None
    if not result.stopped and options.final == "best" and best is not None and best.step != step:
        # Keep the best step as NAME.safetensors, and the last as NAME-last.safetensors beside it.
        last = current(step)
        chosen = replace(last, vectors={"clip": best.vectors.clone()}, step=best.step,
                         meta={**last.meta, "best_step": str(best.step), "last_step": str(step),
                               "best_by": best.by})
        write_embedding(chosen, target)
        write_embedding(chosen, run.path / f"{name}.safetensors")
        write_embedding(replace(last, name=f"{name}-last"), run.path / f"{name}-last.safetensors")
        result.best_step = best.step
    if options.preview_every and not result.stopped and step % options.preview_every:
        make_preview(step)
    from .report import write_run_report

    write_run_report(run.path, name)
    if result.stopped:
        result.message = f"stopped at step {step} of {schedule.end_step}; saved. Run the same train command to continue"
    elif result.converged_at is not None:
        result.message = f"trained {name} to step {step}, where its fixed-batch loss had converged (--stop auto)"
    else:
        result.message = f"trained {name} to step {step}"
    if result.best_step is not None:
        result.message += (f"; kept step {result.best_step} ({best.by}) as "
                           f"{target.name}, the last is {run.path / (name + '-last.safetensors')}")
    if guard.discarded:
        result.message += f" ({guard.discarded} non-finite steps discarded)"
    report(Progress("stopped" if result.stopped else "done", step, schedule.end_step, loss=result.last_loss,
                    elapsed_s=time.monotonic() - started, path=str(target), message=result.message))
    return result
