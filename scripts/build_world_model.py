"""Build tistudio's demo world model: a small Stable-Diffusion-architecture model trained on the synthetic world
(tistudio/demo/world.py) so that text truly controls its pictures, plus the trait reader that measures them.

    python scripts/build_world_model.py [--out src/tistudio/data/world] [--minutes 55] [--seed 0]

On 2 CPU cores it takes about the given minutes (55 by default: the VAE, then the UNet with the text encoder,
then the reader) and writes:
  world-model.safetensors   the weights, float16, with only the token-table rows the world's captions use
  world-model.json          the configs, the build settings and the measurements below
tistudio expands them into a diffusers folder the first time the demo needs it (models/loading.py loads that folder like
any checkpoint). The held-out person (world.HELD_OUT) is never drawn and never captioned here.

Architecture: AutoencoderKL (3 levels, 64 px <-> 16x16x4 latents), UNet2DConditionModel (3 levels, 48/96/96
channels, cross-attention at 8x8 and 4x4), CLIPTextModel (128 wide, 3 layers) with the real 49,408-token
vocabulary. Training recipe from ../shared/reference/synthetic-world-notes.md: the text encoder trains with the
UNet, half of each batch at high noise (t >= 600), 10% empty captions, EMA of the weights.
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

from tistudio.demo import world  # noqa: E402
from tistudio.models.tokenizer import load_tokenizer  # noqa: E402

TEXT = {
    "vocab_size": 49408,
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "max_position_embeddings": 77,
    "projection_dim": 128,
    "hidden_act": "quick_gelu",
    "bos_token_id": 0,
    "pad_token_id": 1,
    "eos_token_id": 2,
}
UNET = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": [48, 96, 96],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 128,
    "attention_head_dim": 4,
    "norm_num_groups": 16,
}
VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": [16, 32, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "norm_num_groups": 16,
    "sample_size": 64,
}
TOKEN_STD = 0.02


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def update(optimizer: torch.optim.Optimizer, loss: torch.Tensor, step: int, what: str) -> int:
    """One optimizer step on `loss`; logs every 200 steps; returns the new step count."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if (step + 1) % 200 == 0:
        log(f"{what} step {step + 1}: loss {loss.item():.4f}")
    return step + 1


def ema_step(
    optimizer: torch.optim.Optimizer,
    loss: torch.Tensor,
    step: int,
    named: list[tuple[str, torch.nn.Parameter]],
    ema: dict[str, torch.Tensor],
) -> int:
    """One optimizer step on `loss` (gradients clipped to norm 1), then the EMA of the `named` weights moved
    towards them; returns the new step count."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
    optimizer.step()
    step += 1
    decay = min(0.999, (1 + step) / (10 + step))
    with torch.no_grad():
        for name, p in named:
            ema[name].lerp_(p.detach(), 1 - decay)
    return step


def make_data(count: int, seed: int) -> tuple[torch.Tensor, list[str], list[world.Person]]:
    rng = random.Random(seed)
    images, captions, people = [], [], []
    for _ in range(count):
        image, text, person, _ = world.sample(rng)
        images.append(image)
        captions.append(text)
        people.append(person)
    return world.to_tensor(images), captions, people


def train_vae(pixels: torch.Tensor, seconds: float, seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    started, step = time.monotonic(), 0
    while time.monotonic() - started < seconds:
        batch = pixels[torch.randint(0, len(pixels), (16,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(reconstruction, batch) + 0.5 * F.mse_loss(reconstruction, batch) + 1e-6 * posterior.kl().mean()
        step = update(optimizer, loss, step, "vae")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        sample = pixels[:256]
        reconstruction = vae.decode(vae.encode(sample).latent_dist.mean).sample.clamp(-1, 1)
        mse = F.mse_loss((reconstruction + 1) / 2, (sample + 1) / 2).item()
    return vae, step, 10 * math.log10(1 / mse)


@torch.no_grad()
def encode(vae, pixels: torch.Tensor) -> torch.Tensor:
    return torch.cat([vae.encode(pixels[i : i + 256]).latent_dist.mean for i in range(0, len(pixels), 256)])


def train_denoiser(latents: torch.Tensor, captions: list[str], seconds: float, seed: int):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tistudio.models.loading import scheduler_config

    tokenizer = load_tokenizer()
    torch.manual_seed(seed)
    text = CLIPTextModel(CLIPTextConfig(**TEXT))
    with torch.no_grad():  # a seeded table, so the rows the world never uses can be rebuilt exactly later
        table = torch.randn((49408, TEXT["hidden_size"]), generator=torch.Generator().manual_seed(seed + 7))
        text.get_input_embeddings().weight.copy_(table * TOKEN_STD)
    unet = UNet2DConditionModel(**UNET)
    ids = tokenizer(
        [*captions, ""], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    empty = ids[-1]
    ids = ids[:-1]
    used = torch.unique(torch.cat([ids.flatten(), empty]))
    parameters = [
        {"params": list(unet.parameters()), "lr": 4e-4},
        {"params": [p for n, p in text.named_parameters() if "token_embedding" not in n], "lr": 4e-4},
        {"params": [text.get_input_embeddings().weight], "lr": 2e-3},
    ]
    optimizer = torch.optim.AdamW(parameters, weight_decay=0.0)
    named = list(unet.named_parameters()) + [("text." + n, p) for n, p in text.named_parameters()]
    ema = {name: p.detach().clone() for name, p in named}
    alphas = DDPMScheduler.from_config(scheduler_config("epsilon")).alphas_cumprod
    generator = torch.Generator().manual_seed(seed + 1)
    started, step, batch = time.monotonic(), 0, 24
    losses = []
    while time.monotonic() - started < seconds:
        fraction = (time.monotonic() - started) / seconds
        for group, base in zip(optimizer.param_groups, (4e-4, 4e-4, 2e-3), strict=True):
            warm = min(1.0, step / 200)
            group["lr"] = base * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(fraction, 1.0))))
        index = torch.randint(0, len(latents), (batch,), generator=generator)
        x0 = latents[index]
        token_ids = ids[index].clone()
        drop = torch.rand(batch, generator=generator) < 0.1
        token_ids[drop] = empty
        t = torch.where(
            torch.arange(batch) < batch // 2,
            torch.randint(600, 1000, (batch,), generator=generator),
            torch.randint(0, 1000, (batch,), generator=generator),
        )
        noise = torch.randn(x0.shape, generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        hidden = text(token_ids).last_hidden_state
        loss = F.mse_loss(unet(noisy, t, encoder_hidden_states=hidden).sample, noise)
        step = ema_step(optimizer, loss, step, named, ema)
        losses.append(loss.item())
        if step % 200 == 0:
            log(f"denoiser step {step}: loss {sum(losses[-200:]) / 200:.4f}")
    with torch.no_grad():
        for name, p in unet.named_parameters():
            p.copy_(ema[name])
        for name, p in text.named_parameters():
            p.copy_(ema["text." + name])
    return unet.eval().requires_grad_(False), text.eval().requires_grad_(False), used, step


def model_like(pixels, captions, vae, unet, text, scaling, generator):
    """Pictures as the model would draw them: the render, noised to a random timestep and denoised in one step by
    the UNet with the right caption, then decoded. Blurrier where the model is unsure - like its samples."""
    from diffusers import DDPMScheduler

    from tistudio.models.loading import scheduler_config

    tokenizer = load_tokenizer()
    alphas = DDPMScheduler.from_config(scheduler_config("epsilon")).alphas_cumprod
    x0 = vae.encode(pixels).latent_dist.mean * scaling
    t = torch.randint(100, 700, (len(pixels),), generator=generator)
    a = alphas[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=generator)
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    eps = unet(noisy, t, encoder_hidden_states=text(ids).last_hidden_state).sample
    estimate = (noisy - (1 - a).sqrt() * eps) / a.sqrt()
    return vae.decode(estimate / scaling).sample.clamp(-1, 1)


def train_reader(vae, seconds: float, seed: int, unet=None, text=None, scaling: float = 1.0):
    reader = world.trait_reader_module()
    optimizer = torch.optim.AdamW(reader.parameters(), lr=2e-3, weight_decay=1e-4)
    rng = random.Random(seed + 3)
    generator = torch.Generator().manual_seed(seed + 3)
    started, step = time.monotonic(), 0
    while time.monotonic() - started < seconds:
        people = [world.random_person(rng, allow_held_out=True) for _ in range(36)]
        scenes = [world.random_scene(rng) for _ in people]
        pixels = world.to_tensor([world.render(p, s) for p, s in zip(people, scenes, strict=True)])
        with torch.no_grad():  # a third through the VAE with noisy latents, a third as the model would draw them
            latents = vae.encode(pixels[12:24]).latent_dist.mean
            latents = latents + torch.rand((12, 1, 1, 1), generator=generator) * 0.6 * latents.std() * torch.randn(
                latents.shape, generator=generator
            )
            pixels[12:24] = vae.decode(latents).sample.clamp(-1, 1)
            if unet is not None:
                captions = [world.caption(p, s) for p, s in zip(people[24:], scenes[24:], strict=True)]
                pixels[24:] = model_like(pixels[24:], captions, vae, unet, text, scaling, generator)
            blur = torch.rand(36, generator=generator) < 0.3
            if blur.any():
                kernel = torch.tensor([1.0, 2.0, 1.0])
                kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
                pixels[blur] = F.conv2d(F.pad(pixels[blur], (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
            pixels = pixels + 0.06 * torch.randn(pixels.shape, generator=generator) * torch.rand(
                (36, 1, 1, 1), generator=generator
            )
            pixels = pixels * (1 + 0.2 * (torch.rand((36, 3, 1, 1), generator=generator) - 0.5))
        targets = world.trait_targets(people)
        logits = reader(pixels)
        loss = sum(F.cross_entropy(logits[name], targets[name]) for name in world.TRAIT_NAMES)
        step = update(optimizer, loss, step, "reader")
    return reader.eval().requires_grad_(False), step


@torch.no_grad()
def evaluate(vae, unet, text, reader, scaling: float, seed: int) -> dict:
    """Reader accuracy on renders and VAE reconstructions; how often samples show the described person."""
    from diffusers import DDIMScheduler

    from tistudio.models.loading import scheduler_config

    rng = random.Random(seed + 11)
    people = [world.random_person(rng, allow_held_out=True) for _ in range(200)]
    scenes = [world.random_scene(rng) for _ in people]
    pixels = world.to_tensor([world.render(p, s) for p, s in zip(people, scenes, strict=True)])
    recon = vae.decode(vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1)

    def identity_rate(images: torch.Tensor, expected: list[world.Person]) -> float:
        logits = reader(images)
        return sum(world.decode_traits(logits, i) == p for i, p in enumerate(expected)) / len(expected)

    out = {"reader_on_renders": identity_rate(pixels, people), "reader_on_vae": identity_rate(recon, people)}
    tokenizer = load_tokenizer()
    scheduler = DDIMScheduler.from_config(scheduler_config("epsilon"))
    for cfg in (1.0, 4.0):
        prompts = [world.caption(p, s) for p, s in zip(people[:64], scenes[:64], strict=True)]
        images = sample_images(unet, text, vae, tokenizer, scheduler, prompts, cfg, scaling, seed)
        out[f"samples_show_described_person_cfg{cfg:g}"] = identity_rate(images, people[:64])
    return out


def sample_images(unet, text, vae, tokenizer, scheduler, prompts, cfg, scaling, seed, steps=25):
    ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    cond = text(ids).last_hidden_state
    uncond = text(
        tokenizer([""] * len(prompts), padding="max_length", max_length=77, return_tensors="pt").input_ids
    ).last_hidden_state
    scheduler.set_timesteps(steps)
    x = torch.randn((len(prompts), 4, 16, 16), generator=torch.Generator().manual_seed(seed))
    for t in scheduler.timesteps:
        if cfg == 1.0:
            eps = unet(x, t, encoder_hidden_states=cond).sample
        else:
            both = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
            eps = both[: len(prompts)] + cfg * (both[len(prompts) :] - both[: len(prompts)])
        x = scheduler.step(eps, t, x).prev_sample
    return vae.decode(x / scaling).sample.clamp(-1, 1)


def save(out: Path, vae, unet, text, reader, used: torch.Tensor, meta: dict) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for prefix, module in (("vae.", vae), ("unet.", unet), ("reader.", reader)):
        for name, value in module.state_dict().items():
            tensors[prefix + name] = value.detach().to(torch.float16).contiguous()
    for name, value in text.state_dict().items():
        if name.endswith("token_embedding.weight"):
            tensors["text_token_rows"] = value[used].to(torch.float16).contiguous()
            tensors["text_token_ids"] = used.to(torch.int32)
        elif not name.endswith("position_ids"):
            tensors["text." + name] = value.detach().to(torch.float16).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "world-model.safetensors"))
    (out / "world-model.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_built(folder: Path):
    """The VAE, UNet and text encoder of a built world model (expanded like tistudio does)."""
    import tempfile

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    import tistudio.models.builtin as tiny

    original = tiny.world_files
    tiny.world_files = lambda family="sd1": (folder / "world-model.safetensors", folder / "world-model.json")
    try:
        with tempfile.TemporaryDirectory() as work:
            expanded = tiny.expand_world_model(Path(work) / "model")
            vae = AutoencoderKL.from_pretrained(expanded / "vae").eval().requires_grad_(False)
            unet = UNet2DConditionModel.from_pretrained(expanded / "unet").eval().requires_grad_(False)
            text = CLIPTextModel.from_pretrained(expanded / "text_encoder").eval().requires_grad_(False)
    finally:
        tiny.world_files = original
    return vae, unet, text


def reader_only(args) -> int:
    from safetensors.torch import load_file, save_file

    vae, unet, text = load_built(args.out)
    meta = json.loads((args.out / "world-model.json").read_text())
    scaling = meta["vae"]["scaling_factor"]
    log("training the trait reader")
    reader, steps = train_reader(vae, args.minutes * 60, args.seed, unet, text, scaling)
    log("measuring")
    measured = evaluate(vae, unet, text, reader, scaling, args.seed)
    log(json.dumps(measured))
    tensors = {
        k: v for k, v in load_file(str(args.out / "world-model.safetensors")).items() if not k.startswith("reader.")
    }
    for name, value in reader.state_dict().items():
        tensors["reader." + name] = value.detach().to(torch.float16).contiguous()
    save_file(tensors, str(args.out / "world-model.safetensors"))
    meta["build"]["reader_steps"] = steps
    meta["build"]["reader_minutes"] = args.minutes
    meta["measured"] = measured
    (args.out / "world-model.json").write_text(json.dumps(meta, indent=2) + "\n")
    log(f"wrote {args.out}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "src" / "tistudio" / "data" / "world")
    parser.add_argument("--minutes", type=float, default=55.0, help="total training time (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=40000, help="pictures drawn for the VAE and the UNet")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--reader-only",
        action="store_true",
        help="keep the model in --out and train only a new trait reader (--minutes of it)",
    )
    args = parser.parse_args()
    if args.reader_only:
        return reader_only(args)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    budget = args.minutes * 60
    started = time.monotonic()
    log(f"drawing {args.samples} pictures of the world (the held-out person excluded)")
    pixels, captions, _ = make_data(args.samples, args.seed)
    log("training the VAE")
    vae, vae_steps, psnr = train_vae(pixels, 0.18 * budget, args.seed)
    log(f"VAE: {vae_steps} steps, reconstruction PSNR {psnr:.1f} dB; encoding the latents")
    latents = encode(vae, pixels)
    scaling = float(1.0 / latents.std())
    latents = latents * scaling
    log("training the UNet and the text encoder")
    unet, text, used, denoiser_steps = train_denoiser(latents, captions, 0.72 * budget, args.seed)
    log("training the trait reader")
    reader, reader_steps = train_reader(vae, 0.08 * budget, args.seed, unet, text, scaling)
    log("measuring")
    measured = evaluate(vae, unet, text, reader, scaling, args.seed)
    log(json.dumps(measured))
    meta = {
        "version": 1,
        "text": TEXT,
        "unet": UNET,
        "vae": {**VAE, "scaling_factor": scaling},
        "token_table": {"seed": args.seed + 7, "std": TOKEN_STD, "rows_used": int(used.numel())},
        "held_out": world.HELD_OUT.traits(),
        "build": {
            "seed": args.seed,
            "minutes": args.minutes,
            "samples": args.samples,
            "vae_steps": vae_steps,
            "denoiser_steps": denoiser_steps,
            "reader_steps": reader_steps,
            "vae_psnr_db": round(psnr, 2),
            "wall_minutes": round((time.monotonic() - started) / 60, 1),
            "torch": torch.__version__,
        },
        "measured": measured,
    }
    save(args.out, vae, unet, text, reader, used, meta)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
