"""``tistudio demo``: the whole workflow on the built-in tiny model, in about a minute on two CPU cores.

It draws a small photo set of a toy figure, creates an embedding, trains it in two sittings (the second resumes
the first, optimizer state and all), generates a few images with it and writes a one-page report. The tiny
model has random weights: the pictures are not meaningful. The demo proves that the install works, end to end.
"""

from __future__ import annotations

import html
import logging
import random
import shlex
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFilter

from .config import CreateOptions, GenerateOptions, TrainOptions
from .create import create_embedding
from .generate import generate
from .models import load_model
from .report import data_uri, write_run_report
from .storage import write_bytes
from .train import train

log = logging.getLogger(__name__)

NAME = "demotoy"
PROMPTS = ["a photo of demotoy on a beach", "a painting of demotoy", "demotoy at night",
           "portrait of demotoy as a lego figure"]
BANNER = ("This run used tistudio's built-in <b>tiny model with random weights</b>. It exercises every step of the "
          "real workflow, but its pictures are noise and mean nothing: they prove the install, not the quality. "
          "Repeat it with a real Stable Diffusion checkpoint using the commands at the end of this page.")


@dataclass
class DemoResult:
    out_dir: Path
    report: Path
    embedding: Path
    images: list[Path]
    seconds: float
    steps: int
    previews: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        return "\n".join([
            f"tistudio demo finished in {self.seconds:.0f} s: trained '{NAME}' for {self.steps} steps "
            f"(in two sittings: the second resumed the first), {len(self.previews)} previews, "
            f"{len(self.images)} generated images.",
            f"  report:    {self.report}",
            f"  embedding: {self.embedding}",
            f"  images:    {self.images[0].parent if self.images else '-'}",
            "The demo model has random weights: its pictures are not meaningful. Everything worked, so tistudio is",
            "installed correctly. See the report for the commands to use with a real checkpoint.",
        ])


def draw_toy(rng: random.Random, size: int = 96) -> Image.Image:
    """A toy figure (round head, eyes, red cap) in a random pose, place, light and background."""
    background = tuple(rng.randrange(40, 220) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    cx, cy = rng.randrange(36, size - 36), rng.randrange(40, size - 30)
    radius = rng.randrange(18, 26)
    draw.rectangle([cx - radius // 2, cy + radius - 4, cx + radius // 2, cy + 2 * radius], fill=(40, 90, 200))
    draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=(240, 200, 160))
    for side in (-1, 1):
        ex = cx + side * radius // 3
        draw.ellipse([ex - 3, cy - 5, ex + 3, cy + 1], fill=(20, 20, 20))
    draw.chord([cx - radius, cy - radius - 6, cx + radius, cy + radius // 2], 180, 360, fill=(210, 30, 40))
    image = image.rotate(rng.uniform(-15, 15), resample=Image.BICUBIC, fillcolor=background)
    light = rng.uniform(0.7, 1.25)
    image = image.point(lambda v: max(0, min(255, int(v * light))))
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.8)))


def make_photos(folder: Path, count: int = 10, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for index in range(count):
        draw_toy(rng).save(folder / f"{index:02d}-toy figure.png")
    (folder / "00-toy figure.txt").write_text("toy figure, red cap, blue shirt", "utf-8")
    return folder


def _commands(out: Path, steps: int) -> str:
    q = shlex.quote
    demo = [
        f"tistudio create {NAME} --model demo --init-text toy --vectors 2 --overwrite "
        f"--embeddings-dir {q(str(out / 'embeddings'))}",
        f"tistudio train {NAME} --model demo --dataset {q(str(out / 'photos'))} --embeddings-dir "
        f"{q(str(out / 'embeddings'))} --run-dir {q(str(out / 'run'))} --lr 0.005 --batch-size 2 --flip "
        f"--steps {steps} --preview-every 20 --save-every 20 --preview-steps 10",
        f"tistudio generate {q(PROMPTS[0])} --model demo --embeddings {q(str(out / 'embeddings'))} "
        f"--out-dir {q(str(out / 'images'))} --seed 42 --steps 20",
    ]
    real = [
        "tistudio create tomtut --model ~/models/v1-5-pruned-emaonly.safetensors --init-text woman --vectors 4",
        "tistudio train tomtut --model ~/models/v1-5-pruned-emaonly.safetensors --dataset ~/photos/tomtut "
        "--lr '0.005:100, 1e-3:1000, 1e-5' --batch-size 1 --gradient-accumulation 4 --steps 3000 "
        "--preview-every 250 --save-every 250",
        "tistudio generate 'portrait of tomtut as a lego figure, in the style of van gogh' --negative 'blurry, lowres' "
        "--model ~/models/v1-5-pruned-emaonly.safetensors --sampler 'DPM++ 2M Karras' --steps 20 --cfg 7 --seed 42 "
        "--batch 4",
    ]
    return ("<h2>Repeat it</h2><p>This demo, step by step:</p><pre>" + html.escape("\n".join(demo)) + "</pre>"
            "<p>With a real checkpoint (a diffusers folder, a .safetensors/.ckpt file or a Hub id) and your own "
            "10-30 photos:</p><pre>" + html.escape("\n".join(real)) + "</pre>"
            "<p>Copy <code>embeddings/tomtut.safetensors</code> into A1111's or ComfyUI's embeddings folder to use "
            "the word there too.</p>")


def run_demo(out: Path, *, cache_dir: Path, steps: int = 60, on_progress: Callable[[Any], None] | None = None,
             stop: threading.Event | None = None) -> DemoResult:
    started = time.monotonic()
    out = Path(out)
    photos = make_photos(out / "photos")
    model = load_model(CreateOptions(model="demo"), cache_dir)
    embeddings = out / "embeddings"
    create_embedding(CreateOptions(model="demo", name=NAME, init_text="toy", vectors=2, overwrite=True,
                                   embeddings_dir=str(embeddings)), cache_dir=cache_dir, model=model)
    common = dict(model="demo", embedding=NAME, dataset=str(photos), embeddings_dir=str(embeddings),
                  run_dir=str(out / "run"), batch_size=2, flip=True, preview_every=20, save_every=20,
                  preview_steps=10)
    first = train(TrainOptions(**common, max_steps=max(1, steps // 2)), cache_dir=cache_dir, model=model,
                  on_progress=on_progress, stop=stop)
    result = first
    if not first.stopped:
        result = train(TrainOptions(**common, max_steps=steps), cache_dir=cache_dir, model=model,
                       on_progress=on_progress, stop=stop)
    images = []
    for index, prompt in enumerate(PROMPTS):
        if stop is not None and stop.is_set():
            break
        images += generate(GenerateOptions(model="demo", prompt=prompt, negative_prompt="blurry", seed=42 + index,
                                           steps=20, embeddings_dir=str(embeddings), out_dir=str(out / "images")),
                           cache_dir=cache_dir, model=model)
    cells = "".join(f"<figure><img src='{data_uri(image.path)}' alt=''><figcaption>{html.escape(image.infotext)}"
                    f"</figcaption></figure>" for image in images if image.path)
    photo_cells = "".join(f"<figure><img src='{data_uri(p)}' alt=''><figcaption>{html.escape(p.name)}"
                          f"</figcaption></figure>" for p in sorted(photos.glob("*.png")))
    extra = (f"<h2>Training photos</h2><div class='grid'>{photo_cells}</div>"
             f"<h2>Generated with the embedding</h2><div class='grid'>{cells}</div>{_commands(out, steps)}")
    report = write_run_report(out / "run", NAME, title="tistudio demo", banner=BANNER, extra_sections=extra)
    final_report = out / "report.html"
    write_bytes(final_report, report.read_bytes())
    return DemoResult(out_dir=out, report=final_report, embedding=result.embedding_path,
                      images=[i.path for i in images if i.path], seconds=time.monotonic() - started,
                      steps=result.step, previews=first.previews + (result.previews if result is not first else []))
