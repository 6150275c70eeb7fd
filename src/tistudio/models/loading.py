"""Loading Stable Diffusion models (1.x, 2.x and SDXL), fully offline, from every form people keep them in.

``--model`` may be:
  * ``demo``: the built-in demo world model (64-px cartoon people; see demo/world.py), expanded once into the cache;
  * a diffusers folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ...);
  * a single ``.safetensors``/``.ckpt`` checkpoint as A1111 and ComfyUI use. Its format is read from its
    content; ``.ckpt`` goes through PyTorch's restricted unpickler (nothing in it runs). The architecture is
    read off the tensor shapes and the small diffusers configuration is written locally, with the CLIP
    tokenizer shipped in this package, so nothing is fetched;
  * a Hugging Face Hub id (``runwayml/stable-diffusion-v1-5``): downloaded by ``huggingface_hub``, weights
    as safetensors only, then loaded like a folder. With ``HF_HUB_OFFLINE=1`` only the local cache is used.

The family is detected from the text encoders the model holds (SD1: CLIP ViT-L, 768 wide; SD2: OpenCLIP ViT-H, 1024
wide, v-prediction for the 768 px models; SDXL: both CLIP ViT-L and OpenCLIP bigG) by the families' table
(models/families.py), and other models are refused with a message that says what they are.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tistudio import safeload
from tistudio.config import ModelOptions
from tistudio.errors import ModelError, TistudioError, UnsafeFileError
from tistudio.models.conditioning import TextEncoder
from tistudio.models.families import (
    XL_CLIP_G,
    Family,
    checkpoint_family,
    folder_family,
)
from tistudio.models.families import family as family_entry
from tistudio.storage import file_sha256, write_json

log = logging.getLogger(__name__)

MAX_CHECKPOINT_BYTES = 40 * 1024**3
DEMO = "demo"
SD_SCALING_FACTOR = 0.18215
# The built-in demo models by name, and the family key of each: the world model and its SDXL variant
# (see models/builtin.py).
DEMOS = {DEMO: "sd1", "demo-sdxl": "sdxl"}
UNET = "model.diffusion_model."
VAE = "first_stage_model."


@dataclass
class SDModel:
    """The parts of a loaded model, and what we know about it."""

    text: dict[str, TextEncoder]  # the text encoders with their tokenizers, by the family's keys, in its order
    vae: Any
    unet: Any
    scheduler_config: dict[str, Any]
    family: str  # a key of families.FAMILIES
    prediction_type: str
    native_size: int
    device: torch.device
    dtype: torch.dtype
    source: str
    name: str
    hash: str | None = None
    notes: list[str] = field(default_factory=list)
    spec: Family | None = None  # the family's table entry; looked up from `family` unless given

    def __post_init__(self) -> None:
        if self.spec is None:
            self.spec = family_entry(self.family)

    @property
    def tokenizer(self) -> Any:
        """The first text encoder's tokenizer (a family's encoders all read CLIP's vocabulary)."""
        return next(iter(self.text.values())).tokenizer

    @property
    def text_encoder(self) -> Any:
        """The first text encoder (the only one of SD1 and SD2)."""
        return next(iter(self.text.values())).module

    @property
    def widths(self) -> dict[str, int]:
        """The width of each text encoder's token vectors, by key."""
        return {key: part.width for key, part in self.text.items()}

    @property
    def width(self) -> int:
        """The width of an embedding for this model: its encoders' widths together (768 SD1, 1024 SD2)."""
        return sum(self.widths.values())

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", SD_SCALING_FACTOR) or SD_SCALING_FACTOR)

    def describe(self) -> str:
        return (
            f"{self.name} ({self.spec.label}, {self.prediction_type}, native {self.native_size}px, text width "
            f"{self.width}, {self.device.type} {str(self.dtype).replace('torch.', '')})"
        )


# ----------------------------------------------------------------------------------------------------------------
# Device and precision


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ModelError("device='cuda' but PyTorch sees no CUDA GPU; use --device auto or cpu")
    if choice == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise ModelError("device='mps' but Apple Metal (MPS) is not available; use --device auto or cpu")
    return torch.device(choice)


def parse_devices(text: str) -> tuple[str, ...]:
    """`serve --devices`: the devices that get a worker each. '' is one worker on --device; 'all' is every CUDA GPU
    (one worker on --device where there is none); 'cuda:0,cuda:1' those. 'cpu' may be given more than once (two
    jobs at a time on the CPU, each with its own copy of the model); a GPU only once."""
    import re

    text = (text or "").strip().lower()
    if not text:
        return ("",)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if text == "all":
        return tuple(f"cuda:{index}" for index in range(count)) or ("",)
    devices = tuple("cuda:0" if part.strip() == "cuda" else part.strip() for part in text.split(","))
    for device in devices:
        match = re.fullmatch(r"(cpu|mps|cuda)(?::(\d{1,3}))?", device)
        if not match or (match.group(1) != "cuda" and match.group(2)):
            raise ModelError(
                f"devices={text!r}: {device!r} is not a device; write e.g. 'cuda:0,cuda:1', 'all' or 'cpu'"
            )
        if match.group(1) == "cuda" and int(match.group(2) or 0) >= count:
            seen = f"PyTorch sees {count} CUDA GPU{'s' if count != 1 else ''}" if count else "PyTorch sees no CUDA GPU"
            raise ModelError(f"devices={text!r}: {seen}, so there is no {device}; use --devices all or leave it out")
        if match.group(1) == "mps":
            resolve_device("mps")
    gpus = [d for d in devices if d != "cpu"]
    repeated = sorted({d for d in gpus if gpus.count(d) > 1})
    if repeated:
        raise ModelError(f"devices={text!r}: {repeated[0]} is named twice; give each GPU once (one worker each)")
    return devices


def resolve_dtype(choice: str, device: torch.device) -> torch.dtype:
    """Precision of the frozen parts. The trainable vectors always stay float32."""
    if choice == "fp32":
        return torch.float32
    if choice == "bf16":
        return torch.bfloat16
    if choice == "fp16":
        if device.type == "cpu":
            raise ModelError("precision='fp16' is not supported on the CPU; use fp32 (or bf16)")
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


# ----------------------------------------------------------------------------------------------------------------
# What kind of source is it?


def source_kind(spec: str) -> str:
    """'demo', 'folder', 'file' or 'hub'; refuses what is none of them."""
    if spec in DEMOS:
        return "demo"
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file() and not (path / "unet").is_dir():
            raise ModelError(
                f"model {spec!r}: a folder without model_index.json; expected a diffusers model folder "
                "(with unet/, vae/, text_encoder/, tokenizer/)"
            )
        return "folder"
    if path.is_file():
        return "file"
    if path.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".bin") or "\\" in spec or spec.startswith(("/", ".")):
        raise ModelError(f"model {spec!r}: no such file or folder")
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", spec):
        return "hub"
    raise ModelError(f"model {spec!r}: not a folder, a file, a Hub id (owner/name), 'demo' or 'demo-sdxl'")


# ----------------------------------------------------------------------------------------------------------------
# Hashing (A1111's "Model hash": the first 10 hex digits of the checkpoint file's sha256), cached by file stat


def _cached_sha256(path: Path, cache_dir: Path | None) -> str:
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = cache_dir / "hashes.json" if cache_dir else None
    cache: dict[str, str] = {}
    if cache_file and cache_file.is_file():
        try:
            loaded = json.loads(cache_file.read_text("utf-8"))
            cache = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            cache = {}
    if key in cache:
        return cache[key]
    digest = file_sha256(path)
    if cache_file:
        cache[key] = digest
        write_json(cache_file, cache)
    return digest


def model_hash(spec_path: Path, kind: str, cache_dir: Path | None) -> str | None:
    if kind == "file":
        return _cached_sha256(spec_path, cache_dir)[:10]
    weights = sorted((spec_path / "unet").glob("diffusion_pytorch_model*.safetensors")) or sorted(
        (spec_path / "unet").glob("diffusion_pytorch_model*.bin")
    )
    if not weights:
        return None
    combined = hashlib.sha256("".join(_cached_sha256(w, cache_dir) for w in weights).encode()).hexdigest()
    return combined[:10]


# ----------------------------------------------------------------------------------------------------------------
# Single-file checkpoints: read, classify, infer the architecture


def read_checkpoint(path: Path, text_only: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict (and safetensors metadata) of a single-file checkpoint, read safely by content."""
    kind = safeload.sniff(path)
    try:
        if kind == safeload.SAFETENSORS:
            header, _ = safeload.safetensors_header(path, 100_000, 20 * 1024**3)
            keys = [k for k in header if k.startswith("cond_stage_model.")] if text_only else None
            return safeload.load_safetensors(path, MAX_CHECKPOINT_BYTES, 100_000, 20 * 1024**3, keys=keys)
        if kind in (safeload.TORCH_ZIP, safeload.TORCH_LEGACY):
            data = safeload.load_torch_pickle(path, MAX_CHECKPOINT_BYTES)
        else:
            raise ModelError(
                f"model {path}: not a checkpoint; its content is neither safetensors nor a PyTorch file "
                "(whatever the extension says)"
            )
    except UnsafeFileError as exc:
        raise ModelError(f"model {exc}") from None
    meta: dict[str, str] = {}
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        if "global_step" in data and isinstance(data["global_step"], int):
            meta["global_step"] = str(data["global_step"])
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ModelError(f"model {path}: holds a {type(data).__name__}, not a state dict of weights")
    tensors = {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if "global_step" in data and isinstance(data.get("global_step"), int):
        meta["global_step"] = str(data["global_step"])
    return tensors, meta


def classify_checkpoint(keys: set[str], path: Any) -> str:
    """The family key, from the text encoders the checkpoint holds (the families' table); a clear refusal for
    anything else."""

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    found = checkpoint_family(has)
    if has("conditioner.embedders."):
        if found is not None:
            return found.key
        if has("conditioner.embedders.0.model."):
            raise ModelError(
                f"model {path}: an SDXL refiner (its only text encoder is OpenCLIP-bigG); textual "
                "inversion needs an SDXL base model or one of its fine-tunes"
            )
        raise ModelError(
            f"model {path}: an SDXL checkpoint without both of its text encoders "
            "(conditioner.embedders.0, CLIP-L, and .1, OpenCLIP-bigG); use a full checkpoint"
        )
    if has("model.diffusion_model.joint_blocks.") or has("joint_blocks."):
        raise ModelError(
            f"model {path}: this is a Stable Diffusion 3 checkpoint; only SD 1.x, 2.x and SDXL are supported"
        )
    if has("model.diffusion_model.double_blocks.") or has("double_blocks."):
        raise ModelError(
            f"model {path}: this is a Flux checkpoint; only Stable Diffusion 1.x, 2.x and SDXL are supported"
        )
    if not has(UNET + "input_blocks."):
        if has("down_blocks.") or has("unet."):
            raise ModelError(
                f"model {path}: this single file holds diffusers-format weights of one component, not "
                "a whole checkpoint; pass the diffusers model folder instead"
            )
        raise ModelError(
            f"model {path}: no Stable Diffusion UNet weights (model.diffusion_model.*) in this file; "
            "is it a LoRA, a VAE or an embedding? --model needs a whole SD 1.x, 2.x or SDXL checkpoint"
        )
    if not has(VAE):
        raise ModelError(
            f"model {path}: the checkpoint has no VAE weights (first_stage_model.*); use a full checkpoint"
        )
    if found is not None:
        return found.key
    raise ModelError(
        f"model {path}: the checkpoint has no text encoder weights (cond_stage_model.*); use a full checkpoint"
    )


def _levels(state: dict[str, torch.Tensor], prefix: str, pattern: str) -> list[int]:
    found = {int(m.group(1)) for k in state if k.startswith(prefix) and (m := re.match(pattern, k[len(prefix) :]))}
    return sorted(found)


def infer_unet_config(state: dict[str, torch.Tensor], family: str, native_size: int, v_pred: bool) -> dict[str, Any]:
    """The diffusers UNet config of an LDM-format UNet, read off its tensor shapes."""

    def shape(key: str) -> tuple[int, ...]:
        return tuple(state[UNET + key].shape)

    in_channels = shape("input_blocks.0.0.weight")[1]
    if in_channels != 4:
        kind = {9: "an inpainting model", 8: "an instruct-pix2pix model"}.get(in_channels, f"{in_channels}-channel")
        raise ModelError(
            f"this checkpoint is {kind}; textual inversion needs a plain text-to-image SD 1.x, 2.x or SDXL model"
        )
    blocks = _levels(state, UNET + "input_blocks.", r"(\d+)\.")
    levels: list[list[tuple[int, bool]]] = [[]]
    for index in blocks[1:]:
        if UNET + f"input_blocks.{index}.0.op.weight" in state:
            levels.append([])
            continue
        channels = shape(f"input_blocks.{index}.0.out_layers.3.weight")[0]
        has_attention = UNET + f"input_blocks.{index}.1.proj_in.weight" in state
        levels[-1].append((channels, has_attention))
    if any(not level for level in levels) or len({len(level) for level in levels}) != 1:
        raise ModelError("the checkpoint's UNet has an unusual layout that tistudio cannot read")
    block_out = [level[0][0] for level in levels]
    attention = [level[0][1] for level in levels]
    cross_dim = None
    linear = False
    for key, value in state.items():
        if key.startswith(UNET) and key.endswith("attn2.to_k.weight"):
            cross_dim = int(value.shape[1])
        if key.startswith(UNET) and key.endswith("proj_in.weight"):
            linear = value.dim() == 2
    depths = []  # transformer blocks per level (SDXL: 2 and 10 on its attention levels)
    for i, level in enumerate(levels):
        index = blocks[1 + i * (len(levels[0]) + 1)]
        found = len(_levels(state, UNET + f"input_blocks.{index}.1.transformer_blocks.", r"(\d+)\."))
        depths.append(found if level[0][1] else 1)
    attention_depths = {d for d, level in zip(depths, levels, strict=True) if level[0][1]}
    entry = family_entry(family)
    depth = depths if len(attention_depths) > 1 or entry.unet_depth_list else (attention_depths or {1}).pop()
    if cross_dim is None:
        raise ModelError("the checkpoint's UNet has no cross-attention; it is not a text-to-image model")
    groups = 32
    if any(c % groups for c in block_out):
        raise ModelError(f"the checkpoint's UNet widths {block_out} are not multiples of 32; unsupported layout")
    heads: Any = entry.unet_heads or [max(1, c // 64) for c in block_out]
    added: dict[str, Any] = {}
    if UNET + "label_emb.0.0.weight" in state:  # SDXL: the pooled text vector and six size numbers, "text_time"
        pooled = int(state[XL_CLIP_G + "text_projection"].shape[1])
        inputs = int(state[UNET + "label_emb.0.0.weight"].shape[1])
        added = {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": (inputs - pooled) // 6,
            "projection_class_embeddings_input_dim": inputs,
        }
    return {
        **added,
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "attention_head_dim": heads,
        "block_out_channels": block_out,
        "center_input_sample": False,
        "cross_attention_dim": cross_dim,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": in_channels,
        "layers_per_block": len(levels[0]),
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": groups,
        "out_channels": shape("out.2.weight")[0],
        "sample_size": native_size // 8,
        "transformer_layers_per_block": depth,
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "use_linear_projection": linear,
        "upcast_attention": bool(entry.upcast_attention_v and v_pred),
    }


def infer_vae_config(state: dict[str, torch.Tensor], native_size: int, family: str = "sd1") -> dict[str, Any]:
    levels = _levels(state, VAE + "encoder.down.", r"(\d+)\.")
    if not levels:
        raise ModelError("the checkpoint's VAE has no encoder blocks; unsupported layout")
    block_out = [int(state[VAE + f"encoder.down.{i}.block.0.conv2.weight"].shape[0]) for i in levels]
    layers = len(_levels(state, VAE + "encoder.down.0.block.", r"(\d+)\."))
    latent = int(state[VAE + "encoder.conv_out.weight"].shape[0]) // 2
    return {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": block_out,
        "down_block_types": ["DownEncoderBlock2D"] * len(block_out),
        "in_channels": 3,
        "latent_channels": latent,
        "layers_per_block": layers,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": native_size,
        "scaling_factor": family_entry(family).vae_scaling,
        "up_block_types": ["UpDecoderBlock2D"] * len(block_out),
        **({"force_upcast": True} if family_entry(family).vae_force_upcast else {}),
    }


def convert_text(state: dict[str, torch.Tensor], family: str) -> list[tuple[dict[str, Any], dict[str, torch.Tensor]]]:
    """(CLIPTextConfig kwargs, flattened CLIPTextModel state dict) of each of the checkpoint's text encoders, as its
    family keeps them (the families' table)."""
    return [
        _convert_openclip(state, text.prefix, drop_last=text.drop_last)
        if text.openclip
        else _convert_clip(state, text.prefix)
        for text in family_entry(family).checkpoint_text
    ]


def _convert_clip(state: dict[str, torch.Tensor], prefix: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    raw = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    out = {k.removeprefix("text_model."): v for k, v in raw.items()}
    out.pop("embeddings.position_ids", None)
    width = int(out["embeddings.token_embedding.weight"].shape[1])
    layers = len({int(m.group(1)) for k in out if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
    inter = int(out["encoder.layers.0.mlp.fc1.weight"].shape[0])
    vocab, positions = (
        out["embeddings.token_embedding.weight"].shape[0],
        out["embeddings.position_embedding.weight"].shape[0],
    )
    return _text_config(vocab, positions, width, inter, layers, "quick_gelu"), out


def _convert_openclip(
    state: dict[str, torch.Tensor], prefix: str, drop_last: bool
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """OpenCLIP's text tower as a transformers CLIP text model. SD2 conditions on the penultimate layer, then the
    final layer norm, so its last layer is dropped (drop_last); SDXL's clip_g keeps every layer (the penultimate is
    taken at run time) and its text projection."""
    raw = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    width = int(raw["token_embedding.weight"].shape[1])
    total = len({int(m.group(1)) for k in raw if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))})
    layers = total - 1 if drop_last else total
    if layers < 1:
        raise ModelError("the checkpoint's OpenCLIP text encoder has too few layers")
    inter = int(raw["transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
    vocab, positions = raw["token_embedding.weight"].shape[0], raw["positional_embedding"].shape[0]
    out = {
        "embeddings.token_embedding.weight": raw["token_embedding.weight"],
        "embeddings.position_embedding.weight": raw["positional_embedding"],
        "final_layer_norm.weight": raw["ln_final.weight"],
        "final_layer_norm.bias": raw["ln_final.bias"],
    }
    names = {
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
        "attn.out_proj": "self_attn.out_proj",
    }
    for i in range(layers):
        block = f"transformer.resblocks.{i}."
        target = f"encoder.layers.{i}."
        for old, new in names.items():
            for leaf in ("weight", "bias"):
                out[f"{target}{new}.{leaf}"] = raw[f"{block}{old}.{leaf}"]
        for leaf in ("weight", "bias"):
            qkv = raw[f"{block}attn.in_proj_{leaf}"]
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), qkv.chunk(3, dim=0), strict=True):
                out[f"{target}self_attn.{part}.{leaf}"] = chunk.contiguous()
    config = _text_config(vocab, positions, width, inter, layers, "gelu")
    if not drop_last and "text_projection" in raw:  # x @ text_projection in OpenCLIP: a Linear's weight transposed
        out["text_projection.weight"] = raw["text_projection"].T.contiguous()
        config["projection_dim"] = int(raw["text_projection"].shape[1])
    return config, out


def _text_config(vocab: int, positions: int, width: int, inter: int, layers: int, act: str) -> dict[str, Any]:
    if width % 64 and width >= 64:
        raise ModelError(f"the checkpoint's text encoder is {width} wide, not a multiple of 64; unsupported")
    return {
        "vocab_size": int(vocab),
        "hidden_size": width,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, width // 64),
        "max_position_embeddings": int(positions),
        "hidden_act": act,
        "layer_norm_eps": 1e-05,
        "projection_dim": width,
        "bos_token_id": 0,
        "pad_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }


def detect_prediction_type(
    family: str, meta: dict[str, str], keys: set[str], path: Path, override: str
) -> tuple[str, str]:
    """(prediction type, why) for a single-file checkpoint."""
    if override != "auto":
        return override, "set by --prediction-type"
    if "v_pred" in keys:
        return "v_prediction", "the checkpoint has a v_pred key"
    spec = (meta.get("modelspec.prediction_type") or "").lower()
    if spec in ("v", "v_prediction"):
        return "v_prediction", "the checkpoint's modelspec metadata"
    if spec in ("epsilon", "eps"):
        return "epsilon", "the checkpoint's modelspec metadata"
    for sidecar in (path.with_suffix(".yaml"), path.with_suffix(".yml")):
        if sidecar.is_file() and sidecar.stat().st_size < 1_000_000:
            text = sidecar.read_text("utf-8", errors="replace")
            found = re.search(r"^\s*parameterization:\s*[\"']?(\w+)", text, re.MULTILINE)
            if found:
                kind = "v_prediction" if found.group(1) == "v" else "epsilon"
                return kind, f"{sidecar.name} says parameterization: {found.group(1)}"
    entry = family_entry(family)
    for step, why in entry.epsilon_steps:
        if meta.get("global_step") == step:
            return "epsilon", why
    return entry.prediction


def scheduler_config(prediction_type: str, zero_snr: bool = False) -> dict[str, Any]:
    """Stable Diffusion's noise schedule; with zero_snr, rescaled to zero terminal SNR (the last timestep is pure
    noise, as some v-prediction anime models were trained) and sampled from that last timestep ("trailing")."""
    return {
        "_class_name": "DDIMScheduler",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "num_train_timesteps": 1000,
        "prediction_type": prediction_type,
        "set_alpha_to_one": False,
        "steps_offset": 0 if zero_snr else 1,
        "timestep_spacing": "trailing" if zero_snr else "leading",
        "trained_betas": None,
        **({"rescale_betas_zero_snr": True} if zero_snr else {}),
    }


def detect_zero_snr(keys: set[str], prediction: str) -> tuple[bool, str]:
    """(zero terminal SNR?, why) for a single-file checkpoint: a v-prediction file with a ztsnr key (ComfyUI's
    rule; NoobAI-XL V-Pred and its merges carry both keys)."""
    if "ztsnr" in keys and prediction == "v_prediction":
        return True, "the checkpoint has a ztsnr key: zero terminal SNR"
    if "ztsnr" in keys:
        return False, "the checkpoint has a ztsnr key but predicts noise: the ordinary schedule"
    return False, ""


def refuse_edm(keys: set[str], path: Path) -> None:
    """SDXL-architecture models trained as EDM (continuous sigmas) use another noise schedule than textual
    inversion's; refuse them by name instead of training them wrongly."""
    if "edm_mean" in keys or "edm_vpred.sigma_max" in keys:
        kind = "Playground v2.5's EDM" if "edm_mean" in keys else "EDM v-prediction (CosXL-style)"
        raise ModelError(
            f"model {path}: an SDXL-architecture model trained with {kind} noise schedule (an edm_* "
            "key); tistudio trains embeddings for the DDPM schedule of SDXL and its fine-tunes only"
        )


def pipeline_index() -> dict[str, Any]:
    """model_index.json of a Stable Diffusion 1.x/2.x diffusers folder without a safety checker."""
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def write_config_folder(
    folder: Path,
    family: str,
    unet: dict[str, Any],
    vae: dict[str, Any],
    text: dict[str, Any],
    scheduler: dict[str, Any],
) -> None:
    """A weights-free diffusers folder: the configs from_single_file needs, written locally."""
    from tistudio.models.tokenizer import write_tokenizer

    write_json(folder / "model_index.json", pipeline_index())
    write_json(folder / "unet" / "config.json", unet)
    write_json(folder / "vae" / "config.json", vae)
    write_json(
        folder / "text_encoder" / "config.json",
        {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **text},
    )
    write_json(folder / "scheduler" / "scheduler_config.json", scheduler)
    write_tokenizer(folder / "tokenizer", family_entry(family).encoders[0].pad_token)


# ----------------------------------------------------------------------------------------------------------------
# Loading


def _check_loaded(module: torch.nn.Module, what: str, source: str) -> None:
    missing = [
        name for name, p in list(module.named_parameters()) + list(module.named_buffers()) if p.device.type == "meta"
    ]
    if missing:
        raise ModelError(
            f"model {source}: the checkpoint lacks {len(missing)} {what} weights (e.g. {missing[0]}); "
            "the file is incomplete or of an unsupported variant"
        )


def _freeze(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    module.requires_grad_(False)
    module.eval()
    if any(p.dtype != dtype for p in module.parameters()):
        module = module.to(dtype=dtype)
    return module.to(device=device)


def _load_single_file(
    path: Path, options: ModelOptions, device: torch.device, dtype: torch.dtype, text_only: bool, work_dir: Path
) -> SDModel:
    try:
        safeload.check_size(path, MAX_CHECKPOINT_BYTES, "a checkpoint")
    except UnsafeFileError as exc:
        raise ModelError(f"model {exc}") from None
    if text_only and safeload.sniff(path) == safeload.SAFETENSORS:
        try:
            header, _ = safeload.safetensors_header(path, 100_000, 20 * 1024**3)
        except UnsafeFileError as exc:
            raise ModelError(f"model {exc}") from None
        family = classify_checkpoint(set(header), path)
        state, meta = read_checkpoint(path, text_only=True)
        keys = set(header)
    else:
        state, meta = read_checkpoint(path)
        keys = set(state)
        family = classify_checkpoint(keys, path)
    refuse_edm(keys, path)
    prediction, why = detect_prediction_type(family, meta, keys, path, options.prediction_type)
    zero_snr, zero_why = detect_zero_snr(keys, prediction)
    native = family_entry(family).native(prediction)
    converted = convert_text(state, family)
    text = _single_file_text(converted, family, path, device, dtype)
    unet = vae = None
    if not text_only:
        unet, vae = _single_file_unet_vae(
            state, family, converted[0][0], native, prediction, path, work_dir, device, dtype
        )
    del state
    return SDModel(
        text=text,
        vae=vae,
        unet=unet,
        scheduler_config=scheduler_config(prediction, zero_snr),
        family=family,
        prediction_type=prediction,
        native_size=native,
        device=device,
        dtype=dtype,
        source=str(path),
        name=path.stem,
        notes=[f"prediction type {prediction}: {why}", *([zero_why] if zero_why else [])],
    )


def _single_file_text(
    converted: list[tuple[dict[str, Any], dict[str, torch.Tensor]]],
    family: str,
    path: Path,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, TextEncoder]:
    """The family's text encoders from their converted (config, weights), with the shipped tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from tistudio.models.tokenizer import load_tokenizer

    slots = family_entry(family).encoders
    text = {}
    for slot, (config, weights) in zip(slots, converted, strict=True):
        module = (CLIPTextModelWithProjection if slot.pooled else CLIPTextModel)(CLIPTextConfig(**config))
        result = module.load_state_dict(
            weights
            if not slot.pooled
            else {("" if k.startswith("text_projection") else "text_model.") + k: v for k, v in weights.items()},
            strict=False,
        )
        if result.missing_keys:
            raise ModelError(f"model {path}: the text encoder lacks weights such as {result.missing_keys[0]}")
        tokenizer = load_tokenizer(slot.pad_token)
        text[slot.key] = TextEncoder(slot, tokenizer, _freeze(module, device, dtype))
    return text


def _single_file_unet_vae(
    state: dict[str, torch.Tensor],
    family: str,
    text_config: dict[str, Any],
    native: int,
    prediction: str,
    path: Path,
    work_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[Any, Any]:
    """The UNet and VAE through diffusers' single-file conversion, with configs read off the tensor shapes and
    written locally (nothing is downloaded)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet_config = infer_unet_config(state, family, native, prediction == "v_prediction")
    vae_config = infer_vae_config(state, native, family)
    digest = hashlib.sha256(
        json.dumps([unet_config, vae_config, text_config, family, prediction], sort_keys=True).encode()
    ).hexdigest()[:16]
    folder = work_dir / "configs" / f"{family}-{digest}"
    if not (folder / "model_index.json").is_file():
        write_config_folder(folder, family, unet_config, vae_config, text_config, scheduler_config(prediction))
    try:
        cast = {} if dtype == torch.float32 else {"torch_dtype": dtype}
        unet = UNet2DConditionModel.from_single_file(
            state, config=str(folder), subfolder="unet", local_files_only=True, **cast
        )
        vae = AutoencoderKL.from_single_file(state, config=str(folder), subfolder="vae", local_files_only=True, **cast)
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise ModelError(
            f"model {path}: cannot convert the checkpoint's weights ({type(exc).__name__}: {str(exc)[:300]})"
        ) from None
    _check_loaded(unet, "UNet", str(path))
    _check_loaded(vae, "VAE", str(path))
    return _freeze(unet, device, dtype), _freeze(vae, device, dtype)


def _pipeline_class(folder: Path) -> str:
    """The pipeline model_index.json names ('' without one); SDXL's refiner, inpainting and other pipelines are
    refused, with what they are, before anything is loaded."""
    index = folder / "model_index.json"
    if not index.is_file():
        return ""
    try:
        data = json.loads(index.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"model {folder}: model_index.json is not valid JSON ({exc})") from None
    data = data if isinstance(data, dict) else {}
    name = str(data.get("_class_name", ""))
    if "XL" in name or "text_encoder_2" in data:
        if "Img2Img" in name or "Inpaint" in name or data.get("text_encoder", [None])[0] is None:
            raise ModelError(
                f"model {folder}: an SDXL refiner or inpainting model ({name}); textual inversion "
                "needs a plain text-to-image SDXL base model (or one of its fine-tunes)"
            )
        if name and name != "StableDiffusionXLPipeline":
            raise ModelError(
                f"model {folder}: a {name}; only the text-to-image StableDiffusionXLPipeline is "
                "supported among SDXL pipelines"
            )
        return "StableDiffusionXLPipeline"
    if name and "StableDiffusion" not in name:
        raise ModelError(f"model {folder}: a {name}; only Stable Diffusion 1.x/2.x and SDXL pipelines are supported")
    if "Inpaint" in name or "InstructPix2Pix" in name or "Upscale" in name or "StableDiffusion3" in name:
        raise ModelError(
            f"model {folder}: a {name}; textual inversion needs a plain text-to-image SD 1.x/2.x or SDXL model"
        )
    return name


def _folder_family(folder: Path) -> Family:
    """The family of a diffusers folder, by its pipeline class and its text encoder's activation."""
    config_file = folder / "text_encoder" / "config.json"
    try:
        activation = json.loads(config_file.read_text("utf-8")).get("hidden_act", "quick_gelu")
    except (OSError, ValueError, AttributeError):
        activation = "quick_gelu"
    found = folder_family(_pipeline_class(folder) or "StableDiffusionPipeline", str(activation))
    if found is None:
        raise ModelError(f"model {folder}: no model family of tistudio's is generated by its pipeline")
    return found


def _folder_native(folder: Path, entry: Family, prediction: str) -> int:
    """A diffusers folder's native size from its UNet and VAE configs (read without the weights, so that a
    text-only load - creating an embedding - says it too); the family's where they cannot be read."""
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text("utf-8"))
        vae = json.loads((folder / "vae" / "config.json").read_text("utf-8"))
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return entry.native(prediction)


def _load_folder(
    folder: Path,
    options: ModelOptions,
    device: torch.device,
    dtype: torch.dtype,
    text_only: bool,
    local_only: bool,
    name: str,
) -> SDModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    entry = _folder_family(folder)
    slots = entry.encoders
    parts = [name for slot in slots for name in (slot.text_encoder, slot.tokenizer)]
    missing = [part for part in parts + ([] if text_only else ["unet", "vae"]) if not (folder / part).is_dir()]
    if missing:
        raise ModelError(f"model {folder}: the diffusers folder lacks {', '.join(missing)}/")
    try:
        text: dict[str, TextEncoder] = {}
        for slot in slots:
            tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder=slot.tokenizer, local_files_only=local_only)
            kind = CLIPTextModelWithProjection if slot.pooled else CLIPTextModel
            module = kind.from_pretrained(
                folder, subfolder=slot.text_encoder, local_files_only=local_only, torch_dtype=dtype
            )
            text[slot.key] = TextEncoder(slot, tokenizer, _freeze(module, device, dtype))
        family = entry.key
        unet = vae = None
        if not text_only:
            unet = UNet2DConditionModel.from_pretrained(
                folder, subfolder="unet", local_files_only=local_only, torch_dtype=dtype
            )
            vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=local_only, torch_dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(
            f"model {folder}: cannot load the diffusers folder ({type(exc).__name__}: {str(exc)[:300]})"
        ) from None
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    try:
        sched = json.loads(scheduler_file.read_text("utf-8")) if scheduler_file.is_file() else {}
    except (OSError, ValueError) as exc:
        raise ModelError(f"model {folder}: scheduler_config.json is not valid JSON ({exc})") from None
    prediction = sched.get("prediction_type") or "epsilon"
    why = "the scheduler config"
    if options.prediction_type != "auto":
        prediction, why = options.prediction_type, "set by --prediction-type"
    config = {**scheduler_config(prediction), **{k: v for k, v in sched.items() if not k.startswith("_")}}
    config["prediction_type"] = prediction
    native = _folder_native(folder, entry, prediction)
    return SDModel(
        text=text,
        vae=_freeze(vae, device, dtype) if vae is not None else None,
        unet=_freeze(unet, device, dtype) if unet is not None else None,
        scheduler_config=config,
        family=family,
        prediction_type=prediction,
        native_size=native,
        device=device,
        dtype=dtype,
        source=str(folder),
        name=name,
        notes=[f"prediction type {prediction}: {why}"],
    )


def _hub_snapshot(repo_id: str) -> Path:
    """Download (or find in the local cache) a Hub model's configs, tokenizer and safetensors weights."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = [
        "model_index.json",
        "*/config.json",
        "scheduler/*.json",
        "tokenizer/*",
        "tokenizer_2/*",
        "unet/*.safetensors",
        "vae/*.safetensors",
        "text_encoder/*.safetensors",
        "text_encoder_2/*.safetensors",
    ]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise ModelError(
            f"model {repo_id!r}: not in the local Hugging Face cache and the Hub cannot be reached "
            "(HF_HUB_OFFLINE is set or there is no network); download it once or pass a local "
            "folder or checkpoint file"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelError(f"model {repo_id!r}: cannot download it from the Hugging Face Hub ({exc})") from None


def check_model_source(options: ModelOptions) -> str:
    """What can be known about a model without loading it - its source exists, its device is there, a Hub id is
    in the local cache when the Hub cannot be reached - so that a server refuses a bad --model when it starts,
    not at its first job. Returns the source kind."""
    kind = source_kind(options.model)
    resolve_device(options.device)
    if kind == "hub" and os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(options.model, "model_index.json"), str):
            raise ModelError(
                f"model {options.model!r}: not in the local Hugging Face cache and HF_HUB_OFFLINE is "
                "set; download it once or pass a local folder or checkpoint file"
            )
    return kind


def load_model(options: ModelOptions, cache_dir: Path, text_only: bool = False) -> SDModel:
    """Load a model for training or generation; with text_only, only the tokenizer and text encoder."""
    kind = source_kind(options.model)
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.precision, device)
    spec = options.model
    if kind == "demo":
        from tistudio.models.builtin import demo_model_dir

        folder = demo_model_dir(cache_dir, DEMOS[spec])
        model = _load_folder(folder, options, device, dtype, text_only, True, f"tistudio-{spec}")
        path, hash_kind = folder, "folder"
    elif kind == "folder":
        path = Path(spec).expanduser()
        model = _load_folder(path, options, device, dtype, text_only, True, path.name)
        hash_kind = "folder"
    elif kind == "file":
        path = Path(spec).expanduser()
        model = _load_single_file(path, options, device, dtype, text_only, cache_dir)
        hash_kind = "file"
    else:
        path = _hub_snapshot(spec)
        model = _load_folder(path, options, device, dtype, text_only, True, spec.replace("/", "_"))
        hash_kind = "folder"
    model.hash = model_hash(path, hash_kind, cache_dir)
    log.info("loaded %s", model.describe())
    for note in model.notes:
        log.info("%s", note)
    return model


def model_width(options: ModelOptions, cache_dir: Path) -> int | None:
    """The width an embedding must have for this model (its text encoders' together), read from configs or a
    checkpoint's header without loading any weights; None where that cannot be told so (a pickled .ckpt, a Hub id
    not in the cache, an unreadable file)."""
    try:
        kind = source_kind(options.model)
        if kind == "demo":
            from tistudio.models.builtin import demo_model_dir

            return _folder_width(demo_model_dir(cache_dir, DEMOS[options.model]))
        if kind == "folder":
            return _folder_width(Path(options.model).expanduser())
        if kind == "file":
            return _file_width(Path(options.model).expanduser())
    except (TistudioError, OSError, ValueError, KeyError, TypeError):
        return None
    return None


def _folder_width(folder: Path) -> int:
    entry = _folder_family(folder)
    return sum(
        int(json.loads((folder / slot.text_encoder / "config.json").read_text("utf-8"))["hidden_size"])
        for slot in entry.encoders
    )


def _file_width(path: Path) -> int | None:
    if safeload.sniff(path) != safeload.SAFETENSORS:
        return None
    header, _ = safeload.safetensors_header(path, 100_000, 20 * 1024**3)
    entry = family_entry(classify_checkpoint(set(header), path))
    widths = [
        int(info["shape"][-1])
        for text in entry.checkpoint_text
        for key, info in header.items()
        if key.startswith(text.prefix) and key.endswith("token_embedding.weight") and isinstance(info, dict)
    ]
    return sum(widths) if len(widths) == len(entry.checkpoint_text) else None
