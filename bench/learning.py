"""Measure learning on the demo world: how fast each initialization learns the held-out person, and whether the
automatic best step agrees with the trait reader.

    python bench/learning.py [--steps 300] [--eval-every 25] [--inits auto,*] [--seeds 0,1] [--cfg 3]
                             [--judges 2] [--no-previews] [--out results.json]

For each initialization and training seed it trains the demo's embedding (15 photos of the held-out person,
4 vectors, lr 0.005, batch 4). At every evaluation each judge - the trait reader looking at 32 pictures from four
unseen prompts and its own eight unseen seeds - gives the share of pictures that show the person. It prints: the
share before training, the best share, the first step that reached 80 %, the kept step (tistudio's choice: the
lowest fixed-batch loss) and whether its share is on the reader's plateau (not told apart from the
best share by a one-sided two-proportion test at 95%), the step the reader likes best (all judges' pictures
pooled: the first within one picture of its highest share), the step each judge alone likes best (how far apart
those are is how finely the best step can be told at all), and where --stop auto's rule would have stopped and
what it would have kept.

It also tries an alternative that tistudio does not use: choosing by the likeness of preview pictures to the
training photos (16 pictures from photo-like prompts; the person is read from the photos themselves, trait by
trait) - the first step within 0.07 of the highest such likeness. Timings are of this machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PICTURES = 32  # scored by one judge at every evaluation: 4 unseen prompts x 8 seeds
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


def judge_seeds(judge: int) -> tuple[int, ...]:
    """Picture seeds of judge 0, 1, ...: disjoint sets of 8, none used in training or by the previews."""
    return tuple(range(1000 * (judge + 1), 1000 * (judge + 1) + 8))


def first_best(curve: list[tuple[int, float]], tolerance: float) -> int:
    """The first step within `tolerance` of the curve's highest value."""
    top = max(value for _, value in curve)
    return next(step for step, value in curve if value >= top - tolerance)


def on_plateau(share: float, top: float, pictures: int) -> bool:
    """Whether a step's share cannot be told apart from the highest share: a one-sided two-proportion test at 95%
    (the difference is under 1.64 standard errors of the difference of two shares of `pictures` pictures each)."""
    spread = math.sqrt((share * (1 - share) + top * (1 - top)) / pictures)
    return top - share <= 1.64 * max(spread, 1 / pictures)


def off_by(step: int, reference: int) -> float:
    return round(abs(step - reference) / max(reference, 1), 3)


def run_one(init: str, seed: int, steps: int, eval_every: int, cache: Path, model, folder: Path,
            work: Path, cfg: float, lr: str, vectors: int, judges: int, previews_too: bool) -> dict:
    from tistudio import world
    from tistudio.config import CreateOptions, TrainOptions
    from tistudio.create import create_embedding
    from tistudio.demo import NAME, TEMPLATE, person_photos
    from tistudio.objective import best_step, should_stop
    from tistudio.runfolder import read_eval_log
    from tistudio.train import train

    photos = person_photos(work / "photos")
    template = work / "template.txt"
    template.write_text(TEMPLATE)
    embeddings = work / "embeddings"
    init_text = "" if init == "auto" else init
    create_embedding(CreateOptions(model="demo", name=NAME, vectors=vectors, init_text=init_text, overwrite=True,
                                   embeddings_dir=str(embeddings)), cache_dir=cache, model=model)
    panel = [world.likeness_scorer(folder, world.HELD_OUT, NAME, seeds=judge_seeds(j), cfg=cfg) for j in range(judges)]
    own = photo_likeness_scorer(folder, [Image.open(p) for p in sorted(photos.glob("*.png"))], NAME, cfg)
    previews: list[float] = []
    verdicts: list[list[float]] = []  # per evaluation, each judge's share

    def likeness(model, encoder) -> float:
        if previews_too:
            previews.append(own(model, encoder))  # the alternative rule's evidence; the trainer never sees it
        verdicts.append([judge(model, encoder) for judge in panel])
        return sum(verdicts[-1]) / judges

    started = time.monotonic()
    result = train(TrainOptions(model="demo", embedding=NAME, dataset=str(photos), embeddings_dir=str(embeddings),
                                run_dir=str(work / "run"), template=str(template), batch_size=4, max_steps=steps,
                                learning_rate=lr, eval_every=eval_every, preview_every=0, save_every=0, seed=seed),
                   cache_dir=cache, model=model, likeness=likeness)
    seconds = time.monotonic() - started
    rows = read_eval_log(work / "run" / "eval.csv")
    shares = [(s, like) for s, _, like in rows if like is not None]
    top = max(like for _, like in shares)
    # The reader's best step: the first whose share (all judges' pictures pooled) is within one picture of the
    # highest share it saw. Each judge alone says the same from its own pictures: how far two judges' best steps
    # lie apart is how finely "the best step" can be told at all.
    reader_best = first_best(shares, 1 / (PICTURES * judges))
    by_judge = [first_best([(row[0], v[j]) for row, v in zip(rows, verdicts, strict=True)], 1 / PICTURES)
                for j in range(judges)]
    kept = result.best_step or result.step  # the kept step: the lowest fixed-batch loss
    scores = [(row[0], score) for row, score in zip(rows, previews, strict=False) if row[0] > 0]
    by_previews = first_best(scores, PREVIEW_TOLERANCE) if scores else None
    neutral = json.loads((work / "run" / "options.json").read_text())["resolved"]["neutral_loss"]
    losses = [(s, loss) for s, loss, _ in rows]
    stop_at = next((losses[i][0] for i in range(len(losses)) if should_stop(losses[: i + 1], neutral)), None)
    # What --stop auto would have kept: the best step of the evaluations up to where it stops.
    stop_kept = best_step([(s, loss) for s, loss in losses if s <= stop_at], neutral) if stop_at is not None else None
    reached = next((s for s, like in shares if like >= 0.8), None)
    return {"init": init, "seed": seed, "share_before": shares[0][1], "share_best": top,
            "share_kept": next(like for s, like in shares if s == kept), "first_step_80": reached,
            "kept_on_plateau": on_plateau(next(like for s, like in shares if s == kept), top, PICTURES * judges),
            "kept_step": kept, "reader_best_step": reader_best, "auto_stop_step": stop_at, "auto_stop_kept": stop_kept,
            "share_auto_stop_kept": next((like for s, like in shares if s == stop_kept), None),
            "agreement": off_by(kept, reader_best), "best_by_judge": by_judge,
            # How many judges alone land within 20% of the pooled best: how often the reader agrees with itself.
            "judges_within_20": sum(off_by(step, reader_best) <= 0.2 for step in by_judge),
            "reader_plateau": [s for s, like in shares if on_plateau(like, top, PICTURES * judges)],
            "preview_likeness_step": by_previews,
            "share_at_preview_likeness_step": next((like for s, like in shares if s == by_previews), None),
            "agreement_preview_likeness": off_by(by_previews, reader_best) if scores else None,
            "train_seconds": round(seconds, 1), "shares": shares, "preview_likeness": scores,
            "verdicts": [(row[0], v) for row, v in zip(rows, verdicts, strict=True)],
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
    parser.add_argument("--judges", type=int, default=2,
                        help="independent sets of 32 scored pictures (default: %(default)s); with 2 or more, the "
                             "output also says how far apart their best steps are")
    parser.add_argument("--no-previews", action="store_true", help="skip the preview-likeness alternative")
    parser.add_argument("--out", type=Path, help="also write every result, with its curves, to this JSON file")
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
                                       args.cfg, args.lr, args.vectors, args.judges, not args.no_previews))
            r = results[-1]
            judges = (f" (each judge alone: {', '.join(map(str, r['best_by_judge']))}; {r['judges_within_20']} of "
                      f"{args.judges} within 20%)") if args.judges > 1 else ""
            previews = (f"by preview likeness {r['preview_likeness_step']} ({r['share_at_preview_likeness_step']:.0%}, "
                        f"off by {r['agreement_preview_likeness']:.0%}); ") if r["preview_likeness"] else ""
            plateau = (f", on the reader's plateau {r['reader_plateau']}" if r["kept_on_plateau"] else
                       f", below the reader's plateau {r['reader_plateau']}")
            stop = (f" keeping {r['auto_stop_kept']} ({r['share_auto_stop_kept']:.0%})"
                    if r["auto_stop_kept"] is not None else "")
            print(f"init {init!r:10} seed {seed}: share {r['share_before']:.0%} -> best {r['share_best']:.0%} "
                  f"(kept {r['share_kept']:.0%}{plateau}); 80% first at step {r['first_step_80']}; best step by loss "
                  f"{r['kept_step']}, by reader {r['reader_best_step']}{judges} (off by {r['agreement']:.0%}); "
                  f"{previews}--stop auto at {r['auto_stop_step']}{stop}; {r['train_seconds']} s", flush=True)
            if args.out:
                args.out.write_text(json.dumps(results))
    print(json.dumps([{k: v for k, v in r.items() if k not in ("shares", "preview_likeness", "losses")}
                      for r in results], indent=2))
    curves = ("shares", "preview_likeness", "verdicts", "losses")
    print(json.dumps({f"{r['init']}/{r['seed']}": {key: r[key] for key in curves} for r in results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
