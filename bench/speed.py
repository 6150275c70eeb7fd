"""Training and generation speed and peak memory of tistudio, optionally side by side with diffusers' textual-
inversion example on the same model folder and settings.

    python bench/speed.py --model tiny                                   # seconds: a smoke run
    python bench/speed.py --model sd15 --size 256 --steps 4              # full-size SD1.5 architecture, random
    python bench/speed.py --model sd15 --size 256 --peer PATH/textual_inversion.py --generate
    python bench/speed.py --model sd15 --size 512 --batch 1,4,8 --device cuda --precision bf16 --peer ...
    python bench/speed.py --model sdxl --size 512 --steps 2 --warmup 1 --checkpointing   # SDXL, on a CPU
    python bench/speed.py --model sdxl --size 1024 --device cuda --precision bf16 --processes 1,2,8   # scaling
    python bench/speed.py --model sd15 --size 256 --lora-ranks 0,8        # pivotal tuning's step against the word's
    python bench/speed.py --model sd15 --size 256 --buckets off,on        # squares against aspect-ratio buckets

--model is `tiny` (the tests' random tiny model), `sd15` (Stable Diffusion 1.5's full architecture with seeded random
weights, built once into the cache: about 4.3 GB; honest for speed and memory, never for pictures), `sdxl` (SDXL
base's full architecture, the same way: about 13.9 GB), or a diffusers folder. --peer is the path of diffusers'
examples/textual_inversion/textual_inversion.py (textual_inversion_sdxl.py with --model sdxl), supplied by whoever
runs the benchmark (never part of tistudio); it runs on the same folder with the same resolution, batch, precision,
vectors and steps, no validation images, gradient accumulation 1. If torchvision is not installed (tistudio keeps
it out), stand-ins for the few transforms the examples use are put on its path. --generate's diffusers side is a
plain StableDiffusionPipeline (SD 1.x/2.x folders).

Every contender runs in a fresh process, so its peak memory (max RSS; CUDA max allocated on a GPU) is its own.
Speed comes from the optimizer's steps, seen by a global optimizer step hook: steps/s = N / (time from the end of
warm-up step W to the end of step W+N); loading, latent caching and start-up are outside it. Generation: images/s
after one warm-up image, same sampler (DDIM), steps and guidance for tistudio and a plain StableDiffusionPipeline.
--processes 1,2,N runs tistudio data-parallel under torchrun (one process per GPU; gloo on a CPU) with --batch per
process: samples/s counts every process's samples, and the table gives each count's scaling against one process
(samples/s at N / (N x samples/s at 1)).
Prints a table, then JSON (also written to --json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = "BENCH-RESULT "
SHIM = '''"""Stand-ins for the torchvision.transforms the diffusers examples use (by tistudio's bench/speed.py)."""
import random

from PIL import Image

from . import functional  # noqa: F401


class RandomHorizontalFlip:
    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, image):
        return image.transpose(Image.FLIP_LEFT_RIGHT) if random.random() < self.p else image


class CenterCrop:
    def __init__(self, size):
        self.size = size if isinstance(size, (tuple, list)) else (size, size)

    def __call__(self, image):
        h, w = self.size
        top, left = max(0, round((image.height - h) / 2)), max(0, round((image.width - w) / 2))
        return image.crop((left, top, left + w, top + h))


class RandomCrop:
    def __init__(self, size):
        self.size = size if isinstance(size, (tuple, list)) else (size, size)

    @staticmethod
    def get_params(image, size):
        h, w = size
        return random.randint(0, image.height - h), random.randint(0, image.width - w), h, w

    def __call__(self, image):
        top, left, h, w = self.get_params(image, self.size)
        return image.crop((left, top, left + w, top + h))
'''
FUNCTIONAL = """def crop(image, top, left, height, width):
    return image.crop((left, top, left + width, top + height))
"""


# --------------------------------------------------------------------------------------------------------------
# The child: one contender, one process.


def peak_memory_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / 1024 if sys.platform == "darwin" else peak / 1024


def step_clock(warmup: int, total: int, cuda: bool) -> list[float]:
    """Record the end time of every optimizer step (any optimizer: tistudio's and the peer's alike)."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    stamps: list[float] = []

    def hook(optimizer, args, kwargs) -> None:
        if cuda and len(stamps) + 1 in (warmup, total):
            torch.cuda.synchronize()  # only at the two ends of the measured window
        stamps.append(time.perf_counter())

    register_optimizer_step_post_hook(hook)
    return stamps


def summarise(stamps: list[float], spec: dict, processes: int = 1) -> dict:
    warmup, steps = spec["warmup"], spec["steps"]
    if len(stamps) < warmup + steps:
        raise RuntimeError(f"only {len(stamps)} optimizer steps were seen; expected {warmup + steps}")
    seconds = stamps[warmup + steps - 1] - stamps[warmup - 1]
    return {
        "steps_per_s": steps / seconds,
        "samples_per_s": steps * spec["batch"] * processes / seconds,
        "s_per_step": seconds / steps,
    }


def child_ours(spec: dict) -> dict:
    import torch

    from tistudio.config import CreateOptions, TrainOptions
    from tistudio.train.create import create_embedding
    from tistudio.train.loop import train
    from tistudio.train.parallel import Parallel

    cuda = spec["device"] == "cuda"
    stamps = step_clock(spec["warmup"], spec["warmup"] + spec["steps"], cuda)
    work = Path(spec["work"])
    common = {"model": spec["model"], "device": spec["device"], "precision": spec["precision"]}
    parallel = Parallel.from_environment()  # under torchrun with --processes
    if parallel.main:
        create_embedding(
            CreateOptions(
                **common,
                name="benchword",
                init_text="person",
                vectors=spec["vectors"],
                overwrite=True,
                embeddings_dir=str(work / "embeddings"),
            ),
            cache_dir=work,
        )
    else:
        while not (work / "embeddings" / "benchword.safetensors").exists():
            time.sleep(0.2)
    events: list[tuple[str, float]] = []
    started = time.perf_counter()
    train(
        TrainOptions(
            **common,
            embedding="benchword",
            dataset=spec["data"],
            embeddings_dir=str(work / "embeddings"),
            run_dir=str(work / "run"),
            template="subject",
            size=spec["size"],
            batch_size=spec["batch"],
            max_steps=spec["warmup"] + spec["steps"],
            preview_every=spec.get("preview_every", 0),
            preview_steps=20,
            preview_sampler="DPM++ 2M Karras",
            save_every=0,
            eval_every=spec["eval_every"],
            learning_rate="0.005",
            seed=0,
            compile_unet=spec.get("compile", False),
            gradient_checkpointing=spec.get("checkpointing", False),
            lora_rank=spec.get("lora_rank", 0),
            loras_dir=str(work / "loras"),
            buckets=spec.get("buckets", "off"),
        ),
        cache_dir=work,
        on_progress=lambda p: events.append((p.event, time.perf_counter())),
        parallel=parallel,
    )
    result = {
        **summarise(stamps, spec, parallel.world),
        "wall_s": time.perf_counter() - started,
        "processes": parallel.world,
    }
    if not parallel.main:
        return {}

    def after_a_step(kind: str) -> list[float]:
        """Seconds from a step's report to the next event, where that event is of this kind."""
        return sorted(
            t - events[i - 1][1]
            for i, (event, t) in enumerate(events)
            if event == kind and i and events[i - 1][0] == "step"
        )

    # A preview is drawn right after its step; a plain step's time is that of a step right after another step.
    previews = after_a_step("preview")
    if previews:
        plain = after_a_step("step")
        result["preview_s"] = sum(previews) / len(previews)
        if plain:
            result["preview_in_steps"] = result["preview_s"] / plain[len(plain) // 2]
    if cuda:
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def child_peer(spec: dict) -> dict:
    import runpy

    import torch

    try:
        import torchvision  # noqa: F401
    except ImportError:
        shim = Path(spec["work"]) / "shim" / "torchvision"
        shim.mkdir(parents=True, exist_ok=True)
        (shim / "__init__.py").write_text("from . import transforms  # noqa: F401\n")
        (shim / "transforms").mkdir(exist_ok=True)
        (shim / "transforms" / "__init__.py").write_text(SHIM)
        (shim / "transforms" / "functional.py").write_text(FUNCTIONAL)
        sys.path.insert(0, str(shim.parent))
    cuda = spec["device"] == "cuda"
    stamps = step_clock(spec["warmup"], spec["warmup"] + spec["steps"], cuda)
    mixed = {"fp32": "no", "auto": "no" if not cuda else "bf16", "bf16": "bf16", "fp16": "fp16"}[spec["precision"]]
    sys.argv = [
        spec["peer"],
        "--pretrained_model_name_or_path",
        spec["model"],
        "--train_data_dir",
        spec["data"],
        "--learnable_property",
        "object",
        "--placeholder_token",
        "<benchword>",
        "--initializer_token",
        "person",
        "--num_vectors",
        str(spec["vectors"]),
        "--resolution",
        str(spec["size"]),
        "--train_batch_size",
        str(spec["batch"]),
        "--gradient_accumulation_steps",
        "1",
        "--max_train_steps",
        str(spec["warmup"] + spec["steps"]),
        "--learning_rate",
        "5e-3",
        "--lr_scheduler",
        "constant",
        "--lr_warmup_steps",
        "0",
        "--output_dir",
        str(Path(spec["work"]) / "peer"),
        "--mixed_precision",
        mixed,
        "--dataloader_num_workers",
        "0",
        "--save_steps",
        "1000000",
        "--checkpointing_steps",
        "1000000",
        "--report_to",
        "all",
        "--seed",
        "0",
    ]
    if spec.get("checkpointing"):  # the SD 1.x script checkpoints its UNet too; the SDXL one only its text encoders
        sys.argv.append("--gradient_checkpointing")
    started = time.perf_counter()
    runpy.run_path(spec["peer"], run_name="__main__")
    result = {**summarise(stamps, spec), "wall_s": time.perf_counter() - started}
    if cuda:
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def child_generate(spec: dict, ours: bool) -> dict:
    import torch

    prompt, steps, cfg, size = "a photo of a person on a beach", spec["gen_steps"], 7.5, spec["size"]
    cuda = spec["device"] == "cuda"
    if ours:
        from tistudio.config import ModelOptions
        from tistudio.generate.images import Renderer, SamplingParams
        from tistudio.models.conditioning import PromptEncoder
        from tistudio.models.loading import load_model

        model = load_model(
            ModelOptions(model=spec["model"], device=spec["device"], precision=spec["precision"]), Path(spec["work"])
        )
        renderer = Renderer(model, PromptEncoder.for_model(model))

        def make(seed: int, count: int) -> None:
            renderer.render(
                SamplingParams(
                    prompt=prompt, steps=count, sampler="DDIM", cfg=cfg, width=size, height=size, seeds=(seed,)
                )
            )
    else:
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        dtype = {
            "fp32": torch.float32,
            "bf16": torch.bfloat16,
            "fp16": torch.float16,
            "auto": torch.bfloat16 if cuda else torch.float32,
        }[spec["precision"]]
        pipe = StableDiffusionPipeline.from_pretrained(
            spec["model"], torch_dtype=dtype, safety_checker=None, requires_safety_checker=False
        ).to(spec["device"])
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)

        def make(seed: int, count: int) -> None:
            generator = torch.Generator(spec["device"]).manual_seed(seed)
            pipe(prompt, num_inference_steps=count, guidance_scale=cfg, height=size, width=size, generator=generator)

    make(0, 2)  # warm-up
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    for seed in range(spec["gen_images"]):
        make(seed + 1, steps)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"images_per_s": spec["gen_images"] / seconds, "s_per_image": seconds / spec["gen_images"]}


def child(kind: str, spec: dict) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT / "src"))
    from tistudio.cli import quiet_third_party

    quiet_third_party()
    if kind == "ours":
        result = child_ours(spec)
    elif kind == "peer":
        result = child_peer(spec)
    else:
        result = child_generate(spec, ours=kind == "generate-ours")
    if result:  # the other processes of a data-parallel run say nothing
        result["peak_rss_mb"] = peak_memory_mb()
        print(RESULT + json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------------------------------------------
# The parent: model, photos, contenders, table.


def model_folder(spec: str, cache: Path) -> Path:
    sys.path.insert(0, str(ROOT / "src"))
    from tistudio.models.builtin import full_size_model_dir, full_size_sdxl_dir, random_model_dir

    if spec == "tiny":
        return random_model_dir(cache)
    if spec == "sd15":
        return full_size_model_dir(cache)
    if spec == "sdxl":
        return full_size_sdxl_dir(cache)
    return Path(spec)


SHAPES = ((2, 3), (3, 2), (1, 1))  # --buckets on's photos: a portrait, a landscape, a square, in turn


def make_photos(folder: Path, size: int, count: int = 8, shaped: bool = False) -> Path:
    """Plain pictures at the training size (content does not change the cost of a step); `shaped`: portraits,
    landscapes and squares in turn, of about the training area (each trains at its own bucket)."""
    import math
    import random

    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for index in range(count):
        across, down = SHAPES[index % len(SHAPES)] if shaped else (1, 1)
        width, height = round(size * math.sqrt(across / down)), round(size * math.sqrt(down / across))
        image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(12):
            x, y = rng.randrange(width), rng.randrange(height)
            draw.ellipse((x, y, x + size // 4, y + size // 4), fill=tuple(rng.randrange(256) for _ in range(3)))
        image.save(folder / f"photo_{index:02d}.png")
    return folder


def mean_pixels(folder: Path, size: int, buckets: bool) -> float:
    """The pixels a step trains per sample: the photos' buckets' areas, averaged (size x size for squares)."""
    from PIL import Image

    from tistudio.prepare.buckets import choose_buckets

    shapes = []
    for path in sorted(folder.glob("*.png")):
        with Image.open(path) as image:
            shapes.append(image.size)
    chosen = choose_buckets(shapes, size, buckets)
    return sum(w * h for w, h in chosen) / len(chosen)


def run_child(kind: str, spec: dict, log: Path, processes: int = 1) -> dict:
    command = [sys.executable, __file__, "--child", kind, "--spec", json.dumps(spec)]
    if processes > 1:
        command[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    with log.open("w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
    lines = log.read_text(errors="replace").splitlines()
    found = [line for line in lines if line.startswith(RESULT)]
    if done.returncode or not found:
        tail = "\n".join(lines[-25:])
        raise SystemExit(f"{kind} failed (exit {done.returncode}); the end of its log {log}:\n{tail}")
    return json.loads(found[-1][len(RESULT) :])


def machine() -> dict:
    import torch

    info = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    try:
        text = Path("/proc/cpuinfo").read_text()
        info["cpu_model"] = next(
            line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="tiny", help="tiny, sd15, sdxl or a diffusers folder (default: %(default)s)")
    parser.add_argument("--checkpointing", action="store_true", help="train with gradient checkpointing")
    parser.add_argument("--size", type=int, default=0, help="training resolution (default: the model's own)")
    parser.add_argument("--batch", default="1", help="batch sizes, comma-separated (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=5, help="measured steps (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps first (default: %(default)s)")
    parser.add_argument("--vectors", type=int, default=1, help="vectors per token (default: %(default)s)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps"))
    parser.add_argument("--precision", default="fp32", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument(
        "--eval-every",
        type=int,
        default=0,
        help="tistudio's fixed-batch evaluation every N steps (default 0: off, like the peer)",
    )
    parser.add_argument(
        "--preview-every",
        type=int,
        default=0,
        help="tistudio draws a 20-step DPM++ 2M Karras preview every N steps (default 0: off); the "
        "table then gives a preview's cost in training steps (steps/s then include previews)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="tistudio compiles its UNet (--compile-unet); raise --warmup to cover compiling",
    )
    parser.add_argument("--peer", type=Path, help="path of diffusers' examples/textual_inversion/textual_inversion.py")
    parser.add_argument("--generate", action="store_true", help="also measure generation (tistudio and diffusers)")
    parser.add_argument("--gen-steps", type=int, default=20)
    parser.add_argument("--gen-images", type=int, default=2)
    parser.add_argument(
        "--processes",
        default="1",
        help="tistudio's data-parallel process counts, comma-separated "
        "(default: %(default)s; e.g. 1,2,8 on an 8-GPU machine)",
    )
    parser.add_argument(
        "--lora-ranks",
        default="0",
        help="tistudio's LoRA ranks beside the word, comma-separated (default: %(default)s: the word alone; "
        "e.g. 0,8 to compare a pivotal-tuning step with an embedding step)",
    )
    parser.add_argument(
        "--buckets",
        default="off",
        help="off (square photos), on (portraits, landscapes and squares, each at its aspect-ratio bucket), or "
        "off,on; the table adds megapixels/s, the step's speed at equal pixel count",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.child:
        return child(args.child, json.loads(args.spec))

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cache = Path(os.environ.get("TISTUDIO_CACHE", Path.home() / ".cache" / "tistudio"))
    folder = model_folder(args.model, cache)
    size = args.size or json.loads((folder / "vae" / "config.json").read_text())["sample_size"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="tistudio-speed-") as temp:
        work = Path(temp)
        data = make_photos(work / "photos", size)
        shaped = make_photos(work / "shaped", size, shaped=True)
        base = {
            "model": str(folder),
            "data": str(data),
            "size": size,
            "steps": args.steps,
            "warmup": args.warmup,
            "vectors": args.vectors,
            "device": args.device,
            "precision": args.precision,
            "eval_every": args.eval_every,
            "peer": str(args.peer) if args.peer else None,
            "compile": args.compile,
            "checkpointing": args.checkpointing,
            "preview_every": args.preview_every,
            "gen_steps": args.gen_steps,
            "gen_images": args.gen_images,
        }
        ranks = [int(r) for r in args.lora_ranks.split(",")]
        contenders = [
            ("ours", int(p), rank, buckets)
            for p in args.processes.split(",")
            for rank in ranks
            for buckets in args.buckets.split(",")
        ]
        contenders += [("peer", 1, 0, "off")] if args.peer else []
        for batch in (int(b) for b in args.batch.split(",")):
            for kind, processes, rank, buckets in contenders:
                label = (
                    f"{kind}-{batch}"
                    + (f"-x{processes}" if processes > 1 else "")
                    + (f"-lora{rank}" if rank else "")
                    + ("-buckets" if buckets == "on" else "")
                )
                spec = {**base, "batch": batch, "work": str(work / label), "lora_rank": rank, "buckets": buckets}
                if buckets == "on":
                    spec["data"] = str(shaped)
                Path(spec["work"]).mkdir()
                print(f"... {label}, {processes} process(es)", file=sys.stderr, flush=True)
                who = kind if processes == 1 else f"ours x{processes}"
                row = {
                    "what": "train",
                    "who": who + (f" + LoRA {rank}" if rank else "") + (" buckets" if buckets == "on" else ""),
                    "batch": batch,
                    **run_child(kind, spec, work / f"{label}.log", processes),
                }
                row["pixels_per_sample"] = mean_pixels(Path(spec["data"]), size, buckets == "on")
                row["megapixels_per_s"] = row["samples_per_s"] * row["pixels_per_sample"] / 1e6
                rows.append(row)
        if args.generate:
            for kind in ("generate-ours", "generate-diffusers"):
                spec = {**base, "batch": 1, "work": str(work / kind)}
                Path(spec["work"]).mkdir()
                print(f"... {kind}", file=sys.stderr, flush=True)
                rows.append(
                    {
                        "what": "generate",
                        "who": kind.split("-")[1],
                        "batch": 1,
                        **run_child(kind, spec, work / f"{kind}.log"),
                    }
                )

    settings = {
        "model": args.model,
        "size": size,
        "steps": args.steps,
        "warmup": args.warmup,
        "vectors": args.vectors,
        "device": args.device,
        "precision": args.precision,
        "eval_every": args.eval_every,
        "compile": args.compile,
        "preview_every": args.preview_every,
        "checkpointing": args.checkpointing,
        "gen_steps": args.gen_steps,
        "sampler": "DDIM",
        "cfg": 7.5,
    }
    print(
        f"\n{args.model} at {size}px, {args.device} {args.precision}, {args.steps} steps after {args.warmup} "
        f"warm-up; {machine()}"
    )
    print(
        f"{'what':9} {'who':10} {'batch':>5} {'steps/s':>8} {'samples/s':>9} {'images/s':>8} {'peak RSS MB':>11} "
        f"{'CUDA peak MB':>12}"
    )

    def cell(row: dict, key: str, width: int, digits: int = 3) -> str:
        value = row.get(key)
        return f"{value:>{width}.{digits}f}" if value is not None else " " * (width - 1) + "-"

    for row in rows:
        print(
            f"{row['what']:9} {row['who']:10} {row['batch']:>5} {cell(row, 'steps_per_s', 8)} "
            f"{cell(row, 'samples_per_s', 9)} {cell(row, 'images_per_s', 8)} {cell(row, 'peak_rss_mb', 11, 0)} "
            f"{cell(row, 'cuda_peak_mb', 12, 0)}"
        )
    ratios = {}
    for batch in {row["batch"] for row in rows if row["what"] == "train"}:
        ours = next((r for r in rows if r["who"] == "ours" and r["batch"] == batch), None)
        peer = next((r for r in rows if r["who"] == "peer" and r["batch"] == batch), None)
        if ours and peer:
            ratios[f"batch {batch}"] = {
                "speed": ours["steps_per_s"] / peer["steps_per_s"],
                "peak_rss": ours["peak_rss_mb"] / peer["peak_rss_mb"],
            }
            if "cuda_peak_mb" in ours:
                ratios[f"batch {batch}"]["cuda_peak"] = ours["cuda_peak_mb"] / peer["cuda_peak_mb"]
    gen = {r["who"]: r for r in rows if r["what"] == "generate"}
    if len(gen) == 2:
        ratios["generation"] = {"speed": gen["ours"]["images_per_s"] / gen["diffusers"]["images_per_s"]}
    for row in rows:
        if "preview_in_steps" in row:
            print(
                f"tistudio, batch {row['batch']}: a preview takes {row['preview_s']:.1f} s = "
                f"{row['preview_in_steps']:.1f} training steps; every {args.preview_every} steps that is "
                f"{row['preview_in_steps'] / (args.preview_every + row['preview_in_steps']):.0%} of the run"
            )
    for label, values in ratios.items():
        print(f"tistudio / peer, {label}: " + ", ".join(f"{k} {v:.2f}x" for k, v in values.items()))
    for row in rows:
        square = next((r for r in rows if r["who"] == "ours" and r["batch"] == row["batch"]), None)
        if row["who"] == "ours buckets" and square:
            print(
                f"tistudio, batch {row['batch']}: buckets train {row['megapixels_per_s']:.4f} megapixels/s "
                f"({row['pixels_per_sample']:.0f} px a sample), squares {square['megapixels_per_s']:.4f} "
                f"({square['pixels_per_sample']:.0f} px): {row['megapixels_per_s'] / square['megapixels_per_s']:.2f}x"
            )
    for row in rows:
        single = next((r for r in rows if r["who"] == "ours" and r["batch"] == row["batch"]), None)
        if row.get("processes", 1) > 1 and single:
            row["scaling"] = row["samples_per_s"] / (row["processes"] * single["samples_per_s"])
            print(
                f"tistudio, batch {row['batch']} per process, {row['processes']} processes: {row['scaling']:.2f} x "
                f"{row['processes']} of one process's samples/s"
            )
    report = {"machine": machine(), "settings": settings, "rows": rows, "ratios": ratios}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
