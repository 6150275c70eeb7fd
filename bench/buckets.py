"""Aspect-ratio buckets on the demo world: what square crops of portraits throw away (issue 32).

The demo's held-out person in 15 tall frames (world.render_tall: 64 x 106, a portrait with the torso in a red shirt
below the face, reaching the bottom). Two arms train the same embedding on the same photos (4 vectors, lr 0.005,
batch 4, seed 0, the demo's template): --buckets on (each photo at the 48x80 bucket, the whole frame) and --buckets
off (the centre 64x64 square: the head and shoulders, without the frame's top and bottom). At every evaluation each
arm draws 32 pictures at the portrait size 48x80 from unseen prompts (world.EVAL_PROMPTS: paintings, night, forest,
never in the training captions) and 8 unseen seeds at guidance 3, and reads:
  person  the share the trait reader reads as the held-out person's five traits in some 48x48 window of the picture
          (the reader reads 64x64 squares; the window slides down the frame in steps of 8);
  torso   the share whose bottom sixth, across the middle half, is the shirt's red (world.torso_share >= TORSO_SHOWN):
          the figure below the face;
  square  the person share at the square 64x64 the world model draws best (buckets must not cost it).

    python bench/buckets.py --steps 300 --every 50
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from learning import demo_world, train_arm, write_arms

TORSO_SHOWN = 0.3  # tall renders 0.85-1.0 (0.73-0.99 through the VAE); 26% of square renders (red shirts)
SEEDS = tuple(range(2000, 2008))
PORTRAIT = (48, 80)


def tall_photos(folder: Path, count: int = 15, seed: int = 0) -> Path:
    from tistudio.demo import world

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for index in range(count):
        scene = world.random_scene(rng, scenes=("plain", "beach", "forest"), styles=("photo",))
        world.render_tall(world.HELD_OUT, scene).save(folder / f"tomtut-{index:02d}.png")
        place = {"plain": "", "beach": ", on a beach", "forest": ", in a forest"}[scene.scene]
        (folder / f"tomtut-{index:02d}.txt").write_text(f"{scene.expression}{place}\n")
    return folder


def draw(model, encoder, name: str, size: tuple[int, int]) -> list:
    from tistudio.demo import world
    from tistudio.generate.images import Renderer, SamplingParams

    renderer = Renderer(model, encoder)
    images = []
    for prompt in world.EVAL_PROMPTS:
        images += renderer.render(
            SamplingParams(
                prompt=prompt.format(name=name),
                steps=20,
                sampler="DDIM",
                cfg=world.GUIDANCE,
                width=size[0],
                height=size[1],
                seeds=SEEDS,
            )
        )
    return images


def shows_person(reader, image) -> bool:
    """Whether some 48x48 window down the portrait reads as the held-out person's five traits."""
    from PIL import Image

    from tistudio.demo import world

    width, height = image.size
    windows = [
        image.crop((0, top, width, top + width)).resize((world.SIZE, world.SIZE), Image.LANCZOS)
        for top in range(0, height - width + 1, 8)
    ]
    return any(person == world.HELD_OUT for person in world.read_people(reader, windows))


def measure(model, encoder, reader, name: str) -> dict[str, float]:
    from tistudio.demo import world

    tall = draw(model, encoder, name, PORTRAIT)
    square = draw(model, encoder, name, (world.SIZE, world.SIZE))
    return {
        "person": sum(shows_person(reader, image) for image in tall) / len(tall),
        "torso": sum(world.torso_share(image) >= TORSO_SHOWN for image in tall) / len(tall),
        "square": sum(p == world.HELD_OUT for p in world.read_people(reader, square)) / len(square),
    }


def run_arm(buckets: str, args, cache: Path, model, folder: Path) -> dict:
    from tistudio.demo import world
    from tistudio.demo.run import NAME

    reader = world.load_trait_reader(folder)

    def judged(model, encoder) -> tuple[float, dict]:
        figures = measure(model, encoder, reader, NAME)
        return figures["person"], figures

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        arm = train_arm(cache, model, work, tall_photos(work / "photos"), judged, args, buckets=buckets)
    return {"buckets": buckets, **arm}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/buckets.json")
    args = parser.parse_args()
    cache, model, folder = demo_world()
    results = []
    for buckets in ("on", "off"):
        results.append(run_arm(buckets, args, cache, model, folder))
        row = results[-1]
        print(f"\n--buckets {buckets} ({row['seconds']} s, kept step {row['kept_step']})")
        print("  step  person  torso  square")
        for point in row["curve"]:
            print(f"  {point['step']:4d}  {point['person']:6.2f}  {point['torso']:5.2f}  {point['square']:6.2f}")
    write_arms(args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
