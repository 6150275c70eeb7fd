"""LoRA: a low-rank change of a model's linear and convolution layers, named the way kohya's files name them.

A LoRA layer changes a weight W by ``scale * up @ down`` (scale = alpha / rank): ``down`` is [rank, in] (a Conv2d's
[rank, in, kh, kw]) and ``up`` [out, rank] ([out, rank, 1, 1]). Files name each layer after the model's module path
in diffusers' layout with the dots made underscores, after ``lora_unet_`` for the UNet
(``lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q``) and ``lora_te_`` for the text encoder
(``lora_te1_`` and ``lora_te2_`` for SDXL's two, from the families table). That is the layout kohya writes for SD1
and SD2, and the one A1111 (networks.py converts it to its own module names), ComfyUI (comfy/lora.py maps diffusers
names) and diffusers (its kohya converter) all read. kohya's SDXL files use the original UNet's block names
(``lora_unet_input_blocks_4_1_...``); :func:`layer_of` reads those too.

Training adds the change with forward hooks on Parameters (:class:`Hooked`); generation merges it into the weights
and restores them after (:func:`merged`), as A1111 does.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

UNET = "lora_unet"
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
# Which UNet layers a trained LoRA changes, by name: the attention projections (self- and cross-attention: the
# default, as diffusers' and kohya's LoRA trainers do), or the cross-attention's alone (where the prompt enters).
TARGETS: dict[str, tuple[str, ...]] = {
    "attention": tuple(f"{attn}.{proj}" for attn in ("attn1", "attn2") for proj in PROJECTIONS),
    "cross-attention": tuple(f"attn2.{proj}" for proj in PROJECTIONS),
    "prompt": ("attn2.to_k", "attn2.to_v"),  # only the layers that read the prompt: its tokens' keys and values
}
_SGM_INPUT = re.compile(r"lora_unet_input_blocks_(\d+)_1_(.+)")
_SGM_MIDDLE = re.compile(r"lora_unet_middle_block_1_(.+)")
_SGM_OUTPUT = re.compile(r"lora_unet_output_blocks_(\d+)_1_(.+)")


def kohya_name(prefix: str, module_path: str) -> str:
    """'lora_unet' + 'down_blocks.1.attentions.0.proj_in' -> 'lora_unet_down_blocks_1_attentions_0_proj_in'."""
    return f"{prefix}_{module_path.replace('.', '_')}"


def changeable(module: Any) -> bool:
    return isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))


def model_layers(model: Any) -> dict[str, torch.nn.Module]:
    """Every layer of the model a LoRA file can change, by its name in the file (UNet and text encoders)."""
    layers = {kohya_name(UNET, path): module for path, module in model.unet.named_modules() if changeable(module)}
    for part in model.text.values():
        for path, module in part.module.named_modules():
            if changeable(module):
                layers[kohya_name(part.slot.lora_prefix, path)] = module
    return layers


def target_layers(unet: Any, targets: str) -> dict[str, torch.nn.Linear]:
    """The UNet layers a trained LoRA changes (TARGETS[targets]), by their names in the file, in the UNet's order."""
    ends = TARGETS[targets]
    return {
        kohya_name(UNET, path): module
        for path, module in unet.named_modules()
        if isinstance(module, torch.nn.Linear) and path.endswith(ends) and ".transformer_blocks." in f".{path}"
    }


def diffusers_name(name: str) -> str:
    """A kohya SDXL name in the original UNet's block layout as the diffusers-layout name (the transformer blocks:
    input_blocks.N.1 is down_blocks[(N-1)//3].attentions[(N-1)%3], output_blocks.N.1 up_blocks[N//3]...); others
    are returned as they are."""
    if match := _SGM_INPUT.fullmatch(name):
        block = int(match.group(1)) - 1
        return f"lora_unet_down_blocks_{block // 3}_attentions_{block % 3}_{match.group(2)}"
    if match := _SGM_MIDDLE.fullmatch(name):
        return f"lora_unet_mid_block_attentions_0_{match.group(1)}"
    if match := _SGM_OUTPUT.fullmatch(name):
        block = int(match.group(1))
        return f"lora_unet_up_blocks_{block // 3}_attentions_{block % 3}_{match.group(2)}"
    return name


def layer_of(name: str, layers: Mapping[str, torch.nn.Module]) -> str | None:
    """The model layer a file's layer name changes (its name in `layers`), or None where the model has none."""
    if name in layers:
        return name
    converted = diffusers_name(name)
    return converted if converted in layers else None


@dataclass(frozen=True)
class LoraLayer:
    """One layer's low-rank change: W += scale * up @ down, scale = alpha / rank."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, shape: torch.Size) -> torch.Tensor:
        """The change of a weight of `shape` (float32): Linear [out, in], Conv2d [out, in, kh, kw]."""
        down, up = self.down.to(torch.float32), self.up.to(torch.float32)
        if len(shape) == 4 and down.dim() == 4 and down.shape[2:] != (1, 1):  # a kxk down after a 1x1 up
            change = torch.einsum("or,rihw->oihw", up.flatten(1), down)
        else:
            change = (up.flatten(1) @ down.flatten(1)).reshape(shape)
        return change * self.scale


@contextmanager
def merged(model: Any, networks: Sequence[tuple[Mapping[str, LoraLayer], float]]) -> Iterator[None]:
    """While inside: each network's layers (by model layer name, see layer_of) merged into the model's weights at
    its weight (A1111's multiplier). The weights are restored exactly after."""
    layers = model_layers(model)
    kept: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for network, weight in networks:
                for name, layer in network.items():
                    module = layers[name]
                    if name not in kept:
                        kept[name] = module.weight.detach().clone()
                    change = layer.delta(module.weight.shape).to(module.weight.device) * weight
                    module.weight.add_(change.to(module.weight.dtype))
        yield
    finally:
        with torch.no_grad():
            for name, weight in kept.items():
                layers[name].weight.copy_(weight)


class Hooked:
    """Trainable LoRA layers added to Linear modules by forward hooks: output + scale * up(down(x)). The tensors are
    the caller's (Parameters); `scale` is alpha / rank."""

    def __init__(
        self, modules: Mapping[str, torch.nn.Module], tensors: Mapping[str, torch.Tensor], scale: float
    ) -> None:
        self.handles = []
        for name, module in modules.items():
            down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
            self.handles.append(module.register_forward_hook(self._hook(down, up, scale)))

    @staticmethod
    def _hook(down: torch.Tensor, up: torch.Tensor, scale: float) -> Any:
        def add(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            x = inputs[0]
            change = torch.nn.functional.linear(torch.nn.functional.linear(x, down.to(x.dtype)), up.to(x.dtype))
            return output + change * scale

        return add

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
