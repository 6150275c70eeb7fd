"""``tistudio demo``: the seed's story for real, on a small world where text controls the pictures.

The demo model is tistudio's world model (see demo/world.py and scripts/build_world_model.py): a small model of
exactly Stable Diffusion's architecture, trained on cartoon people whose traits the captions describe. One
person - long red hair, dark skin, glasses and a beard - was never in its training. The demo draws 15 pictures of
that person in different poses, light and places, creates an embedding with the person-like start, trains it in
two sittings (the second resumes the first), and generates "a photo of tomtut on a beach", "a painting of
tomtut", "tomtut at night". At every evaluation a trait reader, knowing the person only from the training photos,
reads 64 pictures from prompts and seeds never used in training: how likely each is to show the person (the
likeness, which chooses the step to keep) and how many do, so the report shows the person appearing as training
goes on, next to the fixed-batch loss (which chooses where there is no such reader, as with real photos).
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

from PIL import Image

from tistudio.config import CreateOptions, GenerateOptions, TrainOptions
from tistudio.demo import world
from tistudio.generate.images import generate
from tistudio.models.builtin import demo_model_dir
from tistudio.models.loading import DEMOS, load_model
from tistudio.pages import data_uri
from tistudio.storage import write_bytes, write_text
from tistudio.train.create import create_embedding
from tistudio.train.loop import train
from tistudio.train.report import write_run_report
from tistudio.train.runfolder import read_eval_log

log = logging.getLogger(__name__)

NAME = "tomtut"
PROMPTS = [
    "a photo of tomtut, smiling, on a beach",
    "a painting of tomtut, smiling",
    "a photo of tomtut, at night",
    "a painting of tomtut, serious, in a forest",
]
TEMPLATE = "a photo of [name], [filewords]\na photo of [name]\n"
STEPS = 200
# What suits the demo's 64-pixel world: its story's steps and previews (A1111's 3000 steps with a preview every 500
# would take 25 minutes for six previews), few sampler steps at its guidance. `serve --model demo` fills its forms
# with these.
TRAIN_DEFAULTS: dict[str, Any] = {
    "max_steps": STEPS,
    "batch_size": 4,
    "eval_every": 25,
    "preview_every": 50,
    "save_every": 50,
    "preview_steps": 20,
    "preview_cfg": world.GUIDANCE,
    "preview_seed": 7,
}
GENERATE_DEFAULTS: dict[str, Any] = {"steps": 25, "cfg": world.GUIDANCE, "sampler": "DDIM"}
DEMO_MODELS = {family: spec for spec, family in DEMOS.items()}  # the demo model of each family
BANNER = (
    "The demo runs on tistudio's <b>small world model</b>: the architecture of Stable Diffusion, trained on a "
    "synthetic world of cartoon people, so that text controls its 64-pixel pictures. The person in the photos "
    "below was never in its training. Repeat the story with a real checkpoint and your own photos using the "
    "commands at the end of this page."
)


@dataclass
class DemoResult:
    out_dir: Path
    report: Path
    embedding: Path
    images: list[Path]
    seconds: float
    steps: int
    share_before: float | None = None
    share_after: float | None = None
    best_step: int | None = None
    previews: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        shares = ""
        if self.share_before is not None and self.share_after is not None:
            shares = (
                f" Pictures from prompts and seeds never used in training that show the person: "
                f"{self.share_before:.0%} before training, {self.share_after:.0%} after."
            )
        best = f" The likeness picked step {self.best_step} as the best." if self.best_step else ""
        return "\n".join(
            [
                f"tistudio demo finished in {self.seconds:.0f} s: trained '{NAME}' for {self.steps} steps (in two "
                f"sittings: the second resumed the first), {len(self.images)} generated images.{shares}{best}",
                f"  report:    {self.report}",
                f"  embedding: {self.embedding}",
                f"  images:    {self.images[0].parent if self.images else '-'}",
                "The demo model is tistudio's small world model (64-pixel cartoons): it shows that training learns the "
                "person; real photos need a real checkpoint.",
            ]
        )


def person_photos(folder: Path, count: int = 15, seed: int = 0, masks: str = "", hat: bool = False) -> Path:
    """Pictures of the held-out person in varied poses, light and places (no night, no paintings). With `masks`
    "exact", each with its exact silhouette beside it as tomtut-NN.mask.png; "face", the head-and-shoulders shape
    that --loss-mask face draws around the face a detector finds (train/masks.py). With `hat`, wearing the hat the
    world model never drew (world.HAT)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for index in range(count):
        scene = world.random_scene(rng, scenes=("plain", "beach", "forest"), styles=("photo",))
        image = world.render(world.HELD_OUT, scene, hat=hat)
        path = folder / f"tomtut-{index:02d}.png"
        image.save(path)
        if masks:
            from tistudio.train.masks import head_and_shoulders

            mask = (
                world.person_mask(world.HELD_OUT, scene)
                if masks == "exact"
                else head_and_shoulders(image.size, world.face_box(scene))
            )
            mask.save(folder / f"tomtut-{index:02d}.mask.png")
        place = {"plain": "", "beach": ", on a beach", "forest": ", in a forest"}[scene.scene]
        write_text(path.with_suffix(".txt"), f"{scene.expression}{place}\n")
    return folder


def _commands(out: Path, steps: int, spec: str = "demo") -> str:
    q = shlex.quote
    demo = [
        f"tistudio create {NAME} --model {spec} --vectors 4 --overwrite --embeddings-dir {q(str(out / 'embeddings'))}",
        f"tistudio train {NAME} --model {spec} --dataset {q(str(out / 'photos'))} --embeddings-dir "
        f"{q(str(out / 'embeddings'))} --run-dir {q(str(out / 'run'))} --template {q(str(out / 'template.txt'))} "
        f"--lr 0.005 --batch-size 4 --steps {steps} --eval-every 25 --preview-every 50 --save-every 50",
        f"tistudio generate {q(PROMPTS[0])} --model {spec} --embeddings {q(str(out / 'embeddings'))} "
        f"--out-dir {q(str(out / 'images'))} --seed 42 --cfg {world.GUIDANCE:g} --sampler DDIM",
    ]
    real = [
        "tistudio prepare ~/photos/tomtut prepared/tomtut",
        "tistudio create tomtut --model ~/models/v1-5-pruned-emaonly.safetensors --vectors 4",
        "tistudio train tomtut --model ~/models/v1-5-pruned-emaonly.safetensors --dataset prepared/tomtut "
        "--lr '0.005:100, 1e-3:1000, 1e-5' --batch-size 1 --gradient-accumulation 4 --steps 3000 --stop auto "
        "--preview-every 250 --save-every 250",
        "tistudio generate 'portrait of tomtut as a lego figure, in the style of van gogh' --negative 'blurry, lowres' "
        "--model ~/models/v1-5-pruned-emaonly.safetensors --sampler 'DPM++ 2M Karras' --steps 20 --cfg 7 --seed 42 "
        "--batch 4",
    ]
    return (
        "<h2>Repeat it</h2><p>This demo, step by step:</p><pre>" + html.escape("\n".join(demo)) + "</pre>"
        "<p>With a real checkpoint (a diffusers folder, a .safetensors/.ckpt file or a Hub id) and your own "
        "10-30 photos (there is no trait reader there: the step kept is the lowest fixed-batch loss; the same "
        "commands on the demo model do that too):</p><pre>" + html.escape("\n".join(real)) + "</pre>"
        "<p>Copy <code>embeddings/tomtut.safetensors</code> into A1111's or ComfyUI's embeddings folder to use "
        "the word there too.</p>"
    )


def run_demo(
    out: Path,
    *,
    cache_dir: Path,
    steps: int = STEPS,
    family: str = "sd1",
    on_progress: Callable[[Any], None] | None = None,
    stop: threading.Event | None = None,
) -> DemoResult:
    """The demo on the world model of `family` ("sd1", or "sdxl" for its SDXL-architecture variant)."""
    started = time.monotonic()
    spec = DEMO_MODELS[family]
    out = Path(out)
    photos = person_photos(out / "photos")
    template = write_text(out / "template.txt", TEMPLATE)
    model = load_model(CreateOptions(model=spec), cache_dir)
    folder = demo_model_dir(cache_dir, family)
    embeddings = out / "embeddings"
    create_embedding(
        CreateOptions(model=spec, name=NAME, vectors=4, overwrite=True, embeddings_dir=str(embeddings)),
        cache_dir=cache_dir,
        model=model,
    )
    # The likeness: the reader knows the person only from the training photos, and looks at pictures from prompts
    # (paintings, night) and seeds that training never uses. It also counts the pictures that show the person.
    counted: list[float] = []
    scorer = world.photo_likeness(
        folder,
        [Image.open(p) for p in sorted(photos.glob("*.png"))],
        NAME,
        on_pictures=lambda shown, _: counted.append(sum(shown) / len(shown)),
    )
    common = dict(
        model=spec,
        embedding=NAME,
        dataset=str(photos),
        embeddings_dir=str(embeddings),
        run_dir=str(out / "run"),
        template=str(template),
        **{k: v for k, v in TRAIN_DEFAULTS.items() if k != "max_steps"},
    )
    first = train(
        TrainOptions(**common, max_steps=max(1, steps // 2)),
        cache_dir=cache_dir,
        model=model,
        on_progress=on_progress,
        stop=stop,
        likeness=scorer,
    )
    result = first
    if not first.stopped:
        result = train(
            TrainOptions(**common, max_steps=steps),
            cache_dir=cache_dir,
            model=model,
            on_progress=on_progress,
            stop=stop,
            likeness=scorer,
        )
    images = demo_images(spec, embeddings, out / "images", cache_dir, model, stop)
    evaluations = read_eval_log(out / "run" / "eval.csv")
    # One count per evaluation, in order (the second sitting keeps the first's evaluations and adds its own).
    shares = counted if len(counted) == len(evaluations) else []
    best = result.best_step
    steps_read = [s for s, _, _ in evaluations]
    chosen = shares[steps_read.index(best if best in steps_read else steps_read[-1])] if shares else None
    extra = demo_sections(out, photos, images, shares, chosen, steps, spec)
    report = write_run_report(out / "run", NAME, title="tistudio demo", banner=BANNER, extra_sections=extra)
    final_report = out / "report.html"
    write_bytes(final_report, report.read_bytes())
    return DemoResult(
        out_dir=out,
        report=final_report,
        embedding=result.embedding_path,
        images=[i.path for i in images if i.path],
        seconds=time.monotonic() - started,
        steps=result.step,
        share_before=shares[0] if shares else None,
        share_after=chosen,
        best_step=best,
        previews=first.previews + (result.previews if result is not first else []),
    )


def demo_images(
    spec: str, embeddings: Path, folder: Path, cache_dir: Path, model: Any, stop: threading.Event | None
) -> list[Any]:
    """Two pictures of each of the demo's prompts with the trained word (until a stop)."""
    images = []
    for index, prompt in enumerate(PROMPTS):
        if stop is not None and stop.is_set():
            break
        options = GenerateOptions(
            model=spec,
            prompt=prompt,
            seed=42 + index,
            steps=25,
            cfg=world.GUIDANCE,
            sampler="DDIM",
            batch=2,
            embeddings_dir=str(embeddings),
            out_dir=str(folder),
        )
        images += generate(options, cache_dir=cache_dir, model=model)
    return images


def demo_sections(
    out: Path, photos: Path, images: list[Any], shares: list[float], chosen: float | None, steps: int, spec: str
) -> str:
    """The demo report's own sections: the training photos, what was measured, and the generated pictures."""
    cells = "".join(
        f"<figure><img src='{data_uri(image.path)}' alt=''><figcaption>{html.escape(image.infotext)}"
        f"</figcaption></figure>"
        for image in images
        if image.path
    )
    photo_cells = "".join(
        f"<figure><img src='{data_uri(p)}' alt=''><figcaption>{html.escape(p.name)}</figcaption></figure>"
        for p in sorted(photos.glob("*.png"))
    )
    measured = ""
    if shares:
        measured = (
            f"<p>Of the 64 pictures drawn at every evaluation from prompts and seeds never used in training "
            f"(paintings, night; guidance {world.GUIDANCE:g}, like the images below), <b>{shares[0]:.0%}</b> "
            f"showed the person before training and <b>{chosen:.0%}</b> with the embedding that was kept "
            f"(the same pictures chose it; tistudio's benchmark checks the choice on pictures of its own).</p>"
        )
    extra = (
        f"<h2>Training photos</h2><p>The person: {html.escape(world.HELD_OUT.describe())} - a combination the "
        f"model never saw.</p><div class='grid'>{photo_cells}</div>{measured}"
        f"<h2>Generated with the embedding</h2><div class='grid'>{cells}</div>{_commands(out, steps, spec)}"
    )
    return extra
