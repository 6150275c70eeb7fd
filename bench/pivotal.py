"""Pivotal tuning on the demo world: what the word alone cannot draw, and what a LoRA beside it adds.

The demo's held-out person wears a blue hat - a shape no picture of the world model's training ever had
(world.HAT) - in 15 renders. Each arm trains the same embedding on them (4 vectors, lr 0.005, batch 4, seed 0): the
word alone, and the word with a LoRA (--lora-rank) at each learning rate asked. At every evaluation it draws 32
pictures from unseen prompts (world.EVAL_PROMPTS: paintings, night, forest, never in the training captions) and
unseen seeds at guidance 3, and reads:
  hat      the share showing the hat (world.hat_share >= HAT_SHOWN of the top rows), and apart for the
           prompts' photos (unseen places and night) and paintings (a style the 15 renders never had);
  person   the share the trait reader reads as the held-out person's five traits (hair under the hat included);
  obeyed   the share whose place and style (world.SceneReader) are the prompt's: editability.
`--no-hat` trains on the plain held-out person instead (the LoRA must not make the word's result worse).

    python bench/pivotal.py --steps 800 --every 200 --lora-lrs 1e-3,2e-3
    python bench/pivotal.py --steps 800 --every 200 --lora-lrs 2e-3 --no-hat --out bench/results/pivotal-no-hat.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from learning import demo_world, train_arm, write_arms

HAT_SHOWN = 0.03  # without the hat: renders at most 0.016, the world model's samples 0.004; with it: renders 0.22-0.44
SEEDS = tuple(range(2000, 2008))


def measure(folder: Path, model, encoder, reader, scenes, hat: bool) -> dict[str, float]:
    from tistudio.demo import world
    from tistudio.demo.run import NAME
    from tistudio.generate.images import Renderer, SamplingParams

    renderer = Renderer(model, encoder)
    images, asked = [], []
    for prompt in world.EVAL_PROMPTS:
        text = prompt.format(name=NAME)
        images += renderer.render(
            SamplingParams(
                prompt=text,
                steps=20,
                sampler="DDIM",
                cfg=world.GUIDANCE,
                width=world.SIZE,
                height=world.SIZE,
                seeds=SEEDS,
            )
        )
        asked += [world.prompt_scene(text)] * len(SEEDS)
    people = world.read_people(reader, images)
    hats = [world.hat_share(image) >= HAT_SHOWN for image in images]
    paintings = [style == "painting" for _, style in asked]
    return {
        "hat": sum(hats) / len(images),
        "hat_photos": sum(h for h, p in zip(hats, paintings, strict=True) if not p) / paintings.count(False),
        "hat_paintings": sum(h for h, p in zip(hats, paintings, strict=True) if p) / paintings.count(True),
        "person": sum(person == world.HELD_OUT for person in people) / len(images),
        "obeyed": sum(read == want for read, want in zip(scenes.read(images), asked, strict=True)) / len(images),
    }


def run_arm(label: str, rank: int, lora_lr: str, args, cache: Path, model, folder: Path) -> dict:
    from tistudio.demo import world
    from tistudio.demo.run import person_photos

    reader, scenes = world.load_trait_reader(folder), world.fit_scene_reader()

    def judged(model, encoder) -> tuple[float, dict]:
        figures = measure(folder, model, encoder, reader, scenes, not args.no_hat)
        return figures["hat"] if not args.no_hat else figures["person"], figures

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        photos = person_photos(work / "photos", hat=not args.no_hat)
        arm = train_arm(
            cache,
            model,
            work,
            photos,
            judged,
            args,
            loras_dir=str(work / "loras"),
            lora_rank=rank,
            lora_learning_rate=lora_lr,
            lora_start=args.lora_start,
            lora_targets=args.targets,
        )
    return {"arm": label, "rank": rank, "lora_lr": lora_lr if rank else None, **arm}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lora-lrs", default="1e-4,1e-3", help="comma-separated LoRA learning rates")
    parser.add_argument(
        "--lora-start", type=float, default=0.0, help="tistudio's default is 0.5; 0: both from the start"
    )
    parser.add_argument("--targets", default="attention")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-hat", action="store_true", help="the plain held-out person (no hat)")
    parser.add_argument("--skip-word", action="store_true", help="no word-alone arm")
    parser.add_argument("--rank-list", default="", help="comma-separated ranks instead of --rank (one arm each)")
    parser.add_argument("--out", default="bench/results/pivotal.json")
    args = parser.parse_args()
    cache, model, folder = demo_world()
    arms = [] if args.skip_word else [("word alone", 0, "1e-4")]
    ranks = [int(r) for r in args.rank_list.split(",")] if args.rank_list else [args.rank]
    arms += [
        (f"word + rank-{rank} LoRA ({args.targets}), lr {lr}", rank, lr)
        for rank in ranks
        for lr in args.lora_lrs.split(",")
        if lr
    ]
    results = []
    for label, rank, lr in arms:
        results.append(run_arm(label, rank, lr, args, cache, model, folder))
        row = results[-1]
        print(f"\n{label} ({row['seconds']} s, kept step {row['kept_step']})")
        print("  step    hat  (photos  paintings)  person  obeyed")
        for point in row["curve"]:
            print(
                f"  {point['step']:4d}  {point['hat']:5.2f}  ({point['hat_photos']:6.2f}  "
                f"{point['hat_paintings']:9.2f})  {point['person']:6.2f}  {point['obeyed']:6.2f}"
            )
    write_arms(args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
