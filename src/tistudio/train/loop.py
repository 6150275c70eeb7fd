"""Training an embedding: the usual textual-inversion recipe, made exact to resume.

Every weight of the model is frozen; what trains is a Trainable (train/trainable.py) - the embedding's own float32
vectors, one set per text encoder, spliced into the text encoders (see models/conditioning.py) - so the optimizer holds
nothing else and the vocabulary is never touched. Each image (and its mirror image, with ``flip``) is VAE-encoded
once, with the posterior mean, and the latents are kept. The loss is the MSE of the UNet's noise (or v) prediction.

Resume is exact: the data order, the prompts, the timesteps and the noise of step k are drawn from generators
seeded by (seed, k) alone, and the optimizer state is saved as safetensors + JSON beside the embedding copy; so
k steps, a stop, and N - k more steps give the same vectors as N steps straight. The run folder's layout is in
train/runfolder.py.

``train()`` reads as the job's stages; the pieces it calls are below it, in the order it calls them.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from tistudio import __version__
from tistudio.config import TrainOptions, parse_size, preview_prompts, to_dict, validate_train
from tistudio.embeddings.files import Embedding, find_embedding_file, png_embedding_text, read_embedding
from tistudio.errors import EmbeddingError, TistudioError
from tistudio.generate.images import Renderer, SamplingParams, check_fits, infotext, save_png
from tistudio.models.conditioning import PromptEncoder
from tistudio.models.loading import SDModel, load_model, resolve_device
from tistudio.prepare.buckets import Size, choose_buckets, cover_crop, fit, most_common, per_picture
from tistudio.prepare.buckets import describe as describe_buckets
from tistudio.prepare.dataset import Dataset, TrainImage, load_dataset, square
from tistudio.progress import Event, Progress, Reporter
from tistudio.samplers import check_sampler
from tistudio.schedule import Schedule, parse_schedule
from tistudio.storage import write_json
from tistudio.templates import fill_template, load_template, preview_prompt
from tistudio.train.evaluation import Evaluator, Likeness, evaluation_batch, evaluation_due
from tistudio.train.latents import Rows, batches_per_epoch, bucket_batch, bucket_mode
from tistudio.train.lora import LoraTrainable, check_resumable
from tistudio.train.masks import loss_weights, mask_mode
from tistudio.train.objective import Denoiser, batch_loss, denoiser_for, seed_for, size_ids
from tistudio.train.parallel import Parallel, PeerLost, process_group
from tistudio.train.runfolder import (
    STEP_MARKS,
    ResumeState,
    RunFolder,
    read_eval_log,
    restore_optimizer,
    run_folder,
)
from tistudio.train.tensorboard import Board
from tistudio.train.trainable import (
    EmbeddingTrainable,
    Trainable,
    TrainableFactory,
    Trainables,
    TrainableSetup,
    norm_limits,
)

log = logging.getLogger(__name__)

FORMER_EVAL_SIZE = 16  # the fixed batch of runs begun before its size was an option (random timesteps)
LOSS_FLUSH_STEPS = 25  # on GPUs the loss is read (a host-device sync) every this many steps


class TrainingDiverged(TistudioError):
    """The loss or the vectors became NaN or infinite."""


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
# The job


def train(
    options: TrainOptions,
    *,
    cache_dir: Path,
    model: SDModel | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    stop: threading.Event | None = None,
    likeness: Likeness | None = None,
    parallel: Parallel | None = None,
    beside: Sequence[TrainableFactory] = (),
) -> TrainResult:
    """Train (or resume) an embedding; returns where everything was written.

    `likeness(model, encoder)`, if given, scores the current vectors (e.g. by generating pictures and reading
    them) at every evaluation; it is logged beside the fixed-batch loss in eval.csv, and where it measured every
    evaluation it chooses the step to keep (the highest likeness) instead of the loss.

    `parallel` makes this process one of a data-parallel run (train/parallel.py; torchrun and accelerate launch set
    it up through the environment): it computes its share of every batch, and only process 0 writes and reports.

    `beside`: makers of further trainables (train/trainable.py) trained with the word's vectors through the same loop,
    each writing its own file beside the embedding.
    """
    parallel = parallel or Parallel()
    validate_train(options)
    device = model.device if model is not None else resolve_device(parallel.device_choice(options.device))
    with process_group(parallel, device), ExitStack() as cleanup:  # cleanup: what the run opens and installs
        return run_training(
            options,
            cache_dir=cache_dir,
            model=model,
            on_progress=on_progress,
            stop=stop,
            likeness=likeness,
            parallel=parallel,
            cleanup=cleanup,
            beside=beside,
        )


def run_training(
    options: TrainOptions,
    *,
    cache_dir: Path,
    model: SDModel | None,
    on_progress: Callable[[Progress], None] | None,
    stop: threading.Event | None,
    likeness: Likeness | None,
    parallel: Parallel,
    cleanup: ExitStack,
    beside: Sequence[TrainableFactory] = (),
) -> TrainResult:
    """train()'s stages, in the process group of a data-parallel run where there is one."""
    main = parallel.main
    report = Reporter(on_progress if main else None)
    stop = stop or threading.Event()

    # 1. Check the inputs: nothing here needs the model.
    template = load_template(options.template)
    point = resume_point(options)
    if point.finished:
        return nothing_to_train(point)
    name, start_step = point.name, point.step
    schedule = parse_schedule(options.learning_rate, max_steps=options.max_steps, start_step=start_step)
    dataset = load_dataset(options.dataset)
    log.info("%s", dataset.summary())

    # 2. The model, and what only it can tell.
    model = model or load_model(replace(options, device=parallel.device_choice(options.device)), cache_dir)
    encoder = check_model(point, model, options)
    size = options.size or model.native_size

    # 3. What trains, and where the last sitting left it (each trainable's state checked against its own values).
    word, trainable, saved = make_trainables(point, model, encoder, options, schedule, beside, cleanup)
    denoiser = denoiser_for(model, encoder)

    # 4. Open the run folder; encode the images once.
    earlier_batch = point.run.resolved_batch(parallel.world) if start_step > 0 else None  # a resume keeps its batch
    parallel.barrier(model.device)  # every process has read the run folder before process 0 changes it
    if main:
        point.run.open(start_step, set_aside=point.set_aside)
        remove_stale_temporaries(point.target, point.embedding_path)
    report(Event.ENCODE, start_step, schedule.end_step, message=f"encoding {len(dataset.images)} images")
    shaped = Shaping.decide(options, template, saved, start_step, dataset, size, model.spec.size_conditioning)
    samples = encode_samples(
        model, dataset, shaped.buckets, template, name, replace(options, loss_mask=shaped.masking), parallel, stop
    )
    if samples is None:  # a stop asked while encoding
        return stopped_while_encoding(point, report, schedule.end_step)

    # 5. The optimizer, evaluation, previews and checkpoints.
    optimizer, scaler = make_optimizer(trainable, model, options, start_step)
    guard = restore(optimizer, scaler, trainable, saved, name, start_step)
    unmeasured: list[str] = []  # why a face likeness cannot judge this run, said in options.json and on the page
    if main and likeness is None and options.likeness != "off" and options.eval_every:
        likeness = face_likeness_of(dataset, name, size, options, unmeasured)
    evaluator = (
        make_evaluator(denoiser, samples, point.run, options, likeness, start_step, saved, trainable) if main else None
    )
    session = Session(
        options=options,
        point=point,
        schedule=schedule,
        parallel=parallel,
        report=report,
        stop=stop,
        denoiser=denoiser,
        trainable=trainable,
        optimizer=optimizer,
        scaler=scaler,
        guard=guard,
        samples=samples,
        evaluator=evaluator,
        result=TrainResult(
            point.target, point.run.path, start_step, start_step, False, None, skipped_images=dataset.skipped
        ),
    )
    carried = partial(word_at, word, name) if options.preview_embedded else None
    shown = parse_size(options.preview_size, "preview_size") or most_common(shaped.buckets)
    session.open_outputs(template, shown, shaped.kept(), cleanup, dataset.summary(), carried)

    # 6. The loop: one optimizer step = gradient_accumulation micro-batches of batch_size samples.
    record = partial(
        write_run_options,
        point,
        options,
        model,
        schedule,
        dataset,
        size,
        evaluator=evaluator,
        parallel=parallel,
        masking=describe_masking(shaped.masking, samples),
        judged=judged_by(evaluator, unmeasured),
        bucketing=shaped.describe(),
    )
    session.train(earlier_batch, record if main else None)

    # 7. Finish: save where we are (finished, converged, or stopped by the caller), keep the best step, report.
    return session.finish()


@dataclass
class Session:
    """A run once everything is in place: what the loop and the end share."""

    options: TrainOptions
    point: ResumePoint
    schedule: Schedule
    parallel: Parallel
    report: Reporter
    stop: threading.Event
    denoiser: Denoiser
    trainable: Trainable
    optimizer: torch.optim.Optimizer
    scaler: Any
    guard: NonFiniteGuard
    samples: Samples
    evaluator: Evaluator | None
    result: TrainResult
    previewer: Previewer | None = None
    board: Board | None = None
    losses: LossLog | None = None
    checkpoints: Checkpointer | None = None

    @property
    def end(self) -> int:
        return self.schedule.end_step

    def rates(self, step: int) -> list[float]:
        """Each parameter group's learning rate at `step` (after the guard's halvings)."""
        return [group.schedule.rate_at(step) * self.guard.lr_factor for group in self.trainable.groups()]

    def open_outputs(
        self,
        template: tuple[str, ...],
        preview_size: Size,
        decided: dict[str, str],
        cleanup: ExitStack,
        summary: str,
        carried: Callable[[int], Embedding] | None,
    ) -> None:
        """The previewer (`carried`: the embedding a preview stores, --preview-embedded), TensorBoard, the loss log
        and the checkpointer (`decided`: what the run decided once, kept in its resume state); the start's evaluation
        and preview (`preview_size`: the most common bucket)."""
        options, point, main, start = self.options, self.point, self.parallel.main, self.result.start_step
        if options.preview_every and main:
            self.previewer = Previewer(
                self.denoiser.model,
                self.denoiser.encoder,
                preview_params(options, template, point.name, preview_size),
                point.run,
                options.clip_skip,
                carried,
            )
        if options.tensorboard and main:
            self.board = cleanup.enter_context(Board(point.run.path / "tensorboard", start))
            self.report.also(self.board.progress)
        self.losses = LossLog(point.run, self.guard, deferred=self.scaler is not None, writes=main, board=self.board)
        self.checkpoints = Checkpointer(
            point.run,
            self.trainable,
            point.target,
            ResumeState(self.trainable.parameters(), self.optimizer, self.scaler),
            self.guard,
            self.evaluator,
            self.losses,
            start,
            writes=main,
            meta=decided,
        )
        if self.evaluator is not None and start == 0:
            evaluate(self.evaluator, self.trainable, 0, self.end, self.report)  # the untrained start, for the curve
        if self.previewer is not None and not self.stop.is_set():
            preview(self.previewer, start, self.end, self.result, self.report, skip_existing=True)
        self.report(Event.START, start, self.end, lr=self.rates(start)[0], message=summary)

    def train(self, earlier_batch: int | None, record: Callable[[int], None] | None) -> None:
        """In training mode: the batch size (as the run began, asked, or the largest that fits), recorded with the
        options (`record(batch)`), then the loop. The steps may use a compiled UNet; evaluation and previews use
        the model's own."""
        options, model = self.options, self.denoiser.model
        with training_mode(model, options.gradient_checkpointing, options.channels_last):
            stepping = self.denoiser.with_backbone(torch.compile(model.unet)) if options.compile_unet else self.denoiser
            probe = partial(cuda_step_fits, stepping, self.samples, self.trainable) if self.scaler else None
            batch = choose_batch(options, earlier_batch, self.samples.count, probe)
            batch = self.parallel.smallest(batch, model.device)
            if record is not None:
                record(batch)
            self.loop(stepping, batch)

    def loop(self, stepping: Denoiser, batch: int) -> None:
        """Optimizer steps from the start step to the end, a stop, or --stop auto's convergence."""
        options, parallel, samples, result = self.options, self.parallel, self.samples, self.result
        per_step = batch * parallel.world * options.gradient_accumulation  # the global batch
        stepper = Stepper(self.trainable, self.optimizer, self.scaler, options.clip_grad_norm, parallel)
        started, step = time.monotonic(), result.start_step
        agreed_stop = False  # several processes stop at a step they all agreed on (train/parallel.py)
        while step < self.end and not (agreed_stop if parallel.active else self.stop.is_set()):
            rates = self.rates(step)
            micro_batches = (
                my_part(samples.draw(step, micro, batch * parallel.world, per_step, stepping), parallel, batch)
                for micro in range(options.gradient_accumulation)
            )
            try:
                outcome = train_step(
                    stepping,
                    stepper,
                    micro_batches,
                    options.gradient_accumulation,
                    rates,
                    self.stop.is_set(),
                    abandon=None if parallel.active else self.stop,
                )
            except PeerLost as lost:
                raise peer_lost(lost, self.checkpoints, step, result, self.report, self.end) from lost
            if outcome is None:  # stopped between two micro-batches: the step is dropped, the last one is saved
                break
            loss, finite, agreed_stop = outcome
            if self.scaler is None:  # on a GPU the GradScaler skipped a bad step; the loss log accounts for it later
                self.guard.good() if bool(finite) else self.guard.bad(step + 1, self.checkpoints.saved_step)
            step = result.step = step + 1
            epoch = samples.epoch(step, batch * parallel.world, per_step)
            self.losses.add(LossRow(step, epoch, loss, rates[0], finite), self.checkpoints.saved_step)
            elapsed = time.monotonic() - started
            self.report(
                Event.STEP,
                step,
                self.end,
                epoch=epoch,
                loss=self.losses.last_loss,
                lr=rates[0],
                eta_s=elapsed / (step - result.start_step) * (self.end - step),
            )
            if self.after_step(step):
                break

    def after_step(self, step: int) -> bool:
        """Evaluation, copies and previews due after `step`; True where --stop auto ends the run here."""
        options = self.options
        if evaluation_due(step, options.eval_every):
            converged = False
            if self.evaluator is not None:
                evaluate(self.evaluator, self.trainable, step, self.end, self.report, last=step >= self.end)
                converged = options.stop == "auto" and self.evaluator.converged()
            if options.stop == "auto" and self.parallel.agree(converged, self.denoiser.model.device):
                self.result.converged_at = step
                log.info("the fixed-batch loss has converged at step %d; stopping (--stop auto)", step)
                return True
        if options.save_every and step % options.save_every == 0 and step < self.end:
            self.checkpoints.save(step, copy=True, final=False, result=self.result, report=self.report, total=self.end)
        if self.previewer is not None and step % options.preview_every == 0:
            preview(self.previewer, step, self.end, self.result, self.report)
        return False

    def finish(self) -> TrainResult:
        """Save where the run is, keep the best step, write the report; the result."""
        options, result, evaluator, point = self.options, self.result, self.evaluator, self.point
        step = result.step
        result.stopped = step < self.end and result.converged_at is None
        if evaluator is not None and not result.stopped and not evaluation_due(step, options.eval_every):
            evaluate(evaluator, self.trainable, step, self.end, self.report, last=True)  # always a candidate
        self.checkpoints.save(
            step,
            copy=bool(options.save_every),  # a stop's step too: it can be chosen later ("Use this step", use-step)
            final=True,
            result=result,
            report=self.report,
            total=self.end,
        )
        best = evaluator.best if evaluator is not None else None
        if not result.stopped and options.final == "best" and best is not None and best.step != step:
            self.checkpoints.keep_best(best, step)  # NAME.safetensors holds the best step, NAME-last the last
            result.best_step = best.step
        if self.previewer is not None and not result.stopped and step % options.preview_every:
            preview(self.previewer, step, self.end, result, self.report)
        from tistudio.train.report import write_run_report

        if self.parallel.main:
            write_run_report(point.run.path, point.name)
        if self.board is not None:
            self.board.close()  # before the caller hears DONE, so that the files are whole
        result.last_loss = self.losses.last_loss
        result.message = final_message(result, point.name, self.end, best, point, self.guard.discarded)
        self.report(
            Event.STOPPED if result.stopped else Event.DONE,
            step,
            self.end,
            loss=result.last_loss,
            path=str(point.target),
            message=result.message,
        )
        return result


# ----------------------------------------------------------------------------------------------------------------
# 1. Where the run starts


@dataclass
class ResumePoint:
    """Where a run starts, decided from the options and the files alone."""

    name: str
    embedding_path: Path  # the file the options name
    embedding: Embedding  # what training continues from (the last step, where the file keeps the best)
    target: Path  # where the trained embedding is written (embedding_path as .safetensors)
    run: RunFolder
    step: int
    finished: str = ""  # why there is nothing to train, if there is not
    continued_from: Path | None = None  # the file `embedding` was read from, where it is not embedding_path
    set_aside: bool = False  # continue from the kept step: the run's later steps are moved aside first

    @property
    def source(self) -> Path:
        """The file training continues from (what trains beside the word keeps its own file beside it)."""
        return self.continued_from or self.embedding_path


def stopped_while_encoding(point: ResumePoint, report: Reporter, end_step: int) -> TrainResult:
    """The result of a run stopped before its first step: nothing changed, the embedding is as it was."""
    message = f"stopped while encoding the images, before step {point.step + 1}; nothing was trained or changed"
    log.info("%s", message)
    report(Event.STOPPED, point.step, end_step, path=str(point.embedding_path), message=message)
    return TrainResult(point.embedding_path, point.run.path, point.step, point.step, True, None, message=message)


def nothing_to_train(point: ResumePoint) -> TrainResult:
    """The result of a run already trained to max_steps."""
    log.info("%s", point.finished)
    return TrainResult(
        embedding_path=point.embedding_path,
        run_dir=point.run.path,
        start_step=point.step,
        step=point.step,
        stopped=False,
        last_loss=None,
        message=point.finished,
    )


def resume_point(options: TrainOptions) -> ResumePoint:
    """The embedding to train and the step it continues from: the embedding's own step, or - where a finished run
    kept its best step as the embedding - the last step, from the run folder's NAME-last.safetensors."""
    embedding_path = find_embedding_file(options.embedding, options.embeddings_dir)
    embedding = read_embedding(embedding_path)
    name = embedding.name
    run = run_folder(name, options.run_dir)
    if options.tensorboard:
        from tistudio.train.tensorboard import check_folder

        check_folder(run.path / "tensorboard")  # before any compute
    point = ResumePoint(
        name=name,
        embedding_path=embedding_path,
        embedding=embedding,
        target=embedding_path.with_suffix(".safetensors"),
        run=run,
        step=embedding.step,
    )
    check_resumable(embedding, options)
    last_step = embedding.meta_count("last_step") or 0
    if options.continue_from == "kept" and last_step > embedding.step:
        return from_kept_step(point, last_step, options)
    trained_to = max(embedding.step, last_step)
    if trained_to >= options.max_steps:
        point.finished = (
            f"{name} is already trained to step {trained_to}, which is not below max_steps="
            f"{options.max_steps}; raise --max-steps to train further"
        )
        if last_step > embedding.step:
            point.finished += f" (it keeps step {embedding.step}, the best)"
        point.step = trained_to
    elif last_step > embedding.step:
        if run.last_path.is_file():
            log.info(
                "%s holds the best step %d; continuing from the last step %d",
                embedding_path.name,
                embedding.step,
                last_step,
            )
            point.embedding = replace(read_embedding(run.last_path), name=name)
            point.step, point.continued_from = point.embedding.step, run.last_path
        else:
            log.warning("%s is missing; continuing from the kept best step %d", run.last_path, embedding.step)
    return point


def from_kept_step(point: ResumePoint, last_step: int, options: TrainOptions) -> ResumePoint:
    """The resume point of --continue-from kept: the step the embedding holds, as a fresh branch of the run (the
    steps after it are set aside when the run folder opens)."""
    embedding = point.embedding
    if embedding.step >= options.max_steps:
        point.finished = (
            f"{point.name} holds step {embedding.step}, which is not below max_steps={options.max_steps}; raise "
            "--max-steps to train further"
        )
        return point
    log.info(
        "%s holds step %d; continuing from it, not from the last step %d (steps after it are set aside)",
        point.embedding_path.name,
        embedding.step,
        last_step,
    )
    unmarked = {k: v for k, v in embedding.meta.items() if k not in STEP_MARKS}
    point.embedding, point.set_aside = replace(embedding, meta=unmarked), True
    return point


# ----------------------------------------------------------------------------------------------------------------
# 2. The model


def check_model(point: ResumePoint, model: SDModel, options: TrainOptions) -> PromptEncoder:
    """That the embedding fits the model and its name gives tokens; the prompt encoder that will train it."""
    embedding, name = point.embedding, point.name
    check_fits(embedding, model)
    if embedding.model_hash and model.hash and embedding.model_hash != model.hash:
        log.warning(
            "%s was made with model %s (hash %s) and is now trained with %s (hash %s)",
            name,
            embedding.model_name or "?",
            embedding.model_hash,
            model.name,
            model.hash,
        )
    encoder = PromptEncoder.for_model(model, options.clip_skip)
    if not encoder.token_ids(name):
        raise EmbeddingError(f"embedding name {name!r} gives no CLIP tokens; rename the file to a plain word")
    return encoder


# ----------------------------------------------------------------------------------------------------------------
# 3. The run folder and the images


def remove_stale_temporaries(target: Path, embedding_path: Path) -> None:
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        stale.unlink(missing_ok=True)  # left by a run killed while writing the embedding
    if target != embedding_path:
        log.info("%s is kept as it is; the trained embedding is written to %s", embedding_path, target)


class StopBeforeTraining(Exception):  # a signal, not an error
    """A stop asked while the images were being encoded: nothing was trained."""


@torch.no_grad()
def encode_latents(
    model: SDModel,
    dataset: Dataset,
    size: int | Sequence[Size],
    flip: bool,
    only: range | None = None,
    stop: threading.Event | None = None,
) -> tuple[Rows, list[str]]:
    """One latent per image (and per mirror image): the VAE posterior mean times the scaling factor, of the image
    fitted to its training size - `size`: each image's bucket (prepare/buckets.py), or one square side for all.
    `only`: the indices of the images to encode (a data-parallel process's share), all by default. A `stop` asked
    meanwhile acts between two images (StopBeforeTraining): a large set at a large size takes minutes to encode."""
    import numpy as np
    from PIL import ImageOps

    vae = model.vae
    # a VAE that overflows in fp16 (SDXL's says force_upcast) encodes in fp32; it runs once per image
    upcast = model.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    if upcast:
        vae.float()
    latents, captions = [], []
    buckets = per_picture(size, len(dataset.images))
    try:
        for index in range(len(dataset.images)) if only is None else only:
            item = dataset.images[index]
            if stop is not None and stop.is_set():
                raise StopBeforeTraining
            picture = fit(item.image, buckets[index])
            variants = [picture, ImageOps.mirror(picture)] if flip else [picture]
            for variant in variants:
                array = torch.from_numpy(np.asarray(variant, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0
                pixels = array.unsqueeze(0).to(model.device, torch.float32 if upcast else model.dtype)
                latent = vae.encode(pixels).latent_dist.mean.float() * model.scaling_factor
                latents.append(latent[0])  # kept in float32: the loss target should not be rounded to bf16
                captions.append(item.caption)
    finally:
        if upcast:
            vae.to(model.dtype)
    return Rows(latents), captions


def latent_sizes(model: SDModel, dataset: Dataset, size: int | Sequence[Size], flip: bool) -> torch.Tensor | None:
    """For a family with size conditioning (SDXL), each latent's time_ids (encode_latents' order), else None."""
    if not model.spec.size_conditioning:
        return None
    buckets = per_picture(size, len(dataset.images))
    pairs = zip(dataset.images, buckets, strict=True)
    return torch.tensor([crop_sizes(item, bucket) for item, bucket in pairs for _ in range(1 + flip)])


def crop_sizes(item: TrainImage, bucket: Size) -> list[float]:
    """SDXL's time_ids of a training image fitted to its bucket (width, height): the original photo's size, the
    crop's top-left corner in the photo resized to cover the bucket, the bucket's size. For a prepared set the photo
    is the source and the crop the rectangle prepare cut from it (its manifest), fitted to the bucket in turn;
    otherwise the image itself and its centred crop."""
    target = (bucket[1], bucket[0])
    if item.source_size and item.source_crop:
        (width, height), (left, top, right, bottom) = item.source_size, item.source_crop
        scale, (inner_left, inner_top) = cover_crop(right - left, bottom - top, bucket)
        return size_ids((height, width), (round(top * scale) + inner_top, round(left * scale) + inner_left), target)
    width, height = item.original_size
    _, (left, top) = cover_crop(width, height, bucket)
    return size_ids((height, width), (top, left), target)


def epoch_order(seed: int, epoch: int, count: int) -> list[int]:
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed_for(seed, 1, epoch))).tolist()


def sample_indices(seed: int, first_sample: int, batch: int, count: int) -> list[int]:
    """Dataset indices of samples first_sample .. first_sample + batch - 1 (a fresh shuffle every epoch)."""
    out = []
    for sample in range(first_sample, first_sample + batch):
        epoch, position = divmod(sample, count)
        out.append(epoch_order(seed, epoch, count)[position])
    return out


@dataclass(frozen=True)
class Batch:
    """One micro-batch: clean latents, their timesteps and noise, and the prompts."""

    clean: torch.Tensor
    timesteps: torch.Tensor
    noise: torch.Tensor
    prompts: list[str]
    time_ids: torch.Tensor | None = None  # SDXL: each sample's size and crop conditioning
    weights: torch.Tensor | None = None  # each sample's loss weights (train/masks.py), or None: a plain mean

    def part(self, where: slice) -> Batch:
        return Batch(
            clean=self.clean[where],
            timesteps=self.timesteps[where],
            noise=self.noise[where],
            prompts=self.prompts[where],
            time_ids=None if self.time_ids is None else self.time_ids[where],
            weights=None if self.weights is None else self.weights[where],
        )


@dataclass
class Samples:
    """The cached latents and their captions, and the draw of each step's micro-batches: everything random at step
    k comes from generators seeded by (seed, k), which is what makes resume exact."""

    latents: Rows  # each [channels, h, w], float32, on the model's device; one shape per bucket (train/latents.py)
    captions: list[str]
    template: tuple[str, ...]
    name: str
    seed: int
    shuffle_tags: bool = False
    tag_dropout: float = 0.0
    sizes: torch.Tensor | None = None  # [count, 6]: SDXL's size and crop conditioning of each latent
    weights: Rows | None = None  # each [1, h, w] on the device: the loss weights (train/masks.py), or None

    @property
    def count(self) -> int:
        return self.latents.count

    def indices(self, step: int, micro: int, batch: int, per_step: int) -> list[int]:
        """The samples of micro-batch `micro` of optimizer step `step`: from one shuffled stream (one shape), or
        from one bucket (several: train/latents.py)."""
        first = step * per_step + micro * batch
        if self.latents.single:
            return sample_indices(self.seed, first, batch, self.count)
        return bucket_batch(self.seed, first // batch, self.latents.by_shape, batch)

    def epoch(self, step: int, batch: int, per_step: int) -> int:
        """The epoch the last sample of step `step` (1-based, after it) was drawn in."""
        if self.latents.single:
            return (step * per_step - 1) // self.count
        return (step * per_step // batch - 1) // batches_per_epoch(self.latents.by_shape, batch)

    def longest_prompt(self) -> str:
        return max(
            (
                fill_template(line, self.name, caption, random.Random(0))
                for line in self.template
                for caption in self.captions
            ),
            key=len,
        )

    def draw(self, step: int, micro: int, batch: int, per_step: int, draws: Denoiser) -> Batch:
        """Micro-batch `micro` of optimizer step `step` (0-based), its timesteps and noise drawn as `draws` does."""
        indices = self.indices(step, micro, batch, per_step)
        rng = random.Random(seed_for(self.seed, 2, step, micro))
        prompts = [
            fill_template(
                rng.choice(self.template), self.name, self.captions[i], rng, self.shuffle_tags, self.tag_dropout
            )
            for i in indices
        ]
        generator = torch.Generator().manual_seed(seed_for(self.seed, 3, step, micro))
        t = draws.draw_timesteps(batch, generator)
        device = self.latents.device
        noise = draws.draw_noise((batch, *self.latents.shape(indices[0])), generator).to(device)
        return Batch(
            clean=self.latents.take(indices),
            timesteps=t.to(device),
            noise=noise,
            prompts=prompts,
            time_ids=None if self.sizes is None else self.sizes[torch.tensor(indices)],
            weights=None if self.weights is None else self.weights.take(indices),
        )


def my_part(batch: Batch, parallel: Parallel, size: int) -> Batch:
    """This process's `size` samples of a micro-batch drawn for all of them (the whole batch for one process)."""
    return batch.part(parallel.part(size)) if parallel.active else batch


@dataclass(frozen=True)
class Shaping:
    """How the run shapes its samples, decided once (a resume keeps both choices): the loss mask's mode
    (train/masks.py) and the aspect-ratio buckets (prepare/buckets.py), with each image's bucket."""

    masking: str
    bucketing: str
    buckets: list[Size]

    @classmethod
    def decide(
        cls,
        options: TrainOptions,
        template: tuple[str, ...],
        saved: dict[str, Any] | None,
        start_step: int,
        dataset: Dataset,
        size: int,
        size_conditioned: bool,
    ) -> Shaping:
        recorded = saved["meta"] if saved else {}
        masking = mask_mode(options.loss_mask, template, recorded.get("loss_mask"), start_step > 0)
        bucketing = bucket_mode(options.buckets, recorded.get("buckets"), start_step > 0, size_conditioned)
        buckets = choose_buckets([item.image.size for item in dataset.images], size, bucketing == "on")
        shaped = cls(masking, bucketing, buckets)
        log.info("aspect-ratio buckets %s", shaped.describe())
        return shaped

    def kept(self) -> dict[str, str]:
        """What the resume state keeps."""
        return {"loss_mask": self.masking, "buckets": self.bucketing}

    def describe(self) -> str:
        return f"{self.bucketing}: {describe_buckets(self.buckets)}"


def encode_samples(
    model: SDModel,
    dataset: Dataset,
    size: int | Sequence[Size],
    template: tuple[str, ...],
    name: str,
    options: TrainOptions,
    parallel: Parallel | None = None,
    stop: threading.Event | None = None,
) -> Samples | None:
    """The cached training samples, each image at its bucket's size (`size`: one per image, or one square side for
    all). Several processes each encode their share of the images and exchange them. A `stop` asked meanwhile acts
    between two images: None (one process; several stop together in the loop, at a step they agree on)."""
    parallel = parallel or Parallel()
    buckets = per_picture(size, len(dataset.images))
    if parallel.active:
        latents = gather_latents(model, dataset, buckets, options.flip, parallel)
        captions = [item.caption for item in dataset.images for _ in range(1 + options.flip)]
    else:
        try:
            latents, captions = encode_latents(model, dataset, buckets, options.flip, stop=stop)
        except StopBeforeTraining:
            return None
    sizes = latent_sizes(model, dataset, buckets, options.flip)
    weights = loss_weights(dataset, buckets, model.vae_scale, options.flip, options.loss_mask, options.mask_background)
    return Samples(
        latents=latents,
        captions=captions,
        template=template,
        name=name,
        seed=options.seed,
        shuffle_tags=options.shuffle_tags,
        tag_dropout=options.tag_dropout,
        sizes=sizes,
        weights=None if weights is None else Rows(weights).to(latents.device),
    )


def gather_latents(model: SDModel, dataset: Dataset, buckets: list[Size], flip: bool, parallel: Parallel) -> Rows:
    """Every image's latents on every process, each process encoding its share: the rows, of their buckets' shapes,
    travel flattened and padded to the longest."""
    import math

    count, variants = len(dataset.images), 1 + flip
    channels, scale = int(model.vae.config.latent_channels), model.vae_scale
    shapes = [(channels, height // scale, width // scale) for width, height in buckets]
    longest = max(math.prod(shape) for shape in shapes)
    share = parallel.share(count)
    mine, _ = encode_latents(model, dataset, buckets, flip, only=share)
    local = torch.zeros((len(share), variants, longest), dtype=torch.float32, device=model.device)
    for k, row in enumerate(mine.rows()):
        local[k // variants, k % variants, : row.numel()] = row.flatten()
    every = parallel.gather_shares(local, count)
    return Rows([every[i, v, : math.prod(shapes[i])].reshape(shapes[i]) for i in range(count) for v in range(variants)])


def judged_by(evaluator: Evaluator | None, why_not: Sequence[str] = ()) -> str:
    """What judges the pictures, for options.json and the report: "face identity" (train/likeness.py), "the caller's
    measure" (a likeness passed to train(), as the demo's trait reader), or that the fixed-batch loss chooses (and
    why no likeness could, where that is known)."""
    if evaluator is None:
        return "none: no evaluations"
    if evaluator.likeness is None:
        return "none: the fixed-batch loss chooses the step" + (f" ({why_not[0]})" if why_not else "")
    return getattr(evaluator.likeness, "kind", "the caller's measure")


def describe_masking(mode: str, samples: Samples) -> str:
    """What options.json says of the loss's weighting: the mode trained with, and whether any image is weighted."""
    rows = [] if samples.weights is None else samples.weights.rows()
    weighted = sum(float(row.std()) > 1e-6 for row in rows)
    return f"{mode}: {weighted} of {samples.count} images weighted toward the subject"


# ----------------------------------------------------------------------------------------------------------------
# 4. What trains, its optimizer and the resume state


def make_trainables(
    point: ResumePoint,
    model: SDModel,
    encoder: PromptEncoder,
    options: TrainOptions,
    schedule: Schedule,
    beside: Sequence[TrainableFactory],
    cleanup: ExitStack,
) -> tuple[EmbeddingTrainable, Trainables, dict[str, Any] | None]:
    """The word's vectors and what trains beside them, begun where the last sitting left them (its resume state,
    checked against the trainables as built from their files), installed in the model until the run ends; the word,
    all of them, and the resume state (None: a new run, or a fresh optimizer)."""
    word = embedding_trainable(point.embedding, model, options, schedule)
    setup = TrainableSetup(model, options, schedule, point.source, point.step, word, point.target, point.run.path)
    makers = [*([LoraTrainable] if options.lora_rank else []), *beside]
    trainable = Trainables([word, *(make(setup) for make in makers)])
    # a run continued from an earlier step has no state of it (only the last step's is kept): a fresh optimizer
    saved = point.run.load_state(point.step, trainable.parameters()) if point.step > 0 and not point.set_aside else None
    trainable.start(saved["tensors"] if saved else None)
    trainable.install(model, encoder)
    cleanup.callback(trainable.remove)
    return word, trainable, saved


def word_at(word: EmbeddingTrainable, name: str, step: int) -> Embedding:
    """The word's embedding now, named for `step` (what --preview-embedded stores inside a step's preview)."""
    return word.as_embedding(word.snapshot(), name=f"{name}-{step}", step=step)


def embedding_trainable(
    embedding: Embedding, model: SDModel, options: TrainOptions, schedule: Schedule
) -> EmbeddingTrainable:
    """The embedding's vectors as the run trains them: stamped with the model, with norm control as asked."""
    stamped = replace(
        embedding, model_hash=model.hash, model_name=model.name, meta={**embedding.meta, "model_family": model.family}
    )
    keys = tuple(embedding.vectors)
    limits = norm_limits(model, keys, options.max_norm) if options.max_norm else None
    fixed = norm_limits(model, keys, options.fixed_norm) if options.fixed_norm else None
    return EmbeddingTrainable(
        stamped, model.device, schedule, norm_limits=limits, init_pull=options.init_pull, fixed_norms=fixed
    )


def make_optimizer(
    trainable: Trainable, model: SDModel, options: TrainOptions, step: int
) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over the trainable's parameter groups (each at its own learning rate), and on CUDA a GradScaler, which
    skips non-finite steps on the device without a host sync (and scales fp16 losses)."""
    cuda = model.device.type == "cuda"
    parameters, groups = trainable.parameters(), trainable.groups()
    if [key for group in groups for key in group.keys] != list(parameters):
        raise TistudioError("a trainable's parameter groups must cover its parameters once, in their order")
    optimizer = torch.optim.AdamW(
        [{"params": [parameters[key] for key in group.keys], "lr": group.schedule.rate_at(step)} for group in groups],
        weight_decay=options.weight_decay,
        fused=True if cuda else None,
    )
    return optimizer, grad_scaler("cuda", model.dtype == torch.float16) if cuda else None


def grad_scaler(device_type: str, fp16: bool) -> torch.amp.GradScaler:
    """The GradScaler of a GPU run: it scales fp16 losses (from 2^16, growing every 2000 good steps), and for bf16
    and fp32 (scale 1, never growing) only skips non-finite steps. `device_type` "cpu" is for the tests."""
    return torch.amp.GradScaler(
        device_type, init_scale=2.0**16 if fp16 else 1.0, growth_interval=2000 if fp16 else 2**30
    )


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
        log.warning(
            "step %d: the loss or gradient was NaN or infinite; the step was discarded and the learning "
            "rate halved (now x%g)",
            step,
            self.lr_factor,
        )
        if self.in_a_row >= self.limit:
            raise TrainingDiverged(
                f"training stopped at step {step}: the loss or gradient was NaN or infinite "
                f"{self.in_a_row} steps in a row even after lowering the learning rate; the "
                f"embedding saved at step {saved_step} is intact; check the images and use a "
                "lower learning rate (or --precision fp32)"
            )

    def good(self) -> None:
        self.in_a_row = 0

    def state(self) -> dict[str, Any]:
        return {"lr_factor": self.lr_factor, "nonfinite_in_a_row": self.in_a_row}


def restore(
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    trainable: Trainable,
    saved: dict[str, Any] | None,
    name: str,
    step: int,
) -> NonFiniteGuard:
    """Load the optimizer (and GradScaler) state of a resume, and the guard's; a fresh guard otherwise."""
    if step == 0:
        return NonFiniteGuard()
    if saved is None:
        log.info("resuming %s from step %d", name, step)
        return NonFiniteGuard()
    restore_optimizer(optimizer, saved, trainable.parameters())
    if scaler is not None and saved["meta"].get("grad_scaler"):
        scaler.load_state_dict(saved["meta"]["grad_scaler"])
    log.info("resuming %s from step %d with its optimizer state", name, step)
    return NonFiniteGuard(
        lr_factor=float(saved["meta"].get("lr_factor", 1.0)), in_a_row=int(saved["meta"].get("nonfinite_in_a_row", 0))
    )


# ----------------------------------------------------------------------------------------------------------------
# 5. Evaluation, previews and checkpoints


def make_evaluator(
    denoiser: Denoiser,
    samples: Samples,
    run: RunFolder,
    options: TrainOptions,
    likeness: Likeness | None,
    start_step: int,
    saved: dict[str, Any] | None,
    trainable: Trainable,
) -> Evaluator | None:
    """The fixed-batch evaluator (None with eval_every 0), with the history of a resumed run and the loss of the
    person-like start, from which the loss's drop is counted."""
    if not options.eval_every:
        return None
    spec = evaluation_spec(options, start_step, saved, run)
    batch = evaluation_batch(
        samples.latents,
        samples.captions,
        samples.template,
        samples.name,
        options.seed,
        denoiser,
        size=spec["samples"],
        sizes=samples.sizes,
        stratified=spec["stratified"],
    )
    every = getattr(likeness, "every", 0)  # a face likeness has its own interval
    evaluator = Evaluator(
        denoiser, samples.latents, batch, run.eval_log, likeness, every, weights=samples.weights, spec=spec
    )
    evaluator.open(start_step, saved)
    if saved is None and any(row[0] == start_step > 0 for row in evaluator.history):
        evaluator.kept[start_step] = trainable.snapshot()  # no state (a branch from a kept step): its start can win
    if evaluator.neutral is None:
        evaluator.measure_neutral(trainable)
    return evaluator


def evaluation_spec(
    options: TrainOptions, start_step: int, saved: dict[str, Any] | None, run: RunFolder
) -> dict[str, Any]:
    """The fixed batch's size and timestep draw: a resumed run keeps the one it began with (one whose resume state
    does not record it but whose eval.csv has rows began before it did: FORMER_EVAL_SIZE samples at random
    timesteps), so that its curve stays one curve; a new run takes eval_samples at random timesteps."""
    if start_step > 0:
        # the resume state's record, else options.json's (a run continued from an earlier step has no state)
        for recorded in (
            (saved["meta"] if saved else {}).get("eval_batch"),
            run.options().get("resolved", {}).get("eval_batch"),
        ):
            if isinstance(recorded, dict) and isinstance(recorded.get("samples"), int):
                return {"samples": recorded["samples"], "stratified": bool(recorded.get("stratified"))}
        if any(row[0] <= start_step for row in read_eval_log(run.eval_log)):
            return {"samples": FORMER_EVAL_SIZE, "stratified": False}
    return {"samples": options.eval_samples, "stratified": False}


def face_likeness_of(
    dataset: Dataset, name: str, size: int, options: TrainOptions, why_not: list[str] | None = None
) -> Likeness | None:
    """The run's face likeness (train/likeness.py), or None where the extra is missing or the photos show no face
    (the reason added to `why_not`)."""
    from tistudio.train.likeness import face_likeness

    return face_likeness(
        [square(item.image, size) for item in dataset.images],
        name,
        size,
        pictures=options.likeness_pictures,
        steps=options.likeness_steps,
        every=options.likeness_every,
        why_not=why_not,
    )


def evaluate(
    evaluator: Evaluator, trainable: Trainable, step: int, total: int, report: Reporter, last: bool = False
) -> None:
    loss, like = evaluator.evaluate(step, trainable, candidate=step > 0, last=last)
    shown = f"fixed-batch loss {loss:.5f}" + ("" if like is None else f", likeness {like:.2f}")
    report(Event.EVAL, step, total, loss=loss, likeness=like, message=shown)


def preview_params(
    options: TrainOptions, template: tuple[str, ...], name: str, size: int | Size
) -> list[SamplingParams]:
    """The previews' sampling settings, one per prompt: the preview_* options, each line of preview_prompt (the
    template's first line by default), at `size` (width, height; an int: a square)."""
    width, height = (size, size) if isinstance(size, int) else size
    prompts = preview_prompts(options.preview_prompt) or [preview_prompt(template, name)]
    return [
        SamplingParams(
            prompt=prompt,
            negative_prompt=options.preview_negative_prompt,
            steps=options.preview_steps,
            sampler=check_sampler(options.preview_sampler, "preview_sampler"),
            cfg=options.preview_cfg,
            width=width,
            height=height,
            seeds=(options.preview_seed,),
        )
        for prompt in prompts
    ]


class Previewer:
    """Draws the preview image of a step with the current vectors, through the loaded model."""

    def __init__(
        self,
        model: SDModel,
        encoder: PromptEncoder,
        params: list[SamplingParams],
        run: RunFolder,
        clip_skip: int,
        carried: Callable[[int], Embedding] | None = None,
    ) -> None:
        self.model, self.params, self.run, self.clip_skip = model, params, run, clip_skip
        self.renderer = Renderer(model, encoder)
        self.carried = carried  # the embedding at a step, to store inside its preview (--preview-embedded)

    def render(self, step: int) -> Path:
        """The step's previews, one per prompt (NAME-STEP.png, then NAME-STEP-2.png, ...); the first's path."""
        paths = []
        for number, params in enumerate(self.params, start=1):
            image = self.renderer.render(params)[0]
            text = infotext(
                params,
                params.seeds[0],
                self.model,
                {},
                self.clip_skip,
                extra=(("Embedding", self.run.name), ("Embedding step", str(step))),
            )
            chunks = {"sd-ti-embedding": png_embedding_text(self.carried(step))} if self.carried else None
            paths.append(save_png(image, self.run.preview_path(step, number), text, chunks))
        return paths[0]


def preview(
    previewer: Previewer, step: int, total: int, result: TrainResult, report: Reporter, skip_existing: bool = False
) -> None:
    """A preview at `step` (at the start of a resumed run, only if that step has none yet)."""
    if skip_existing and previewer.run.preview_path(step).exists() and step == result.start_step:
        return
    path = previewer.render(step)
    result.previews.append(path)
    report(Event.PREVIEW, step, total, path=str(path))


@dataclass
class LossRow:
    """One step's loss, kept on the device until the log is written."""

    step: int
    epoch: int
    loss: torch.Tensor
    lr: float
    finite: torch.Tensor


class LossLog:
    """loss.csv, written in batches: on a GPU the loss is read (a host-device sync) only every LOSS_FLUSH_STEPS
    steps, and the steps the GradScaler skipped as non-finite are accounted for then (`deferred`)."""

    def __init__(
        self, run: RunFolder, guard: NonFiniteGuard, deferred: bool, writes: bool = True, board: Board | None = None
    ) -> None:
        self.run, self.guard, self.deferred, self.writes, self.board = run, guard, deferred, writes, board
        self.pending: list[LossRow] = []
        self.last_loss: float | None = None

    def add(self, row: LossRow, saved_step: int) -> None:
        self.pending.append(row)
        if len(self.pending) >= (LOSS_FLUSH_STEPS if self.deferred else 1):
            self.flush(saved_step)

    def flush(self, saved_step: int) -> None:
        """Write the pending rows (one host read for all of them) and account for discarded steps."""
        if not self.pending:
            return
        rows, self.pending = self.pending, []
        values = torch.stack([torch.stack([row.loss, row.finite.float()]) for row in rows]).tolist()
        if self.writes:
            self.run.append_losses(
                [f"{row.step},{row.epoch},{loss:.6f},{row.lr:g}" for row, (loss, _) in zip(rows, values, strict=True)]
            )
            if self.board is not None:
                self.board.losses([(row.step, loss, row.lr) for row, (loss, _) in zip(rows, values, strict=True)])
        for loss, finite in values:
            if finite and loss == loss:
                self.last_loss = loss
        if self.deferred:  # without a GradScaler bad steps were handled as they happened
            for row, (_, finite) in zip(rows, values, strict=True):
                if finite:
                    self.guard.good()
                else:
                    self.guard.bad(row.step, saved_step)


class Checkpointer:
    """Saves the run at a step - copy, resume state, embedding, in the run folder's order - and keeps the best step
    at the end. In the other processes of a data-parallel run (`writes` False) it only keeps count."""

    def __init__(
        self,
        run: RunFolder,
        trainable: Trainable,
        target: Path,
        state: ResumeState,
        guard: NonFiniteGuard,
        evaluator: Evaluator | None,
        losses: LossLog,
        start_step: int,
        writes: bool = True,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.run, self.trainable, self.target, self.state = run, trainable, target, state
        self.meta = dict(meta or {})  # what the run decided once and a resume keeps (the resolved loss mask)
        self.guard, self.evaluator, self.losses, self.writes = guard, evaluator, losses, writes
        self.saved_step = start_step

    def save(self, step: int, *, copy: bool, final: bool, result: TrainResult, report: Reporter, total: int) -> None:
        self.losses.flush(self.saved_step)
        if not self.writes:
            self.saved_step = step
            return
        values = self.trainable.snapshot()
        meta, tensors = self.evaluator.state() if self.evaluator is not None else ({}, {})
        self.state.meta = {**self.guard.state(), **self.meta, **meta}
        self.state.tensors = {**tensors, **self.trainable.state()}

        def write(path: Path, name: str) -> Path:
            return self.trainable.write(values, path, name=name, step=step)

        copied = self.run.checkpoint(step, write, self.state, self.target, copy=copy, final=final)
        if copied is not None:
            if copied not in result.copies:
                result.copies.append(copied)
            report(Event.SAVE, step, total, path=str(copied))
        self.saved_step = step

    def keep_best(self, best: Any, last_step: int) -> None:
        """NAME.safetensors (here and in the run folder) becomes the best step; the last is kept beside it."""
        meta = {"best_step": str(best.step), "last_step": str(last_step), "best_by": best.by}
        for path in (self.target, self.run.final_path):
            self.trainable.write(best.values, path, name=self.run.name, step=best.step, meta=meta)
        self.trainable.write(
            self.trainable.snapshot(), self.run.last_path, name=f"{self.run.name}-last", step=last_step
        )


# ----------------------------------------------------------------------------------------------------------------
# 6. The loop


AUTO_BATCH_LIMIT = 8  # --batch-size 0 tries 8, 4, 2, 1 (a common textual-inversion range)
AUTO_BATCH_HEADROOM = 0.9  # ... and takes the largest whose step peaks below this share of the GPU's memory


@contextmanager
def training_mode(model: SDModel, checkpointing: bool, channels_last: bool = False) -> Iterator[None]:
    """While training: gradient checkpointing if asked (only where gradients are on, so evaluation and previews are
    unaffected), the UNet channels-last if asked, and TF32 matmuls and convolutions on CUDA (Ampere and newer).
    Everything is restored after."""
    checkpointing = checkpointing and not model.unet.is_gradient_checkpointing
    cuda = model.device.type == "cuda"
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if checkpointing:
        model.unet.enable_gradient_checkpointing()
    if channels_last:
        model.unet.to(memory_format=torch.channels_last)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        if cuda:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
        if channels_last:
            model.unet.to(memory_format=torch.contiguous_format)
        if checkpointing:
            model.unet.disable_gradient_checkpointing()


def largest_fitting(fits: Callable[[int], bool], largest: int) -> int:
    """The first of largest, largest // 2, ... for which fits(batch) holds; 1 if none does."""
    batch = max(1, largest)
    while batch > 1 and not fits(batch):
        batch //= 2
    return batch


def cuda_step_fits(denoiser: Denoiser, samples: Samples, trainable: Trainable) -> Callable[[int], bool]:
    """fits(batch): whether one training forward and backward pass at this batch (with the longest prompt) peaks
    below the headroom. It draws from its own generator and throws its gradient away, so the run is unchanged."""
    device = denoiser.model.device
    latents, prompt = samples.latents, samples.longest_prompt()
    shape = max(latents.shapes, key=lambda s: s[1] * s[2])  # the largest bucket's latents (all about one area)
    rows = latents.by_shape[latents.shapes.index(shape)]

    def fits(batch: int) -> bool:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            generator = torch.Generator().manual_seed(0)
            t = denoiser.draw_timesteps(batch, generator)
            noise = denoiser.draw_noise((batch, *shape), generator).to(device)
            clean = latents.take([rows[i % len(rows)] for i in range(batch)])
            denoiser.loss(clean, t.to(device), noise, [prompt] * batch).backward()
            torch.cuda.synchronize(device)
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            for parameter in trainable.parameters().values():
                parameter.grad = None
            torch.cuda.empty_cache()
        peak = torch.cuda.max_memory_allocated(device)
        total = torch.cuda.get_device_properties(device).total_memory
        log.info("batch %d: a training step peaks at %.1f of %.1f GiB", batch, peak / 2**30, total / 2**30)
        return peak <= AUTO_BATCH_HEADROOM * total

    return fits


def choose_batch(
    options: TrainOptions, earlier: int | None, count: int, probe: Callable[[], Callable[[int], bool]] | None
) -> int:
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


def write_run_options(
    point: ResumePoint,
    options: TrainOptions,
    model: SDModel,
    schedule: Schedule,
    dataset: Dataset,
    size: int,
    batch: int,
    evaluator: Evaluator | None,
    parallel: Parallel,
    masking: str = "",
    judged: str = "",
    bucketing: str = "",
) -> None:
    """options.json: the options as given and as resolved (what a later sitting and the report read)."""
    write_json(
        point.run.path / "options.json",
        {
            "options": to_dict(options),
            "resolved": {
                "embedding_file": str(point.embedding_path),
                "start_step": point.step,
                "end_step": schedule.end_step,
                "schedule": [list(pair) for pair in schedule.pairs],
                "size": size,
                "batch_size": batch,
                "processes": parallel.world,
                "global_batch": batch * parallel.world * options.gradient_accumulation,
                "device": str(model.device),
                "dtype": str(model.dtype).replace("torch.", ""),
                "model": model.describe(),
                "model_hash": model.hash,
                "family": model.family,
                "prediction_type": model.prediction_type,
                "images": len(dataset.images),
                "skipped_images": [[str(p), r] for p, r in dataset.skipped],
                "compiled_unet": options.compile_unet,
                "loss_mask": masking,
                "buckets": bucketing,
                "likeness": judged,
                "neutral_loss": None if evaluator is None else evaluator.neutral,
                "eval_batch": None if evaluator is None else evaluator.spec,
                "tistudio_version": __version__,
            },
        },
    )


@dataclass
class Stepper:
    """What an optimizer step updates and how: the trainable, its optimizer (and a GPU run's GradScaler), the
    gradient clipping, and the processes whose gradients are averaged."""

    trainable: Trainable
    optimizer: torch.optim.Optimizer
    scaler: Any = None
    clip_grad_norm: float = 0.0
    parallel: Parallel = field(default_factory=Parallel)


def train_step(
    denoiser: Denoiser,
    stepper: Stepper,
    micro_batches: Iterator[Batch],
    accumulation: int,
    rates: Sequence[float],
    stop_asked: bool = False,
    abandon: threading.Event | None = None,
) -> tuple[torch.Tensor, torch.Tensor, bool] | None:
    """One optimizer step over the micro-batches at each parameter group's learning rate (`rates`); returns the
    step's loss and whether it (and its gradient) were finite, both still on the device, and whether any process was
    asked to stop. A non-finite step is not applied (the GradScaler skips it on a GPU). Several processes average
    their gradients and losses first.

    With `abandon` (one process), a stop asked between two micro-batches drops the step unapplied and returns None:
    a stop acts within one micro-batch even at a large gradient accumulation, and the trained values stay those of
    the last whole step (what a resume continues from, exactly)."""
    trainable, optimizer, scaler = stepper.trainable, stepper.optimizer, stepper.scaler
    for group, lr in zip(optimizer.param_groups, rates, strict=True):
        group["lr"] = lr
    parameters = list(trainable.parameters().values())
    step_loss = torch.zeros((), device=denoiser.model.device)
    for micro, batch in enumerate(micro_batches):
        if abandon is not None and abandon.is_set():
            optimizer.zero_grad(set_to_none=True)
            return None
        loss = batch_loss(denoiser, batch) / accumulation
        penalty = trainable.penalty() if micro == 0 else None
        if penalty is not None:
            loss = loss + penalty
        if loss.requires_grad:  # a prompt without the name gives the vectors no gradient
            (scaler.scale(loss) if scaler is not None else loss).backward()
        step_loss += loss.detach()
    agreed_stop = stepper.parallel.average_step(parameters, step_loss, stop_asked)
    if scaler is not None:
        scaler.unscale_(optimizer)
    finite = torch.isfinite(step_loss)
    for parameter in parameters:
        grad = parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)
        finite = finite & torch.isfinite(grad).all()
    if stepper.clip_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(parameters, stepper.clip_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)  # skipped on the device when the gradient is not finite
        scaler.update()
    elif bool(finite):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    trainable.constrain()
    return step_loss, finite, agreed_stop


def peer_lost(
    lost: PeerLost, checkpoints: Checkpointer, step: int, result: TrainResult, report: Reporter, total: int
) -> PeerLost:
    """Another process failed during step `step` + 1: the vectors and optimizer are still those of `step`, so
    process 0 saves them; the error says what is on disk."""
    if checkpoints.writes and step > checkpoints.saved_step:
        checkpoints.save(step, copy=False, final=False, result=result, report=report, total=total)
    where = f"saved at step {checkpoints.saved_step}" if checkpoints.writes else "process 0 saves the run"
    return PeerLost(f"{lost}; the embedding is {where}; run the same command again to continue")


# ----------------------------------------------------------------------------------------------------------------
# 7. The end


def final_message(result: TrainResult, name: str, end_step: int, best: Any, point: ResumePoint, discarded: int) -> str:
    if result.stopped:
        message = f"stopped at step {result.step} of {end_step}; saved. Run the same train command to continue"
    elif result.converged_at is not None:
        message = f"trained {name} to step {result.step}, where its fixed-batch loss had converged (--stop auto)"
    else:
        message = f"trained {name} to step {result.step}"
    if result.best_step is not None:
        message += (
            f"; kept step {result.best_step} ({best.by}) as {point.target.name}, the last is {point.run.last_path}"
        )
    if discarded:
        message += f" ({discarded} non-finite steps discarded)"
    return message
