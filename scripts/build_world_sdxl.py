"""Build the SDXL variant of tistudio's demo world model: SDXL's architecture (two text encoders, both read at the
layer before the last, the second's projection of its end-of-text position as the pooled vector, a "text_time"
UNet conditioned on the pooled vector and the six size numbers) trained on the same synthetic world, so that
SDXL embeddings can be shown to learn the person as the SD1 demo does.

    python scripts/build_world_sdxl.py [--out src/tistudio/data/world-sdxl] [--minutes 40] [--seed 0]

It starts from the SD1 world model shipped in the package (scripts/build_world_model.py): its VAE and trait reader
are kept as they are (the same 64 px pictures and 16x16x4 latents), its UNet's weights start the SDXL UNet wherever
the shapes agree (the cross-attention keys and values start with clip_l's columns copied and clip_g's at zero, the
added size/pooled embedding starts at zero, so the start draws what the SD1 world draws), and its text encoder
starts clip_l. clip_g (wider, as bigG is wider than ViT-L) starts from seeded random weights. Then the UNet and both
encoders train together for --minutes with the SD1 recipe (half of each batch at high noise, 10% empty captions,
EMA). Writes world-model.safetensors (float16; only the token rows the captions use, per encoder) and
world-model.json (configs, build settings, measurements). The held-out person is never drawn or captioned here.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

import build_world_model as sd1  # noqa: E402

from tistudio.demo import world  # noqa: E402
from tistudio.models.families import OPENCLIP_PAD  # noqa: E402
from tistudio.models.tokenizer import load_tokenizer  # noqa: E402

TEXT_L = dict(sd1.TEXT)  # clip_l: the SD1 world's text encoder's shape (and its weights, to start)
TEXT_G = {
    **sd1.TEXT,
    "hidden_size": 192,
    "intermediate_size": 768,
    "num_attention_heads": 3,
    "projection_dim": 192,
    "hidden_act": "gelu",
}
TIME_WIDTH = 16
UNET = {
    **sd1.UNET,
    "cross_attention_dim": TEXT_L["hidden_size"] + TEXT_G["hidden_size"],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": TIME_WIDTH,
    "projection_class_embeddings_input_dim": 6 * TIME_WIDTH + TEXT_G["projection_dim"],
}
SIZE_IDS = (64.0, 64.0, 0.0, 0.0, 64.0, 64.0)  # every world picture: drawn at 64 px, uncropped, trained at 64 px
TOKEN_SEEDS = {"l": 7, "g": 17}  # seeds of the token tables' unused rows (clip_l's is the SD1 world's)


class Texts(torch.nn.Module):
    """clip_l and clip_g as SDXL reads them: the context is both encoders' hidden states before their last layer,
    side by side; the pooled vector is clip_g's projection at the end-of-text position."""

    def __init__(self, first, second) -> None:
        super().__init__()
        self.first, self.second = first, second
        self.tokenizers = (load_tokenizer(), load_tokenizer(OPENCLIP_PAD))

    def ids(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(
            t(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            for t in self.tokenizers
        )

    def forward(self, ids_l: torch.Tensor, ids_g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_l = self.first(ids_l, output_hidden_states=True).hidden_states[-2]
        out_g = self.second(ids_g, output_hidden_states=True)
        return torch.cat([hidden_l, out_g.hidden_states[-2]], dim=-1), out_g.text_embeds


def added(pooled: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"text_embeds": pooled, "time_ids": torch.tensor([SIZE_IDS]).expand(len(pooled), 6)}


def start_from_sd1(seed: int):
    """The SDXL world's modules, started from the shipped SD1 world (see the module's docstring)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from tistudio.models.builtin import world_files

    vae, old_unet, old_text = sd1.load_built(world_files()[0].parent)
    first = CLIPTextModel(CLIPTextConfig(**TEXT_L))
    first.load_state_dict(old_text.state_dict())
    torch.manual_seed(seed + 3)
    second = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_G))
    with torch.no_grad():
        table = torch.randn((49408, TEXT_G["hidden_size"]), generator=torch.Generator().manual_seed(TOKEN_SEEDS["g"]))
        second.get_input_embeddings().weight.copy_(table * sd1.TOKEN_STD)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**UNET)
    old = old_unet.state_dict()
    state = unet.state_dict()
    width_l = TEXT_L["hidden_size"]
    with torch.no_grad():
        for name, value in state.items():
            source = old.get(name)
            if source is None:
                if name.startswith("add_embedding.linear_2"):
                    value.zero_()  # the size/pooled embedding adds nothing at the start
                continue
            if source.shape == value.shape:
                value.copy_(source)
            elif name.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
                value.zero_()
                value[:, :width_l] = source  # clip_l's columns as in the SD1 world, clip_g's at zero
            elif source.dim() == 4 and value.dim() == 2:  # 1x1 conv projections -> linear (use_linear_projection)
                value.copy_(source[:, :, 0, 0])
            else:
                raise ValueError(f"cannot start {name}: {tuple(source.shape)} -> {tuple(value.shape)}")
    unet.load_state_dict(state)
    return vae, unet, Texts(first, second)


def train_denoiser(latents: torch.Tensor, captions: list[str], unet, texts: Texts, seconds: float, seed: int):
    from diffusers import DDPMScheduler

    from tistudio.models.loading import scheduler_config

    ids_l, ids_g = texts.ids([*captions, ""])
    empty = (ids_l[-1], ids_g[-1])
    ids_l, ids_g = ids_l[:-1], ids_g[:-1]
    used = {
        "l": torch.unique(torch.cat([ids_l.flatten(), empty[0]])),
        "g": torch.unique(torch.cat([ids_g.flatten(), empty[1]])),
    }
    tables = [texts.first.get_input_embeddings().weight, texts.second.get_input_embeddings().weight]
    rest = [p for p in texts.parameters() if all(p is not t for t in tables)]
    groups = [
        {"params": list(unet.parameters()), "lr": 3e-4},
        {"params": rest, "lr": 3e-4},
        {"params": tables, "lr": 2e-3},
    ]
    bases = [g["lr"] for g in groups]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    named = list(unet.named_parameters()) + [("text." + n, p) for n, p in texts.named_parameters()]
    ema = {name: p.detach().clone() for name, p in named}
    alphas = DDPMScheduler.from_config(scheduler_config("epsilon")).alphas_cumprod
    generator = torch.Generator().manual_seed(seed + 1)
    started, step, batch, losses = time.monotonic(), 0, 24, []
    while time.monotonic() - started < seconds:
        fraction = (time.monotonic() - started) / seconds
        for group, base in zip(optimizer.param_groups, bases, strict=True):
            group["lr"] = base * min(1.0, step / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(fraction, 1))))
        index = torch.randint(0, len(latents), (batch,), generator=generator)
        tokens_l, tokens_g = ids_l[index].clone(), ids_g[index].clone()
        drop = torch.rand(batch, generator=generator) < 0.1
        tokens_l[drop], tokens_g[drop] = empty
        t = torch.where(
            torch.arange(batch) < batch // 2,
            torch.randint(600, 1000, (batch,), generator=generator),
            torch.randint(0, 1000, (batch,), generator=generator),
        )
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        context, pooled = texts(tokens_l, tokens_g)
        predicted = unet(
            a.sqrt() * x0 + (1 - a).sqrt() * noise, t, encoder_hidden_states=context, added_cond_kwargs=added(pooled)
        ).sample
        loss = F.mse_loss(predicted, noise)
        step = sd1.ema_step(optimizer, loss, step, named, ema)
        losses.append(loss.item())
        if step % 200 == 0:
            sd1.log(f"denoiser step {step}: loss {sum(losses[-200:]) / 200:.4f}")
    with torch.no_grad():
        for name, p in named:
            p.copy_(ema[name])
    return unet.eval().requires_grad_(False), texts.eval().requires_grad_(False), used, step


@torch.no_grad()
def samples_show_person(vae, unet, texts: Texts, reader, scaling: float, seed: int) -> dict:
    """How often DDIM samples (25 steps) of captions of random people show the described person, as the reader
    reads them (the SD1 build's measure)."""
    from diffusers import DDIMScheduler

    from tistudio.models.loading import scheduler_config

    rng = random.Random(seed + 11)
    people = [world.random_person(rng, allow_held_out=True) for _ in range(64)]
    prompts = [world.caption(p, world.random_scene(rng)) for p in people]
    cond, pooled = texts(*texts.ids(prompts))
    uncond, pooled_empty = texts(*texts.ids([""] * len(prompts)))
    out = {}
    scheduler = DDIMScheduler.from_config(scheduler_config("epsilon"))
    for cfg in (1.0, 4.0):
        scheduler.set_timesteps(25)
        x = torch.randn((len(prompts), 4, 16, 16), generator=torch.Generator().manual_seed(seed))
        for t in scheduler.timesteps:
            both = unet(
                torch.cat([x, x]),
                t,
                encoder_hidden_states=torch.cat([uncond, cond]),
                added_cond_kwargs=added(torch.cat([pooled_empty, pooled])),
            ).sample
            eps = both[: len(x)] + cfg * (both[len(x) :] - both[: len(x)])
            x = scheduler.step(eps, t, x).prev_sample
        images = vae.decode(x / scaling).sample.clamp(-1, 1)
        logits = reader(images)
        out[f"samples_show_described_person_cfg{cfg:g}"] = sum(
            world.decode_traits(logits, i) == p for i, p in enumerate(people)
        ) / len(people)
    return out


def save(out: Path, vae, unet, texts: Texts, used: dict[str, torch.Tensor], meta: dict) -> None:
    from safetensors.torch import load_file, save_file

    from tistudio.models.builtin import world_files

    tensors = {k: v for k, v in load_file(str(world_files()[0])).items() if k.startswith(("vae.", "reader."))}
    for name, value in unet.state_dict().items():
        tensors["unet." + name] = value.detach().to(torch.float16).contiguous()
    for key, module in (("l", texts.first), ("g", texts.second)):
        for name, value in module.state_dict().items():
            if name.endswith("token_embedding.weight"):
                tensors[f"text_{key}_token_rows"] = value[used[key]].to(torch.float16).contiguous()
                tensors[f"text_{key}_token_ids"] = used[key].to(torch.int32)
            elif not name.endswith("position_ids"):
                tensors[f"text_{key}." + name] = value.detach().to(torch.float16).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "world-model.safetensors"))
    (out / "world-model.json").write_text(json.dumps(meta, indent=2) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "src" / "tistudio" / "data" / "world-sdxl")
    parser.add_argument(
        "--minutes", type=float, default=40.0, help="training time of the denoiser (default: %(default)s)"
    )
    parser.add_argument("--samples", type=int, default=40000, help="pictures drawn for the UNet")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.monotonic()
    from safetensors.torch import load_file

    from tistudio.models.builtin import world_files

    base_meta = json.loads(world_files()[1].read_text())
    scaling = base_meta["vae"]["scaling_factor"]
    vae, unet, texts = start_from_sd1(args.seed)
    reader = world.trait_reader_module()
    reader.load_state_dict(
        {k[len("reader.") :]: v.float() for k, v in load_file(str(world_files()[0])).items() if k.startswith("reader.")}
    )
    reader.eval().requires_grad_(False)
    sd1.log(f"drawing {args.samples} pictures of the world (the held-out person excluded)")
    pixels, captions, _ = sd1.make_data(args.samples, args.seed)
    latents = sd1.encode(vae, pixels) * scaling
    del pixels
    start_measured = samples_show_person(vae, unet, texts, reader, scaling, args.seed)
    sd1.log(f"at the start: {json.dumps(start_measured)}")
    sd1.log("training the UNet and both text encoders")
    unet, texts, used, steps = train_denoiser(latents, captions, unet, texts, args.minutes * 60, args.seed)
    sd1.log("measuring")
    measured = samples_show_person(vae, unet, texts, reader, scaling, args.seed)
    sd1.log(json.dumps(measured))
    meta = {
        "version": 1,
        "family": "sdxl",
        "text_l": TEXT_L,
        "text_g": TEXT_G,
        "unet": UNET,
        "vae": base_meta["vae"],
        "token_tables": {
            k: {"seed": TOKEN_SEEDS[k], "std": sd1.TOKEN_STD, "rows_used": int(used[k].numel())} for k in ("l", "g")
        },
        "held_out": world.HELD_OUT.traits(),
        "build": {
            "seed": args.seed,
            "minutes": args.minutes,
            "samples": args.samples,
            "denoiser_steps": steps,
            "started_from": {"sd1_world_build": base_meta["build"]},
            "wall_minutes": round((time.monotonic() - started) / 60, 1),
            "torch": torch.__version__,
        },
        "measured_at_start": start_measured,
        "measured": measured,
    }
    save(args.out, vae, unet, texts, used, meta)
    sd1.log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
