"""Measure learning on the demo world: how fast each initialization learns the held-out person, and whether the
automatic best step agrees with the trait reader.

    python bench/learning.py [--steps 300] [--eval-every 25] [--inits auto,*] [--seeds 0,1] [--cfg 3]

For each initialization and training seed it trains the demo's embedding (15 photos of the held-out person,
4 vectors, lr 0.005, batch 4) with the trait reader scoring 32 pictures from unseen prompts and seeds at every
evaluation, then prints: the share before training, the best share, the first step that reached 80 %, the kept
step (the first on the fixed-batch loss floor), the step the reader likes best (the first within one picture of its
highest share), and where --stop auto's rule would have stopped.

It also tries an alternative that tistudio does not use: choosing by the likeness of preview pictures to the
training photos (16 pictures from photo-like prompts; the person is read from the photos themselves, trait by
trait) - the first step within 0.07 of the highest such likeness. Timings are of this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PICTURES = 32  # scored at every evaluation: 4 unseen prompts x 8 seeds
PREVIEW_PROMPTS = ("a photo of {name}", "a photo of {name}, smiling", "a photo of {name}, serious, on a beach",
                   "a photo of {name}, in a forest")  # photo-like, as the training photos: never the unseen ones
PREVIEW_TOLERANCE = 0.07  # about one picture in 16
sys.path.insert(0, str(ROOT / "src"))


def photo_likeness_scorer(folder: Path, photos: list, name: str, cfg: float):
    """score(model, encoder) -> the share of 16 preview pictures that show the person of the training photos (each
    trait the photos' majority, as the trait reader reads them): what a trainer could measure on its own."""
    from tistudio import world

    reader = world.load_trait_reader(folder)
    seen = world.read_people(reader, photos)

    def majority(trait: str):
        values = [getattr(p, trait) for p in seen]
        return max(dict.fromkeys(values), key=values.count)

    person = world.Person(**{trait: majority(trait) for trait in world.TRAIT_NAMES})
    return world.likeness_scorer(folder, person, name, prompts=PREVIEW_PROMPTS, seeds=(0, 1, 2, 3), cfg=cfg)


def run_one(init: str, seed: int, steps: int, eval_every: int, cache: Path, model, folder: Path,
            work: Path, cfg: float, lr: str, vectors: int) -> dict:
    from tistudio import world
    from tistudio.config import CreateOptions, TrainOptions
    from tistudio.create import create_embedding
    from tistudio.demo import NAME, TEMPLATE, person_photos
    from tistudio.objective import converged
    from tistudio.runfolder import read_eval_log
    from tistudio.train import train

    photos = person_photos(work / "photos")
    template = work / "template.txt"
    template.write_text(TEMPLATE)
    embeddings = work / "embeddings"
    init_text = "" if init == "auto" else init
    create_embedding(CreateOptions(model="demo", name=NAME, vectors=vectors, init_text=init_text, overwrite=True,
                                   embeddings_dir=str(embeddings)), cache_dir=cache, model=model)
    judge = world.likeness_scorer(folder, world.HELD_OUT, NAME, cfg=cfg)
    own = photo_likeness_scorer(folder, [Image.open(p) for p in sorted(photos.glob("*.png"))], NAME, cfg)
    previews: list[float] = []

    def likeness(model, encoder) -> float:
        previews.append(own(model, encoder))  # the alternative rule's evidence; the trainer never sees it
        return judge(model, encoder)

    started = time.monotonic()
    result = train(TrainOptions(model="demo", embedding=NAME, dataset=str(photos), embeddings_dir=str(embeddings),
                                run_dir=str(work / "run"), template=str(template), batch_size=4, max_steps=steps,
                                learning_rate=lr, eval_every=eval_every, preview_every=0, save_every=0, seed=seed),
                   cache_dir=cache, model=model, likeness=likeness)
    seconds = time.monotonic() - started
    rows = read_eval_log(work / "run" / "eval.csv")
    shares = [(s, like) for s, _, like in rows if like is not None]
    top = max(like for _, like in shares)
    # The reader's best step: the first whose share is within one picture of the highest share it saw.
    reader_best = next(s for s, like in shares if like >= top - 1 / PICTURES)
    kept = result.best_step or result.step  # the kept step: the first on the fixed-batch loss floor
    scores = [(row[0], score) for row, score in zip(rows, previews, strict=True) if row[0] > 0]
    best_score = max(score for _, score in scores)
    by_previews = next(s for s, score in scores if score >= best_score - PREVIEW_TOLERANCE)
    stop_at = next((rows[i][0] for i in range(len(rows)) if converged([r[1] for r in rows[: i + 1]])), None)
    reached = next((s for s, like in shares if like >= 0.8), None)
    return {"init": init, "seed": seed, "share_before": shares[0][1], "share_best": top,
            "share_kept": next(like for s, like in shares if s == kept), "first_step_80": reached,
            "kept_step": kept, "reader_best_step": reader_best, "auto_stop_step": stop_at,
            "agreement": round(abs(kept - reader_best) / max(reader_best, 1), 3),
            "preview_likeness_step": by_previews,
            "share_at_preview_likeness_step": next(like for s, like in shares if s == by_previews),
            "agreement_preview_likeness": round(abs(by_previews - reader_best) / max(reader_best, 1), 3),
            "train_seconds": round(seconds, 1), "shares": shares, "preview_likeness": scores,
            "losses": [(s, round(loss, 6)) for s, loss, _ in rows]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--inits", default="auto,*")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--cfg", type=float, default=3.0, help="guidance of the scored pictures (default: %(default)s)")
    parser.add_argument("--lr", default="0.005")
    parser.add_argument("--vectors", type=int, default=4)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tistudio.cli import quiet_third_party
    from tistudio.config import ModelOptions
    from tistudio.models import load_model
    from tistudio.tinymodel import demo_model_dir

    quiet_third_party()
    cache = Path(os.environ.get("TISTUDIO_CACHE", Path.home() / ".cache" / "tistudio"))
    model = load_model(ModelOptions(model="demo"), cache)
    folder = demo_model_dir(cache)
    results = []
    for init in args.inits.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            with tempfile.TemporaryDirectory() as work:
                results.append(run_one(init, seed, args.steps, args.eval_every, cache, model, folder, Path(work),
                                       args.cfg, args.lr, args.vectors))
            r = results[-1]
            print(f"init {init!r:10} seed {seed}: share {r['share_before']:.0%} -> best {r['share_best']:.0%} "
                  f"(kept {r['share_kept']:.0%}); 80% first at step {r['first_step_80']}; best step by loss "
                  f"{r['kept_step']}, by reader {r['reader_best_step']} (off by {r['agreement']:.0%}); by preview "
                  f"likeness {r['preview_likeness_step']} ({r['share_at_preview_likeness_step']:.0%}, off by "
                  f"{r['agreement_preview_likeness']:.0%}); "
                  f"--stop auto at {r['auto_stop_step']}; {r['train_seconds']} s", flush=True)
    print(json.dumps([{k: v for k, v in r.items() if k not in ("shares", "preview_likeness", "losses")}
                      for r in results], indent=2))
    curves = ("shares", "preview_likeness", "losses")
    print(json.dumps({f"{r['init']}/{r['seed']}": {key: r[key] for key in curves} for r in results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
