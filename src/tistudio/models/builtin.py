"""Small Stable Diffusion models built locally: the tests' tiny random model, the demo's world model, and the
full-size SD1.5 architecture with random weights for benchmarks.

All have exactly Stable Diffusion's architecture and file layout - a CLIP text encoder with the real 49,408-token
vocabulary, a UNet2DConditionModel with cross-attention, an AutoencoderKL and the SD noise schedule - so every
code path (single-file conversion included) treats them like a real checkpoint. The random ones' pictures are
noise: they prove that the software works. The world model (shipped weights, see demo/world.py and
scripts/build_world_model.py) was trained so that text controls its 64-pixel cartoons.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from tistudio.models.families import family as family_entry

log = logging.getLogger(__name__)

DEMO_VERSION = "2"
TEXT_WIDTH = 64
# Random cross-attention barely changes a tiny UNet's output; scaling its value and output projections makes the
# text (and so an embedding) steer the prediction measurably, as it does in a trained model.
TEXT_GAIN = 16.0


def unet_config(family: str, native_size: int) -> dict[str, Any]:
    widths = [32, 32, 64, 64]
    return {
        "sample_size": native_size // 8,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 1,
        "block_out_channels": widths,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "cross_attention_dim": TEXT_WIDTH,
        "norm_num_groups": 32,
        "attention_head_dim": 8 if family == "sd1" else [max(1, w // 64) for w in widths],
        "use_linear_projection": family == "sd2",
        "upcast_attention": family == "sd2",
    }


def vae_config(native_size: int) -> dict[str, Any]:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 1,
        "block_out_channels": [32, 32, 64, 64],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "norm_num_groups": 32,
        "sample_size": native_size,
        "scaling_factor": 0.18215,
    }


def text_config(family: str) -> dict[str, Any]:
    return {
        "vocab_size": 49408,
        "hidden_size": TEXT_WIDTH,
        "intermediate_size": 2 * TEXT_WIDTH,
        "num_hidden_layers": 2,
        "num_attention_heads": TEXT_WIDTH // 64,
        "max_position_embeddings": 77,
        "projection_dim": TEXT_WIDTH,
        "hidden_act": "quick_gelu" if family == "sd1" else "gelu",
        "bos_token_id": 0,
        "pad_token_id": 1,
        "eos_token_id": 2,
    }


# The tiny SDXL's two text encoders (clip_l, clip_g), of different widths as SDXL's 768 and 1280 are, and its
# size-conditioning embedding width.
SDXL_WIDTHS = (32, 64)
SDXL_TIME_WIDTH = 8


def sdxl_unet_config(native_size: int) -> dict[str, Any]:
    """SDXL's UNet layout, tiny: the context is both encoders' hidden states side by side; the added embedding
    takes the pooled vector and the six size numbers ("text_time")."""
    widths = [32, 32, 64, 64]
    return {
        "sample_size": native_size // 8,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 1,
        "block_out_channels": widths,
        "down_block_types": ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 3,
        "up_block_types": ["CrossAttnUpBlock2D"] * 3 + ["UpBlock2D"],
        "cross_attention_dim": sum(SDXL_WIDTHS),
        "norm_num_groups": 32,
        "attention_head_dim": [max(1, w // 64) for w in widths],
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": SDXL_TIME_WIDTH,
        "projection_class_embeddings_input_dim": 6 * SDXL_TIME_WIDTH + SDXL_WIDTHS[1],
    }


def sdxl_text_configs() -> tuple[dict[str, Any], dict[str, Any]]:
    """clip_l (CLIP ViT-L's kind: quick_gelu) and clip_g (OpenCLIP's: gelu, with a projection), tiny."""

    def config(width: int, act: str) -> dict[str, Any]:
        return {
            **text_config("sd1"),
            "hidden_size": width,
            "intermediate_size": 2 * width,
            "num_attention_heads": 1,
            "projection_dim": width,
            "hidden_act": act,
        }

    return config(SDXL_WIDTHS[0], "quick_gelu"), config(SDXL_WIDTHS[1], "gelu")


def build_tiny_sdxl(folder: Path, seed: int = 0, native_size: int = 64, text_gain: float = TEXT_GAIN) -> Path:
    """Write a tiny SDXL-architecture diffusers folder with seeded random weights: two text encoders (the second
    with a projection, for the pooled vector), a "text_time" UNet and an SDXL-style VAE config."""
    first, second = sdxl_text_configs()
    vae = {**vae_config(native_size), "scaling_factor": 0.13025, "force_upcast": True}
    return save_sdxl_folder(
        folder,
        seed,
        first,
        second,
        sdxl_unet_config(native_size),
        vae,
        text_gain,
        "A tiny SDXL-architecture model with seeded random weights, built by tistudio for its "
        "tests. Its pictures are noise.\n",
    )


def sdxl_configs() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """CLIP-L, OpenCLIP-bigG, UNet and VAE configs of full-size SDXL base 1.0 (for benchmarks, random weights)."""
    base = {"vocab_size": 49408, "max_position_embeddings": 77, "bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2}
    first = {
        **base,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "projection_dim": 768,
        "hidden_act": "quick_gelu",
    }
    second = {
        **base,
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_hidden_layers": 32,
        "num_attention_heads": 20,
        "projection_dim": 1280,
        "hidden_act": "gelu",
    }
    unet = {
        "sample_size": 128,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": [320, 640, 1280],
        "down_block_types": ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2,
        "up_block_types": ["CrossAttnUpBlock2D"] * 2 + ["UpBlock2D"],
        "transformer_layers_per_block": [1, 2, 10],
        "attention_head_dim": [5, 10, 20],
        "cross_attention_dim": 2048,
        "use_linear_projection": True,
        "norm_num_groups": 32,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
    }
    vae = {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "norm_num_groups": 32,
        "sample_size": 1024,
        "scaling_factor": 0.13025,
        "force_upcast": True,
    }
    return first, second, unet, vae


def full_size_sdxl_dir(cache_dir: Path, seed: int = 0) -> Path:
    """Full-size SDXL architecture with seeded random weights (about 13.9 GB in float32), built once: honest for
    speed and memory, meaningless for pictures."""
    first, second, unet, vae = sdxl_configs()
    return _build_once(
        Path(cache_dir) / "models" / f"sdxl-random-{seed}",
        lambda folder: save_sdxl_folder(
            folder,
            seed,
            first,
            second,
            unet,
            vae,
            1.0,
            "SDXL's architecture with seeded random weights, built by "
            "tistudio's benchmarks. Honest for speed and memory; its pictures are noise.\n",
        ),
    )


def save_sdxl_folder(
    folder: Path,
    seed: int,
    first: dict[str, Any],
    second: dict[str, Any],
    unet_config_: dict,
    vae_config_: dict,
    text_gain: float,
    note: str,
) -> Path:
    """Build and write an SDXL-architecture diffusers folder (StableDiffusionXLPipeline's layout) with seeded random
    weights: each module is written as soon as it is made, so only one is in memory at a time."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    CLIPTextModel(CLIPTextConfig(**first)).save_pretrained(folder / "text_encoder")
    torch.manual_seed(seed + 3)
    CLIPTextModelWithProjection(CLIPTextConfig(**second)).save_pretrained(folder / "text_encoder_2")
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**unet_config_)
    if text_gain != 1.0:
        _gain(unet, text_gain)
    unet.save_pretrained(folder / "unet")
    del unet
    torch.manual_seed(seed + 2)
    AutoencoderKL(**vae_config_).save_pretrained(folder / "vae")
    return write_sdxl_folder(folder, None, None, None, None, note)


def write_sdxl_folder(folder: Path, first: Any, second: Any, unet: Any, vae: Any, note: str) -> Path:
    """Write an SDXL diffusers folder: the given modules (None: already written), both tokenizers, the scheduler
    and model_index.json."""
    from tistudio.models.loading import scheduler_config
    from tistudio.models.tokenizer import write_tokenizer
    from tistudio.storage import write_json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for module, sub in ((first, "text_encoder"), (second, "text_encoder_2"), (unet, "unet"), (vae, "vae")):
        if module is not None:
            module.save_pretrained(folder / sub)
    for slot in family_entry("sdxl").encoders:
        write_tokenizer(folder / slot.tokenizer, slot.pad_token)
    write_json(folder / "scheduler" / "scheduler_config.json", scheduler_config("epsilon"))
    write_json(
        folder / "model_index.json",
        {
            "_class_name": "StableDiffusionXLPipeline",
            "_diffusers_version": "0.42.1",
            "force_zeros_for_empty_prompt": False,
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "image_encoder": [None, None],
            "feature_extractor": [None, None],
        },
    )
    (folder / "TINY-MODEL.txt").write_text(note, "utf-8")
    return folder


def _gain(unet: Any, text_gain: float) -> None:
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if ".attn2.to_v." in name or ".attn2.to_out.0.weight" in name:
                parameter.mul_(text_gain**0.5)


def build_tiny_model(
    folder: Path,
    family: str = "sd1",
    seed: int = 0,
    native_size: int = 64,
    prediction_type: str | None = None,
    text_gain: float = TEXT_GAIN,
) -> Path:
    """Write a tiny SD-architecture diffusers folder with seeded random weights.

    text_gain scales the cross-attention value and output projections (each by its square root), so that the
    prompt changes the UNet's prediction enough for training to have something to learn.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if family not in ("sd1", "sd2"):
        raise ValueError(f"family must be sd1 or sd2, not {family!r}")
    prediction = prediction_type or ("epsilon" if family == "sd1" else "v_prediction")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config(family)))
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**unet_config(family, native_size))
    _gain(unet, text_gain)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(**vae_config(native_size))
    return save_model_folder(
        folder,
        family,
        text_encoder,
        unet,
        vae,
        prediction,
        "A tiny Stable Diffusion model with seeded random weights, built by tistudio for its "
        "demo and tests.\nIt proves that the software works; its pictures are noise and mean "
        "nothing.\n",
    )


def save_model_folder(
    folder: Path, family: str, text_encoder: Any, unet: Any, vae: Any, prediction: str, note: str
) -> Path:
    """Write modules, tokenizer, scheduler and model_index.json as a complete diffusers folder."""
    from tistudio.models.loading import pipeline_index, scheduler_config
    from tistudio.models.tokenizer import load_tokenizer, write_tokenizer
    from tistudio.storage import write_json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text_encoder.save_pretrained(folder / "text_encoder")
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    pad = family_entry(family).encoders[0].pad_token
    load_tokenizer(pad).save_pretrained(folder / "tokenizer")
    write_tokenizer(folder / "tokenizer", pad)
    write_json(folder / "scheduler" / "scheduler_config.json", scheduler_config(prediction))
    write_json(folder / "model_index.json", pipeline_index())
    (folder / "TINY-MODEL.txt").write_text(note, "utf-8")
    return folder


def sd15_configs() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Text encoder, UNet and VAE configs of full-size Stable Diffusion 1.5 (for benchmarks with random weights)."""
    text = {
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "projection_dim": 768,
        "hidden_act": "quick_gelu",
        "bos_token_id": 0,
        "pad_token_id": 1,
        "eos_token_id": 2,
    }
    unet = {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": [320, 640, 1280, 1280],
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    }
    vae = {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "norm_num_groups": 32,
        "sample_size": 512,
        "scaling_factor": 0.18215,
    }
    return text, unet, vae


def full_size_model_dir(cache_dir: Path, seed: int = 0) -> Path:
    """Full-size SD1.5 architecture with seeded random weights (about 4.3 GB), built once: honest for speed and
    memory, meaningless for pictures."""

    def build(folder: Path) -> None:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        text_config_, unet_config_, vae_config_ = sd15_configs()
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config_))
        unet = UNet2DConditionModel(**unet_config_)
        vae = AutoencoderKL(**vae_config_)
        save_model_folder(
            folder,
            "sd1",
            text_encoder,
            unet,
            vae,
            "epsilon",
            "Stable Diffusion 1.5's architecture with seeded random weights, built by tistudio's "
            "benchmarks. Honest for speed and memory; its pictures are noise.\n",
        )

    return _build_once(Path(cache_dir) / "models" / f"sd15-random-{seed}", build)


def _build_once(target: Path, build: Any) -> Path:
    """Run build(staging_folder) once and move the result into place atomically."""
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("building %s (once)", target)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        build(staging)
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / "model_index.json").is_file():  # not a concurrent build that won the race
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def random_model_dir(cache_dir: Path) -> Path:
    """The tiny model with random weights (what the tests use), built once into the cache."""
    return _build_once(
        Path(cache_dir) / "models" / f"tiny-sd1-v{DEMO_VERSION}",
        lambda folder: build_tiny_model(folder, family="sd1", seed=0),
    )


# The shipped world models by family: the SD1 one (scripts/build_world_model.py) and its SDXL variant
# (scripts/build_world_sdxl.py), which shares its VAE and trait reader.
WORLD_FOLDERS = {"sd1": "world", "sdxl": "world-sdxl"}


def world_files(family: str = "sd1") -> tuple[Path, Path]:
    from importlib import resources

    base = resources.files("tistudio").joinpath("data", WORLD_FOLDERS[family])
    return Path(str(base.joinpath("world-model.safetensors"))), Path(str(base.joinpath("world-model.json")))


def demo_model_dir(cache_dir: Path, family: str = "sd1") -> Path:
    """A demo model: a small world model shipped with tistudio, expanded once into a diffusers folder."""
    weights, _ = world_files(family)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:10]
    name = "world" if family == "sd1" else f"world-{family}"
    return _build_once(
        Path(cache_dir) / "models" / f"{name}-{digest}", lambda folder: expand_world_model(folder, family)
    )


WORLD_NOTE = (
    "tistudio's demo world model: a small {arch}-architecture model trained on a synthetic world of cartoon "
    "people (see tistudio/demo/world.py and scripts/{script}). Text controls its pictures; they are 64x64 "
    "cartoons, not photographs.\n"
)


def expand_world_model(folder: Path, family: str = "sd1") -> Path:
    """Write a shipped world model (float16, used token rows only) as a complete diffusers folder, with its trait
    reader (trait-reader.safetensors) and build record (world.json) beside it."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from tistudio.safeload import load_safetensors
    from tistudio.storage import write_json

    weights, meta_file = world_files(family)
    meta = json.loads(meta_file.read_text("utf-8"))
    tensors, _ = load_safetensors(weights, 64 * 1024 * 1024, 10_000, 50_000_000)

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v.float() for k, v in tensors.items() if k.startswith(prefix)}

    unet = UNet2DConditionModel(**meta["unet"])
    unet.load_state_dict(part("unet."))
    vae = AutoencoderKL(**meta["vae"])
    vae.load_state_dict(part("vae."))
    if family == "sdxl":
        first = _world_text(meta["text_l"], meta["token_tables"]["l"], part("text_l."), tensors, "text_l_", False)
        second = _world_text(meta["text_g"], meta["token_tables"]["g"], part("text_g."), tensors, "text_g_", True)
        write_sdxl_folder(
            folder, first, second, unet, vae, WORLD_NOTE.format(arch="SDXL", script="build_world_sdxl.py")
        )
    else:
        text = _world_text(meta["text"], meta["token_table"], part("text."), tensors, "text_", False)
        save_model_folder(
            folder,
            "sd1",
            text,
            unet,
            vae,
            "epsilon",
            WORLD_NOTE.format(arch="Stable-Diffusion", script="build_world_model.py"),
        )
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in part("reader.").items()}, str(folder / "trait-reader.safetensors"))
    write_json(folder / "world.json", meta)
    return folder


def _world_text(
    config: dict[str, Any],
    table_meta: dict[str, Any],
    state: dict[str, torch.Tensor],
    tensors: dict[str, torch.Tensor],
    prefix: str,
    projection: bool,
) -> Any:
    """A world model's text encoder: its weights, and its token table rebuilt (the seeded rows the captions never
    use, the stored rows the captions do)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    text = (CLIPTextModelWithProjection if projection else CLIPTextModel)(CLIPTextConfig(**config))
    table = (
        torch.randn(
            (config["vocab_size"], config["hidden_size"]), generator=torch.Generator().manual_seed(table_meta["seed"])
        )
        * table_meta["std"]
    )
    table[tensors[prefix + "token_ids"].long()] = tensors[prefix + "token_rows"].float()
    key = next(k for k in text.state_dict() if k.endswith("token_embedding.weight"))
    state[key] = table
    result = text.load_state_dict(state, strict=False)
    if result.unexpected_keys or [k for k in result.missing_keys if not k.endswith("position_ids")]:
        raise ValueError(f"the world model's text encoder does not fit its config: {result}")
    return text
