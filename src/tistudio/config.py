"""Options for every job, as frozen dataclasses.

The CLI flags, the HTTP API's JSON and the web UI's forms are all generated from these fields, so each field
carries its type, its default and a one-line help text (``metadata["help"]``), plus its allowed range or
choices, and how a form shows it (``advanced``, ``widget``). ``validate()`` checks a whole options object
before any model is loaded; the resolved options are saved as ``options.json`` in every run folder. This
module does not import torch.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tistudio.errors import OptionError
from tistudio.extras import FACES, check_tensorboard, faces_available
from tistudio.samplers import SAMPLERS, check_sampler
from tistudio.templates import SHIPPED

LORA_TARGETS = ("attention", "cross-attention", "prompt")  # models/lora.py TARGETS

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
PREDICTION_TYPES = ("auto", "epsilon", "v_prediction")
NAME_PATTERN = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")  # \Z: "$" would let a final newline in
# Names Windows keeps for devices, with any extension ("con.safetensors" cannot be made there, "nul" swallows
# writes): a file or folder of such a name made on Linux breaks a copy of the workspace on Windows.
WINDOWS_RESERVED = re.compile(r"\A(con|prn|aux|nul|com[0-9]|lpt[0-9])(\..*)?\Z", re.IGNORECASE)


def option(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    check: Callable[[Any, str], Any] | None = None,
    suggestions: tuple[str, ...] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    required: bool = False,
    positional: bool = False,
    advanced: bool = False,
    widget: str = "",
    label: str = "",
    page_help: str = "",
) -> Any:
    """A dataclass field with the metadata the CLI, API and UI are generated from.

    choices: the allowed values; with `check` (value, field name) -> canonical value, they are the canonical
    spellings and `check` decides (samplers match without regard to case). suggestions: well-known values of a
    field that also takes others (a template name or a file); a server, which never takes paths, allows only these.
    advanced: shown under "More options" in forms. widget: "textarea" (a long text) or "wide" (a wide field).
    label: a form's label where the field's name does not read well ("CFG scale" for cfg). page_help: the help a
    form shows where the CLI's does not fit it (a server takes no files).
    """
    meta = {
        "help": help,
        "choices": choices,
        "check": check,
        "suggestions": suggestions,
        "minimum": minimum,
        "maximum": maximum,
        "required": required,
        "positional": positional,
        "advanced": advanced,
        "widget": widget,
        "label": label,
        "page_help": page_help,
    }
    return field(default=default, metadata=meta)


SAMPLER_NAMES = tuple(SAMPLERS)
MAX_SAMPLING_STEPS = 150  # generation's and previews' sampling steps
CFG_RANGE = {"minimum": 1.0, "maximum": 30.0}


# The longest prompt taken: far past what a model reads usefully (about 2,000 tokens, 27 chunks of 75), short
# enough that the attention parser's worst case (brackets opened and closed all at the end, quadratic as A1111's
# is) stays well under a second; "(a" * 16000 took 6 s and held the server's only worker.
MAX_PROMPT_CHARS = 8000


MAX_PREVIEW_PROMPTS = 8  # previews per step: one picture each


def preview_prompts(text: str) -> list[str]:
    """preview_prompt's prompts: one per non-empty line (a preview of each is drawn at every preview step)."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def check_prompt(text: str, field_name: str = "prompt") -> str:
    if len(text or "") > MAX_PROMPT_CHARS:
        raise OptionError(
            field_name, f"{len(text)} characters", f"a prompt may have at most {MAX_PROMPT_CHARS:,} characters"
        )
    return text


@dataclass(frozen=True)
class ModelOptions:
    """Which model to load and how. Shared by every job that needs a model."""

    # A diffusers folder, a single .safetensors/.ckpt checkpoint, a Hugging Face Hub id, or "demo".
    model: str = option(
        "", "model: a diffusers folder, a .safetensors/.ckpt file, a Hub id, 'demo' or 'demo-sdxl'", required=True
    )
    # "auto" picks CUDA, then Apple MPS, then the CPU.
    device: str = option("auto", "device to run on", choices=DEVICES)
    # Precision of the frozen model parts; "auto" is bf16 (or fp16) on CUDA, fp16 on MPS, fp32 on CPU.
    precision: str = option("auto", "precision of the frozen model weights", choices=PRECISIONS)
    # Override the checkpoint's prediction type when its file does not say (SD2 768-v models use v_prediction).
    prediction_type: str = option("auto", "noise prediction type of the model", choices=PREDICTION_TYPES)
    # Use the output of the N-th last text-encoder layer (A1111's "Clip skip"; 2 for many anime models).
    clip_skip: int = option(
        1, "use the N-th last layer of the text encoder", minimum=1, maximum=12, advanced=True, label="CLIP skip"
    )


@dataclass(frozen=True)
class CreateOptions(ModelOptions):
    """Create a new, untrained embedding (A1111's "Create embedding")."""

    # The word you will type in prompts; also the file name. One word: letters, digits, '_' and '-'.
    name: str = option("", "the embedding's name: the word you will use in prompts", required=True, positional=True)
    # Empty or 'auto': a person-like start for faces (Cross Initialization's idea: the mean of common first names,
    # a different group of names per vector). A text ('dog', 'oil painting', A1111's '*') starts from its tokens.
    init_text: str = option(
        "",
        "initialization text (empty or 'auto': a person-like start for faces; e.g. 'dog', 'oil painting')",
        label="Initialization text",
    )
    # How many vectors the name stands for (A1111's "Number of vectors per token"); 3-4 suit a face.
    vectors: int = option(4, "number of vectors per token", minimum=1, maximum=75)
    # Replace an existing embedding of the same name.
    overwrite: bool = option(False, "overwrite an existing embedding with this name", advanced=True)
    # Where embeddings live (A1111's --embeddings-dir).
    embeddings_dir: str = option("embeddings", "folder of embeddings")


@dataclass(frozen=True)
class TrainOptions(ModelOptions):
    """Train an embedding (A1111's Train tab). Defaults follow A1111; the seed's example values are noted."""

    # The embedding to train: a name in embeddings_dir or a path to its file. Created with `create` first.
    embedding: str = option("", "embedding to train: its name or file", required=True, positional=True)
    # Folder of training images (with an optional IMAGE.txt caption beside each).
    dataset: str = option("", "folder of training images", required=True)
    embeddings_dir: str = option("embeddings", "folder of embeddings")
    # Run folder for copies, previews, loss.csv and resume state; default runs/NAME.
    run_dir: str = option("", "run folder (default: runs/NAME)")
    # A1111's schedule grammar: "0.005" or "0.005:100, 1e-3:1000, 1e-5" (rate until step, ...).
    learning_rate: str = option("0.005", "learning rate or schedule, e.g. '0.005:100, 1e-3:1000, 1e-5'", widget="wide")
    # Images per micro-batch. 0: automatic - on a GPU the largest of 8, 4, 2, 1 (at most the number of images)
    # whose forward and backward pass fit in 90% of its memory, found by trying; 1 on a CPU or Mac. A resumed
    # run keeps the batch size it started with.
    batch_size: int = option(
        1, "images per micro-batch (0: the largest that fits the GPU, up to 8)", minimum=0, maximum=256
    )
    # Micro-batches accumulated per optimizer step; one step = batch_size * gradient_accumulation images.
    gradient_accumulation: int = option(1, "micro-batches per optimizer step", minimum=1, maximum=1024)
    # subject, subject_filewords, style, style_filewords, none, or a path to a template file.
    template: str = option(
        "subject",
        "prompt template: a shipped name or a .txt file",
        suggestions=SHIPPED,
        page_help="prompt template: subject for a person or thing, style for a style; _filewords "
        "adds each photo's caption",
    )
    # Training resolution in pixels (square); 0 means the model's native size (512 SD1, 768 SD2-v).
    size: int = option(0, "training size in pixels (0: the model's native size)", minimum=0, maximum=2048)
    # Aspect-ratio buckets (prepare/buckets.py): "on" trains each photo at the size of about size x size nearest
    # its aspect (384x640 ... 640x384 for 512, SDXL's list for 1024), every micro-batch from one bucket; "off"
    # centre-crops squares; "auto" is on for SDXL (trained on buckets, the crop in its size conditioning) and off
    # for SD1 and SD2 (trained on square crops; on the demo world squares kept the person better, bench/buckets.py).
    # A resumed run keeps the choice it began with.
    buckets: str = option(
        "auto",
        "aspect-ratio buckets: train each photo at its own shape (on), or in squares (off); auto: on for SDXL",
        choices=("auto", "on", "off"),
    )
    # Optimizer steps to train to (counted from the embedding's creation; resume continues to this).
    max_steps: int = option(3000, "train until this step", minimum=1, maximum=10_000_000)
    # Where training goes on from when the embedding holds an earlier step than the run's last (one picked with
    # use-step or "Use this step", or the best step a finished run kept): "last" - the last step trained, so the
    # run goes on as it was; "kept" - the step the embedding holds, with a fresh optimizer: the later steps'
    # copies, previews and LoRAs, the last step and the logs are first moved into RUN/after-STEP-TIME.
    continue_from: str = option(
        "last",
        "where training goes on from when the embedding holds an earlier step: the last step trained, or the kept one",
        choices=("last", "kept"),
    )
    # Render a preview image every N steps (0: never).
    preview_every: int = option(500, "save a preview image every N steps (0: off)", minimum=0)
    # Save a copy of the embedding every N steps (0: never); resume state is saved with it.
    save_every: int = option(500, "save an embedding copy every N steps (0: off)", minimum=0)
    # Preview prompt; empty means the template's first line with the name. Several, one per line (at most
    # MAX_PREVIEW_PROMPTS): a picture of each at every preview step (NAME-STEP.png, NAME-STEP-2.png, ...).
    # The preview_* fields are a preview's SamplingParams (generate/images.py), as flags of their own.
    preview_prompt: str = option(
        "",
        "preview prompt (default: the template's first line); several, one per line, draw a picture each",
        widget="textarea",
        check=check_prompt,
    )
    preview_negative_prompt: str = option("", "preview negative prompt", advanced=True, check=check_prompt)
    # A fixed seed makes previews comparable across steps.
    preview_seed: int = option(1234, "preview seed", minimum=0, maximum=2**32 - 1, advanced=True)
    preview_steps: int = option(20, "preview sampling steps", minimum=1, maximum=MAX_SAMPLING_STEPS, advanced=True)
    preview_sampler: str = option(
        "DPM++ 2M Karras", "preview sampler (A1111 name)", choices=SAMPLER_NAMES, check=check_sampler, advanced=True
    )
    preview_cfg: float = option(7.0, "preview CFG scale", **CFG_RANGE, advanced=True, label="Preview CFG scale")
    # The previews' size, WIDTHxHEIGHT; empty: the training size's square, or with buckets the bucket most photos use.
    preview_size: str = option("", "preview size WxH (default: the bucket most photos use)", advanced=True)
    # Store the step's embedding inside each preview PNG (A1111's "Save images with embedding in PNG chunks"):
    # the picture is then a file A1111 loads as the embedding at that step, named NAME-STEP.
    # TensorBoard event files in RUN/tensorboard beside loss.csv: loss, learning rate, evaluations, previews.
    tensorboard: bool = option(
        False,
        "write TensorBoard logs in the run folder (needs tistudio[tensorboard])",
        advanced=True,
        label="TensorBoard logs",
    )
    preview_embedded: bool = option(
        False,
        "store the step's embedding inside each preview PNG (A1111 loads it)",
        advanced=True,
        label="Embedding inside previews",
    )
    # Also train on mirrored images (their latents are cached too).
    flip: bool = option(False, "add horizontally flipped copies of every image")
    # Shuffle the comma-separated tags of [filewords] for each sample (A1111 option).
    shuffle_tags: bool = option(False, "shuffle caption tags for each sample", advanced=True)
    # Drop each caption tag with this probability (A1111 option).
    tag_dropout: float = option(
        0.0, "probability of dropping each caption tag", minimum=0.0, maximum=1.0, advanced=True
    )
    # AdamW weight decay on the vectors (A1111 uses 0).
    weight_decay: float = option(0.0, "AdamW weight decay", minimum=0.0, maximum=1.0, advanced=True)
    # Clip the gradient norm of the vectors (0: off).
    clip_grad_norm: float = option(0.0, "clip gradient norm (0: off)", minimum=0.0, advanced=True)
    # Seeds data order, timesteps and noise; the same seed and options give the same embedding.
    seed: int = option(0, "random seed", minimum=0, maximum=2**32 - 1, advanced=True)
    # Every N steps, the loss on a fixed batch (same latents, noise, timesteps, prompts); no images. 0: off.
    # Less often as the curve slows (evaluation.evaluation_interval): every N steps to step 500, 2N to 1500, 4N to
    # 3500, ...
    eval_every: int = option(
        25,
        "evaluate the loss on a fixed batch every N steps (2N after step 500, 4N after 1500, ...; 0: off)",
        minimum=0,
        advanced=True,
    )
    # Samples in the fixed batch (each image in turn, fixed noise, timesteps and prompts); a forward pass each. 8 keep
    # a step as good as 16 did (bench/evaluation.py) at half the cost. A resumed run keeps the batch it began with.
    eval_samples: int = option(8, "samples in the fixed evaluation batch", minimum=2, maximum=256, advanced=True)
    # Judge steps by the faces in pictures from prompts the templates never use (train/likeness.py): at the first
    # evaluation of every likeness_every steps to step 1500 and of every 2 x likeness_every after it (and at the last
    # step; evaluation.likeness_due), likeness_pictures pictures of likeness_steps sampler steps, compared with the
    # training photos' faces; the highest likeness is the step kept.
    # auto: where tistudio[faces] is installed and the photos show faces; on: the extra is required; off: the loss.
    likeness: str = option(
        "auto",
        "keep the step whose pictures look most like the face in the photos (auto: with "
        "tistudio[faces] and faces in the photos)",
        choices=("auto", "on", "off"),
        advanced=True,
    )
    likeness_every: int = option(
        250, "measure the face likeness every N steps (2N after step 1500; at an evaluation)", minimum=1, advanced=True
    )
    likeness_pictures: int = option(4, "pictures per face-likeness measurement", minimum=1, maximum=32, advanced=True)
    likeness_steps: int = option(
        12, "sampler steps of each face-likeness picture", minimum=1, maximum=150, advanced=True
    )
    # max-steps: train to max_steps; auto: stop once the fixed-batch loss has stopped changing (DVAR).
    stop: str = option(
        "max-steps", "when to stop: at max_steps, or auto once the loss has converged", choices=("max-steps", "auto")
    )
    # What NAME.safetensors holds when training ends: the best step (the lowest fixed-batch loss: the first
    # evaluation within 0.5% of the loss's whole drop above the lowest; where the caller of train() measures a
    # likeness at every evaluation, as the demo does, its highest), or the last.
    final: str = option(
        "best",
        "the embedding to keep at the end: the best step (the last is kept too) or the last",
        choices=("best", "last"),
        advanced=True,
    )
    # Keep each vector's norm at most this many times the vocabulary's median token norm (0: no limit).
    max_norm: float = option(
        0.0,
        "limit vector norms to this many times a typical word's (0: off)",
        minimum=0.0,
        maximum=1000.0,
        advanced=True,
    )
    # Pull the vectors toward where they started (weight of a mean squared distance added to the loss).
    init_pull: float = option(0.0, "weight of a pull toward the initial vectors (0: off)", minimum=0.0, advanced=True)
    # Directional textual inversion (arXiv 2512.13672): each vector's norm is held at this many times the
    # vocabulary's median token norm and only its direction trains (the gradient's part along the vector is removed,
    # and the vector is put back on its sphere after every step), so the word cannot grow loud enough to drown the
    # rest of the prompt. 0: off (the norm is free, or capped by max_norm).
    fixed_norm: float = option(
        0.0,
        "train only the vectors' directions, their norms held at this many times a typical word's (0: off)",
        minimum=0.0,
        maximum=100.0,
        advanced=True,
    )
    # Weight the loss toward the subject: "masks" where a photo has one (an alpha channel, or IMAGE.mask.png /
    # IMAGE-masklabel.png beside it: white the subject, black the rest), "face" also a head-and-shoulders shape around
    # the face found in photos without one, "auto" that where most photos show a face and the template is not a
    # style's (train/masks.py), "off" never. The rest of the picture keeps mask_background of the weight. A resumed run
    # keeps what "auto" chose when it began.
    loss_mask: str = option(
        "auto",
        "weight the loss toward the subject: auto (photo masks, and head and shoulders "
        "in a set of faces), masks (alpha or IMAGE.mask.png), face (around any face found) or "
        "off",
        choices=("auto", "masks", "face", "off"),
        advanced=True,
    )
    mask_background: float = option(
        0.1,
        "the loss weight of what a mask leaves out, relative to the subject",
        minimum=0.0,
        maximum=1.0,
        advanced=True,
    )
    # Pivotal tuning: a LoRA of this rank (low-rank changes of the UNet's attention projections) trains beside the
    # word, still called by typing the word; the word alone can only point at what the model already draws. 0: the
    # word alone (a plain embedding). Written to loras_dir/NAME.safetensors with the word bundled (A1111 loads both
    # from <lora:NAME:1>); NAME.safetensors in embeddings_dir stays the word alone and names its LoRA.
    lora_rank: int = option(
        0, "train a LoRA of this rank beside the word (0: the word alone)", minimum=0, maximum=256, label="LoRA rank"
    )
    # The LoRA's scale is lora_alpha / lora_rank (kohya's alpha); 0 takes the rank (a scale of 1).
    lora_alpha: float = option(
        0.0,
        "LoRA alpha: its changes are scaled by alpha / rank (0: the rank)",
        minimum=0.0,
        maximum=4096.0,
        advanced=True,
        label="LoRA alpha",
    )
    # The LoRA's own learning rate or schedule, in the same grammar as learning_rate.
    lora_learning_rate: str = option(
        "1e-4", "LoRA learning rate or schedule", widget="wide", advanced=True, label="LoRA learning rate"
    )
    # The share of the steps the word trains alone before the LoRA joins (the word first, then both). 0.5 by
    # measurement on the demo world (README, "Pivotal tuning"): a LoRA that joined a trained word carried a new trait
    # into a style its photos never had (81% of the paintings, against none where both started together).
    lora_start: float = option(
        0.5,
        "share of the steps the word trains alone before the LoRA joins",
        minimum=0.0,
        maximum=0.99,
        advanced=True,
        label="LoRA joins after",
    )
    # attention: self- and cross-attention's q, k, v and out projections; cross-attention: only where the prompt enters.
    lora_targets: str = option(
        "attention", "UNet layers the LoRA changes", choices=LORA_TARGETS, advanced=True, label="LoRA targets"
    )
    loras_dir: str = option("loras", "folder of LoRA files (A1111's models/Lora)", advanced=True)
    # Recompute the UNet's activations during the backward pass instead of keeping them: much less memory for
    # large sizes and batches, about a third more compute per step. Results are the same.
    gradient_checkpointing: bool = option(False, "save memory by recomputing UNet activations (slower)", advanced=True)
    # Compile the UNet with torch.compile for the training steps: on GPUs it fuses kernels after a few minutes of
    # compiling. On CPUs it is slower (measured on 2 cores: 9.7 s against 5.5 s a full-size step at 256 px).
    compile_unet: bool = option(
        False,
        "compile the UNet with torch.compile (GPUs; minutes to compile first)",
        advanced=True,
        label="Compile the UNet",
    )
    # Keep the UNet's weights channels-last (NHWC) during the training steps: the layout NVIDIA's tensor cores
    # convolve fastest in bf16/fp16. On CPUs it was slower (5.2 s against 4.2 s a full-size step). Results agree
    # with the default layout within float rounding; evaluation and previews use the default layout.
    channels_last: bool = option(
        False,
        "channels-last memory layout for the UNet while training (GPUs)",
        advanced=True,
        label="Channels-last layout",
    )


@dataclass(frozen=True)
class GenerateOptions(ModelOptions):
    """Generate images (A1111's txt2img), using every embedding whose name appears in the prompts."""

    prompt: str = option(
        "",
        "prompt; embedding names in it are used",
        required=True,
        positional=True,
        widget="textarea",
        check=check_prompt,
    )
    negative_prompt: str = option("", "negative prompt", widget="textarea", check=check_prompt)
    steps: int = option(20, "sampling steps", minimum=1, maximum=MAX_SAMPLING_STEPS)
    sampler: str = option("DPM++ 2M Karras", "sampler, by its A1111 name", choices=SAMPLER_NAMES, check=check_sampler)
    cfg: float = option(7.0, "CFG scale", **CFG_RANGE, label="CFG scale")
    # -1 picks a random seed; image i of a batch uses seed + i, as in A1111.
    seed: int = option(-1, "seed (-1: random)", minimum=-1, maximum=2**32 - 1, advanced=True)
    # WIDTHxHEIGHT or one number for a square; empty means the model's native size.
    size: str = option("", "image size, WIDTHxHEIGHT (default: the model's native size)")
    batch: int = option(1, "images to generate at once (A1111's batch size)", minimum=1, maximum=64)
    # Batches drawn one after another (A1111's batch count): batch x batch_count images, the seeds running on.
    batch_count: int = option(
        1, "batches one after another (A1111's batch count)", minimum=1, maximum=100, advanced=True
    )
    embeddings_dir: str = option("embeddings", "folder of embeddings")
    # LoRAs to apply besides those the prompt calls (<lora:NAME:WEIGHT>) and those its embeddings were trained with.
    lora: str = option(
        "", "LoRAs to apply: NAME or NAME:WEIGHT, comma-separated (as <lora:NAME:WEIGHT> in a prompt)", label="LoRAs"
    )
    loras_dir: str = option("loras", "folder of LoRA files (A1111's models/Lora)", advanced=True)
    out_dir: str = option("outputs", "folder for the images")


@dataclass(frozen=True)
class PrepareOptions:
    """Turn a folder of ordinary photos into a training set, with a quality report (A1111's old Preprocess tab)."""

    # The folder of photos; it is only read, never changed.
    photos: str = option("", "folder of photos (JPEG, PNG, WebP, HEIC, ...)", required=True, positional=True)
    # Where the prepared images, their captions, manifest.json and report.html go.
    out: str = option("", "output folder for the training set", required=True, positional=True)
    # The training size in pixels; the model's size (512 for SD1, 768 for SD2-v, 1024 for SDXL). Squares of it
    # with buckets off; with buckets on, pictures of about its area in the photo's aspect-ratio bucket.
    size: int = option(512, "output size in pixels (the square's side, or the buckets' area)", minimum=64, maximum=2048)
    # on: each picture keeps its photo's shape - the crop around the face (or detail) takes the bucket nearest the
    # photo's aspect (prepare/buckets.py: 384x640 ... 640x384 at 512) and reaches where the photo has room (the
    # body below a face in a portrait); off: squares; auto: on at size 1024 and above (SDXL's size, whose training
    # uses buckets by default), off below (SD1 and SD2 train in squares by default).
    buckets: str = option(
        "auto",
        "keep each photo's shape in an aspect-ratio bucket (on) or cut squares (off); auto: on at 1024 px and above",
        choices=("auto", "on", "off"),
    )
    # face: the face and a little around it; head-and-shoulders: more of the person; center: a plain centre crop.
    crop: str = option("face", "how to frame each photo", choices=("face", "head-and-shoulders", "center"))
    # Also write a mirrored copy of every image.
    flip: bool = option(False, "also write a horizontally flipped copy of every image")
    # What to do with an existing IMAGE.txt caption next to a photo (A1111's "Existing Caption txt Action").
    caption_action: str = option(
        "ignore",
        "existing IMAGE.txt captions: ignore, copy, prepend or append",
        label="Existing captions",
        choices=("ignore", "copy", "prepend", "append"),
    )
    # Cut very wide or tall photos without a face into overlapping squares instead of one centre square.
    split: bool = option(False, "split very wide or tall photos without a face into several squares", advanced=True)
    # Photos that would need more enlargement than this are left out as too small.
    max_upscale: float = option(
        2.0, "largest enlargement allowed before a photo counts as too small", minimum=1.0, maximum=8.0, advanced=True
    )
    # Tell the people in the photos apart (a face descriptor per photo, prepare/identity.py): which photos show someone
    # else than the rest, how many people the set holds. auto: where the optional extra tistudio[faces] is
    # installed; on: required; off: never.
    identity: str = option(
        "auto",
        "check that the photos show one person (auto: if tistudio[faces] is installed)",
        choices=("auto", "on", "off"),
    )


T = TypeVar("T")


def field_specs(cls: type) -> list[dataclasses.Field]:
    """The fields of an options class, in declaration order."""
    return list(dataclasses.fields(cls))


def to_dict(options: Any) -> dict[str, Any]:
    """Plain JSON-able dict of an options object."""
    return dataclasses.asdict(options)


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build options from a dict, refusing unknown keys and values of the wrong type."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise OptionError(unknown[0], data[unknown[0]], f"unknown option; known options are {', '.join(known)}")
    values = {}
    for key, value in data.items():
        values[key] = _coerce(known[key], value)
    return cls(**values)


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    kind = type(f.default)
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise OptionError(f.name, value, "must be true or false")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise OptionError(f.name, value, "must be a whole number")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise OptionError(f.name, value, "must be a number")
        return float(value)
    if not isinstance(value, str):
        raise OptionError(f.name, value, "must be text")
    return value


def check_fields(options: Any) -> None:
    """Check every field against its type, range, choices and required flag."""
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        _coerce(f, value)
        if isinstance(value, str) and "\x00" in value:
            raise OptionError(f.name, value, "contains a NUL character; send plain text")
        meta = f.metadata
        if meta.get("required") and value in ("", None):
            raise OptionError(f.name, value, "is required")
        if meta.get("check"):
            meta["check"](value, f.name)
        elif meta.get("choices") and value not in meta["choices"]:
            raise OptionError(f.name, value, f"choose one of {', '.join(meta['choices'])}")
        low, high = meta.get("minimum"), meta.get("maximum")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value != value or value in (float("inf"), float("-inf")):
                raise OptionError(f.name, value, "must be a finite number")
            if low is not None and value < low:
                raise OptionError(f.name, value, f"must be at least {low:g}")
            if high is not None and value > high:
                raise OptionError(f.name, value, f"must be at most {high:g}")


def check_name(name: str, field_name: str = "name") -> str:
    """A name is one word of letters, digits, '_' and '-': an embedding's (it is typed in prompts and is a file
    stem), and the server's photo sets and prepared sets."""
    if not NAME_PATTERN.match(name or ""):
        raise OptionError(
            field_name,
            name,
            "use one word of letters, digits, '_' or '-' (at most 64 "
            "characters, starting with a letter or digit), e.g. 'tomtut'",
        )
    if WINDOWS_RESERVED.match(name):
        raise OptionError(
            field_name,
            name,
            "is a name Windows keeps for a device (CON, PRN, AUX, NUL, COM1-9, LPT1-9); choose another",
        )
    return name


def parse_size(text: str, field_name: str = "size") -> tuple[int, int] | None:
    """Parse 'WxH' or 'N' into (width, height); None for ''. Sides must be multiples of 8 in 64..2048."""
    text = (text or "").strip().lower()
    if not text:
        return None
    match = re.fullmatch(r"(\d+)\s*(?:x\s*(\d+))?", text)
    if not match:
        raise OptionError(field_name, text, "write WIDTHxHEIGHT, e.g. 512x512, or one number for a square")
    width = int(match.group(1))
    height = int(match.group(2) or match.group(1))
    for side in (width, height):
        if side < 64 or side > 2048 or side % 8:
            raise OptionError(field_name, text, "each side must be a multiple of 8 between 64 and 2048")
    return width, height


def validate_prepare(options: PrepareOptions) -> None:
    check_fields(options)
    if options.size % 8:
        raise OptionError("size", options.size, "use a multiple of 8, e.g. 512 or 768")


def validate_create(options: CreateOptions) -> None:
    check_fields(options)
    check_name(options.name)


def validate_train(options: TrainOptions) -> None:
    from tistudio.schedule import parse_schedule
    from tistudio.templates import load_template

    check_fields(options)
    if options.size and (options.size < 64 or options.size % 8):
        raise OptionError("size", options.size, "use 0 (native) or a multiple of 8 of at least 64")
    parse_size(options.preview_size, "preview_size")
    parse_schedule(options.learning_rate, max_steps=options.max_steps, start_step=0)
    parse_schedule(options.lora_learning_rate, max_steps=options.max_steps, field_name="lora_learning_rate")
    if len(preview_prompts(options.preview_prompt)) > MAX_PREVIEW_PROMPTS:
        raise OptionError(
            "preview_prompt",
            f"{len(preview_prompts(options.preview_prompt))} prompts",
            f"at most {MAX_PREVIEW_PROMPTS} preview prompts, one per line (each costs a picture at every preview)",
        )
    load_template(options.template)
    if options.fixed_norm and options.max_norm:
        raise OptionError(
            "fixed_norm",
            options.fixed_norm,
            "a held norm and a norm cap exclude each other; set max_norm to 0 or fixed_norm to 0",
        )
    if options.tensorboard:
        check_tensorboard()
    if options.likeness == "on" and not faces_available():
        raise OptionError(
            "likeness", "on", f"judging pictures by face needs the optional extra: {FACES} (or --likeness auto)"
        )


def validate_generate(options: GenerateOptions) -> None:
    check_fields(options)
    if not options.prompt.strip():
        raise OptionError("prompt", options.prompt, "write a prompt, e.g. 'portrait of NAME as a lego figure'")
    parse_size(options.size)
