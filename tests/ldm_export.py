"""Test helper: write a diffusers SD folder as a single-file checkpoint in the original (LDM) layout.

A1111 and ComfyUI users have checkpoints in this layout. The tests build tiny SD-architecture models, export
them with this helper, and check that tistudio loads the file exactly like the folder. Written for the tests from
the LDM module structure (input_blocks / middle_block / output_blocks, encoder.down / decoder.up, the CLIP or
OpenCLIP text tower); SD layout only (every UNet level has layers_per_block resnets).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str) -> str:
    for old, new in RESNET.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    raise KeyError(rest)


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    layers = config["layers_per_block"]
    attention_up = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    out: dict[str, torch.Tensor] = {}
    fixed = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    for key, value in state.items():
        parts = key.split(".")
        head = ".".join(parts[:2])
        if head in fixed or parts[0] in fixed:
            prefix = head if head in fixed else parts[0]
            new = fixed[prefix] + key[len(prefix) :]
        elif parts[0] == "down_blocks":
            i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                new = f"input_blocks.{1 + i * (layers + 1) + j}.0.{_resnet(rest)}"
            elif kind == "attentions":
                new = f"input_blocks.{1 + i * (layers + 1) + j}.1.{rest}"
            else:  # downsamplers.0.conv.*
                new = f"input_blocks.{(i + 1) * (layers + 1)}.0.op.{'.'.join(parts[5:])}"
        elif parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            new = f"middle_block.{1 if kind == 'attentions' else 2 * j}." + (
                _resnet(rest) if kind == "resnets" else rest
            )
        elif parts[0] == "up_blocks":
            i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                new = f"output_blocks.{i * (layers + 1) + j}.0.{_resnet(rest)}"
            elif kind == "attentions":
                new = f"output_blocks.{i * (layers + 1) + j}.1.{rest}"
            else:
                slot = 2 if attention_up[i] else 1
                new = f"output_blocks.{i * (layers + 1) + layers}.{slot}.{'.'.join(parts[4:])}"
        else:
            raise KeyError(key)
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    levels = len(config["block_out_channels"])
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = key
        if key.startswith(("quant_conv", "post_quant_conv")):
            new = key
        else:
            side, rest = key.split(".", 1)
            rest = rest.replace("conv_norm_out", "norm_out")
            if rest.startswith(("down_blocks.", "up_blocks.")):
                p = rest.split(".")
                i = int(p[1]) if side == "encoder" else levels - 1 - int(p[1])
                group = "down" if side == "encoder" else "up"
                if p[2] == "resnets":
                    leaf = ".".join(p[4:]).replace("conv_shortcut", "nin_shortcut")
                    rest = f"{group}.{i}.block.{p[3]}.{leaf}"
                else:
                    sampler = "downsample" if side == "encoder" else "upsample"
                    rest = f"{group}.{i}.{sampler}.{'.'.join(p[4:])}"
            elif rest.startswith("mid_block.resnets."):
                p = rest.split(".")
                rest = f"mid.block_{int(p[2]) + 1}.{'.'.join(p[3:])}"
            elif rest.startswith("mid_block.attentions."):
                p = rest.split(".")
                leaf = ".".join(p[3:])
                for old, replacement in VAE_ATTN.items():
                    if leaf.startswith(old + "."):
                        leaf = replacement + leaf[len(old) :]
                        break
                rest = f"mid.attn_1.{leaf}"
                if value.dim() == 2:
                    value = value[:, :, None, None]
            new = f"{side}.{rest}"
        out["first_stage_model." + new] = value
    return out


def text_to_ldm(state: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    if family == "sd1":
        return {"cond_stage_model.transformer.text_model." + k: v for k, v in state.items()}
    return openclip_to_ldm(state, "cond_stage_model.model.", extra_layer=True)


def openclip_to_ldm(state: dict[str, torch.Tensor], prefix: str, extra_layer: bool) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model in OpenCLIP's layout. SD2's checkpoints have one more layer than SD2 uses
    (extra_layer, random here); SDXL's clip_g has all its layers and a real text projection."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    width = state["embeddings.token_embedding.weight"].shape[1]
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layers."))
    projection = state["text_projection.weight"].T if "text_projection.weight" in state else torch.eye(width)
    out = {
        prefix + "token_embedding.weight": state["embeddings.token_embedding.weight"],
        prefix + "positional_embedding": state["embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": state["final_layer_norm.weight"],
        prefix + "ln_final.bias": state["final_layer_norm.bias"],
        prefix + "text_projection": projection.contiguous(),
        prefix + "logit_scale": torch.tensor(4.6),
    }
    names = {
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
        "self_attn.out_proj": "attn.out_proj",
    }
    generator = torch.Generator().manual_seed(123)
    for i in range(layers + 1 if extra_layer else layers):
        src = f"encoder.layers.{min(i, layers - 1)}."
        dst = f"{prefix}transformer.resblocks.{i}."
        for old, new in names.items():
            for leaf in ("weight", "bias"):
                value = state[f"{src}{old}.{leaf}"]
                if i == layers:
                    value = torch.randn(value.shape, generator=generator)
                out[f"{dst}{new}.{leaf}"] = value
        for leaf in ("weight", "bias"):
            qkv = torch.cat([state[f"{src}self_attn.{p}.{leaf}"] for p in ("q_proj", "k_proj", "v_proj")])
            out[f"{dst}attn.in_proj_{leaf}"] = torch.randn(qkv.shape, generator=generator) if i == layers else qkv
    return out


def export_single_file(folder: Path, family: str) -> dict[str, torch.Tensor]:
    """The folder's weights in the LDM layout (SDXL's as A1111 and ComfyUI keep them: conditioner.embedders.0 is
    CLIP-L in transformers' layout, conditioner.embedders.1 OpenCLIP-bigG's)."""
    folder = Path(folder)
    unet = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    vae = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
    text = load_file(folder / "text_encoder" / "model.safetensors")
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    if family == "sdxl":
        second = load_file(folder / "text_encoder_2" / "model.safetensors")
        words = {
            "conditioner.embedders.0.transformer.text_model." + k.removeprefix("text_model."): v
            for k, v in text.items()
        }
        words.update(openclip_to_ldm(second, "conditioner.embedders.1.model.", extra_layer=False))
    else:
        words = text_to_ldm(text, family)
    state = {**unet_to_ldm(unet, unet_config), **vae_to_ldm(vae, vae_config), **words}
    return {k: v.contiguous() for k, v in state.items()}
