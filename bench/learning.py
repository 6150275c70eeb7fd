"""Measure learning on the demo world: how fast each initialization learns the held-out person, and whether the
automatic best step agrees with the trait reader.

    python bench/learning.py [--steps 300] [--eval-every 25] [--inits auto,*] [--seeds 0,1] [--cfg 3]
                             [--judges 2] [--no-previews] [--no-likeness] [--out results.json]

For each initialization and training seed it trains the demo's embedding (15 photos of the held-out person,
4 vectors, lr 0.005, batch 4) the way the demo does: the trainer's likeness (world.photo_likeness: the person read
from the training photos, 64 pictures from unseen prompts and its own seeds, read as the reader's average
probability) chooses the step to keep; with --no-likeness the trainer keeps the lowest fixed-batch loss, as it
does with real photos. At every evaluation each judge - the trait reader looking at 32 pictures from four unseen
prompts and its own eight seeds, none of them the trainer's - gives the share of pictures that show the person.

It prints: the share before training, the best share, the first step that reached 80 %, the kept step and
whether its share is on the reader's plateau (not told apart from the best share by a one-sided two-proportion
test at 95%), the step the reader likes best (all judges' pictures pooled: the first within one picture of its
highest share), what the loss alone would have kept, the step each judge alone likes best, where --stop auto's
rule would have stopped and what it would have kept, and how firmly the reader names its best step: its pictures
drawn again (a bootstrap), how often two draws agree within 20% and how often the kept step is within 20% of a
draw's best - read as yes/no and as the reader's probabilities.

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
PREVIEW_PROMPTS = (
    "a photo of {name}",
    "a photo of {name}, smiling",
    "a photo of {name}, serious, on a beach",
    "a photo of {name}, in a forest",
)  # photo-like, as the training photos: never the unseen ones
PREVIEW_TOLERANCE = 0.07  # about one picture in 16
sys.path.insert(0, str(ROOT / "src"))


def photo_likeness_scorer(folder: Path, photos: list, name: str, cfg: float):
    """score(model, encoder) -> the share of 16 preview pictures that show the person of the training photos (each
    trait the photos' majority, as the trait reader reads them): what a trainer could measure on its own."""
    from tistudio.demo import world

    person = world.read_person(world.load_trait_reader(folder), photos)
    return world.likeness_scorer(folder, person, name, prompts=PREVIEW_PROMPTS, seeds=(0, 1, 2, 3), cfg=cfg)


def judge_seeds(judge: int) -> tuple[int, ...]:
    """Picture seeds of judge 0, 1, ...: disjoint sets of 8, none used in training or by the previews."""
    return tuple(range(1000 * (judge + 1), 1000 * (judge + 1) + 8))


def on_plateau(share: float, top: float, pictures: int) -> bool:
    """Whether a step's share cannot be told apart from the highest share: a one-sided two-proportion test at 95%
    (the difference is under 1.64 standard errors of the difference of two shares of `pictures` pictures each)."""
    spread = math.sqrt((share * (1 - share) + top * (1 - top)) / pictures)
    return top - share <= 1.64 * max(spread, 1 / pictures)


def off_by(step: int, reference: int) -> float:
    return round(abs(step - reference) / max(reference, 1), 3)


def resampled_best(steps: list[int], values: list[list[float]], kept: int, rounds: int = 2000) -> dict:
    """How firmly the reader names a best step: the pictures drawn again (a bootstrap: the same number, with
    replacement, each picture keeping its seed and prompt at every step), the best step (the first within one
    picture of the highest share) read off each draw. Returns how often two independent draws agree within 20%
    (the most any rule could be expected to agree with the reader) and how often the kept step is within 20% of a
    draw's best step."""
    import numpy as np

    table = np.asarray(values, dtype=np.float64)  # [evaluations, pictures]
    count = table.shape[1]
    rng = np.random.default_rng(0)
    picks = rng.integers(0, count, size=(rounds, count))
    curves = table[:, picks].mean(axis=2).T  # [rounds, evaluations]
    firsts = (curves >= curves.max(axis=1, keepdims=True) - 1 / count).argmax(axis=1)
    best = np.asarray(steps)[firsts]
    close = lambda a, b: np.abs(a - b) <= 0.2 * np.maximum(b, 1)  # noqa: E731
    return {
        "reader_with_itself": round(float(close(best[0::2], best[1::2]).mean()), 3),
        "kept_with_reader": round(float(close(kept, best).mean()), 3),
        "best_steps": {int(step): int((best == step).sum()) for step in sorted(set(best.tolist()))},
    }


def run_one(
    init: str,
    seed: int,
    steps: int,
    eval_every: int,
    cache: Path,
    model,
    folder: Path,
    work: Path,
    cfg: float,
    lr: str,
    vectors: int,
    judges: int,
    previews_too: bool,
    likeness_too: bool,
) -> dict:
    from tistudio.config import CreateOptions, TrainOptions
    from tistudio.demo import world
    from tistudio.demo.run import NAME, TEMPLATE, person_photos
    from tistudio.train.create import create_embedding
    from tistudio.train.evaluation import best_likeness_step, best_step, should_stop
    from tistudio.train.loop import train
    from tistudio.train.runfolder import read_eval_log

    photos = person_photos(work / "photos")
    template = work / "template.txt"
    template.write_text(TEMPLATE)
    embeddings = work / "embeddings"
    init_text = "" if init == "auto" else init
    create_embedding(
        CreateOptions(
            model="demo",
            name=NAME,
            vectors=vectors,
            init_text=init_text,
            overwrite=True,
            embeddings_dir=str(embeddings),
        ),
        cache_dir=cache,
        model=model,
    )
    pictures: list[tuple[list[bool], list[float]]] = []  # the judges' pictures of the current evaluation
    panel = [
        world.likeness_scorer(
            folder,
            world.HELD_OUT,
            NAME,
            seeds=judge_seeds(j),
            cfg=cfg,
            on_pictures=lambda shown, chances: pictures.append((shown, chances)),
        )
        for j in range(judges)
    ]
    photo_images = [Image.open(p) for p in sorted(photos.glob("*.png"))]
    own = photo_likeness_scorer(folder, photo_images, NAME, cfg)
    trainers = world.photo_likeness(folder, photo_images, NAME, cfg=cfg)  # what the demo's trainer measures
    previews: list[float] = []
    verdicts: list[list[float]] = []  # per evaluation, each judge's share
    per_picture: list[tuple[list[bool], list[float]]] = []  # per evaluation, all judges' pictures pooled
    measured: list[float] = []  # per evaluation, the trainer's likeness (when it has one)

    def judge_all(model, encoder) -> None:
        if previews_too:
            previews.append(own(model, encoder))  # the alternative rule's evidence; the trainer never sees it
        verdicts.append([judge(model, encoder) for judge in panel])
        per_picture.append(([yes for seen, _ in pictures for yes in seen], [c for _, seen in pictures for c in seen]))
        pictures.clear()

    def likeness(model, encoder) -> float:
        judge_all(model, encoder)
        measured.append(trainers(model, encoder))  # its pictures are never a judge's
        return measured[-1]

    started = time.monotonic()
    options = TrainOptions(
        model="demo",
        embedding=NAME,
        dataset=str(photos),
        embeddings_dir=str(embeddings),
        run_dir=str(work / "run"),
        template=str(template),
        batch_size=4,
        max_steps=steps,
        learning_rate=lr,
        eval_every=eval_every,
        preview_every=0,
        save_every=0,
        seed=seed,
    )
    # Without --no-likeness the trainer chooses by its likeness (as the demo does); with it, by the loss, the judges
    # looking on through a likeness that measures nothing for the trainer.
    result = train(options, cache_dir=cache, model=model, likeness=likeness if likeness_too else judge_all)
    seconds = time.monotonic() - started
    rows = read_eval_log(work / "run" / "eval.csv")
    steps_read = [row[0] for row in rows]
    # The judges' share at every evaluation: all their pictures pooled.
    shares = [(step, sum(v) / judges) for step, v in zip(steps_read, verdicts, strict=True)]
    top = max(like for _, like in shares)
    share_at = dict(shares)
    # The reader's best step: the first whose share (all judges' pictures pooled) is within one picture of the
    # highest share it saw. Each judge alone says the same from its own pictures: how far two judges' best steps
    # lie apart is how finely "the best step" can be told at all.
    reader_best = best_likeness_step(shares, 1 / (PICTURES * judges))
    by_judge = [
        best_likeness_step([(step, v[j]) for step, v in zip(steps_read, verdicts, strict=True)], 1 / PICTURES)
        for j in range(judges)
    ]
    neutral = json.loads((work / "run" / "options.json").read_text())["resolved"]["neutral_loss"]
    losses = [(s, loss) for s, loss, _ in rows]
    kept = result.best_step or result.step  # the kept step: the trainer's choice
    by_loss = best_step(losses, neutral)  # what the loss alone would keep (real photos: no likeness measure)
    # The same pictures read more finely: the reader's probability that each shows the person, averaged.
    chance_curve = [(step, sum(c) / len(c)) for step, (_, c) in zip(steps_read, per_picture, strict=True)]
    chance_best = best_likeness_step(chance_curve, 1 / (PICTURES * judges))
    firmness = {
        "shown": resampled_best(steps_read, [[float(y) for y in shown] for shown, _ in per_picture], kept),
        "chance": resampled_best(steps_read, [c for _, c in per_picture], kept),
    }
    scores = [(step, score) for step, score in zip(steps_read, previews, strict=False) if step > 0]
    by_previews = best_likeness_step(scores, PREVIEW_TOLERANCE) if scores else None
    stop_at = next((losses[i][0] for i in range(len(losses)) if should_stop(losses[: i + 1], neutral)), None)
    # What --stop auto would have kept: the best step of the evaluations up to where it stops.
    stop_kept = None
    if stop_at is not None:
        stop_kept = (
            best_likeness_step([(s, m) for s, m in zip(steps_read, measured, strict=True) if s <= stop_at])
            if measured
            else best_step([(s, loss) for s, loss in losses if s <= stop_at], neutral)
        )
    reached = next((s for s, like in shares if like >= 0.8), None)

    def plateau_mark(step: int) -> bool:
        return on_plateau(share_at[step], top, PICTURES * judges)

    return {
        "init": init,
        "seed": seed,
        "kept_by": "likeness" if measured else "loss",
        "share_before": shares[0][1],
        "share_best": top,
        "share_kept": share_at[kept],
        "first_step_80": reached,
        "kept_on_plateau": plateau_mark(kept),
        "kept_step": kept,
        "reader_best_step": reader_best,
        "agreement": off_by(kept, reader_best),
        "loss_kept_step": by_loss,
        "share_loss_kept": share_at[by_loss],
        "loss_kept_on_plateau": plateau_mark(by_loss),
        "agreement_loss": off_by(by_loss, reader_best),
        "auto_stop_step": stop_at,
        "auto_stop_kept": stop_kept,
        "share_auto_stop_kept": share_at.get(stop_kept),
        "best_by_judge": by_judge,
        # How many judges alone land within 20% of the pooled best: how often the reader agrees with itself.
        "judges_within_20": sum(off_by(step, reader_best) <= 0.2 for step in by_judge),
        "reader_plateau": [s for s, like in shares if on_plateau(like, top, PICTURES * judges)],
        "reader_best_by_chance": chance_best,
        "agreement_by_chance": off_by(kept, chance_best),
        "resampled": firmness,
        "preview_likeness_step": by_previews,
        "share_at_preview_likeness_step": share_at.get(by_previews),
        "agreement_preview_likeness": off_by(by_previews, reader_best) if scores else None,
        "train_seconds": round(seconds, 1),
        "shares": shares,
        "preview_likeness": scores,
        "verdicts": [(step, v) for step, v in zip(steps_read, verdicts, strict=True)],
        "losses": [(s, round(loss, 6)) for s, loss in losses],
        "likeness": [(s, round(m, 4)) for s, m in zip(steps_read, measured, strict=True)] if measured else [],
        "chance_shares": [(s, round(c, 4)) for s, c in chance_curve],
        "pictures": [
            (s, [int(y) for y in shown], [round(c, 4) for c in chances])
            for s, (shown, chances) in zip(steps_read, per_picture, strict=True)
        ],
    }


def demo_world() -> tuple[Path, object, Path]:
    """(cache, model, folder): the demo world model loaded offline, quietly, from TISTUDIO_CACHE (the benchmarks of
    the demo world share it)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tistudio.cli import quiet_third_party
    from tistudio.config import ModelOptions
    from tistudio.models.builtin import demo_model_dir
    from tistudio.models.loading import load_model

    quiet_third_party()
    cache = Path(os.environ.get("TISTUDIO_CACHE", Path.home() / ".cache" / "tistudio"))
    return cache, load_model(ModelOptions(model="demo"), cache), demo_model_dir(cache)


def write_arms(args, arms: list[dict]) -> None:
    """A demo-world comparison's arms and the arguments that ran them, as JSON at --out."""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "arms": arms}, indent=1))
    print(f"\nwritten {out}")


def train_arm(cache: Path, model, work: Path, photos: Path, measure, args, **changes) -> dict:
    """One arm of a demo-world comparison (bench/pivotal.py, bench/buckets.py): a fresh 4-vector embedding trained on
    `photos` with the demo's template, batch 4, lr 0.005 and `changes`; `measure(model, encoder)` -> (the likeness
    that picks the kept step, the evaluation's figures) at every --every steps. Its seconds, kept step and curve."""
    from tistudio.config import CreateOptions, TrainOptions
    from tistudio.demo.run import NAME, TEMPLATE
    from tistudio.train.create import create_embedding
    from tistudio.train.loop import train
    from tistudio.train.runfolder import read_eval_log

    (work / "template.txt").write_text(TEMPLATE)
    create_embedding(
        CreateOptions(model="demo", name=NAME, vectors=4, overwrite=True, embeddings_dir=str(work / "emb")),
        cache_dir=cache,
        model=model,
    )
    curve: list[dict] = []

    def likeness(model, encoder) -> float:
        score, figures = measure(model, encoder)
        curve.append(figures)
        return score

    options = TrainOptions(
        model="demo",
        embedding=NAME,
        dataset=str(photos),
        embeddings_dir=str(work / "emb"),
        run_dir=str(work / "run"),
        template=str(work / "template.txt"),
        batch_size=4,
        max_steps=args.steps,
        eval_every=args.every,
        likeness_every=args.every,
        preview_every=0,
        save_every=0,
        seed=args.seed,
        **changes,
    )
    started = time.monotonic()
    result = train(options, cache_dir=cache, model=model, likeness=likeness)
    seconds = time.monotonic() - started
    steps = [step for step, _, like in read_eval_log(work / "run" / "eval.csv") if like is not None]
    return {
        "seconds": round(seconds, 1),
        "kept_step": result.best_step or result.step,
        "curve": [{"step": s, **m} for s, m in zip(steps, curve, strict=True)],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--inits", default="auto,*")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--cfg", type=float, default=3.0, help="guidance of the scored pictures (default: %(default)s)")
    parser.add_argument("--lr", default="0.005")
    parser.add_argument("--vectors", type=int, default=4)
    parser.add_argument(
        "--judges",
        type=int,
        default=2,
        help="independent sets of 32 scored pictures (default: %(default)s); with 2 or more, the "
        "output also says how far apart their best steps are",
    )
    parser.add_argument("--no-previews", action="store_true", help="skip the preview-likeness alternative")
    parser.add_argument(
        "--no-likeness",
        action="store_true",
        help="train without the trainer's likeness (it then keeps the lowest loss; faster)",
    )
    parser.add_argument("--out", type=Path, help="also write every result, with its curves, to this JSON file")
    args = parser.parse_args()
    cache, model, folder = demo_world()
    results = []
    for init in args.inits.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            with tempfile.TemporaryDirectory() as work:
                results.append(
                    run_one(
                        init,
                        seed,
                        args.steps,
                        args.eval_every,
                        cache,
                        model,
                        folder,
                        Path(work),
                        args.cfg,
                        args.lr,
                        args.vectors,
                        args.judges,
                        not args.no_previews,
                        not args.no_likeness,
                    )
                )
            r = results[-1]
            judges = (
                (
                    f" (each judge alone: {', '.join(map(str, r['best_by_judge']))}; {r['judges_within_20']} of "
                    f"{args.judges} within 20%)"
                )
                if args.judges > 1
                else ""
            )
            previews = (
                (
                    f"by preview likeness {r['preview_likeness_step']} ({r['share_at_preview_likeness_step']:.0%}, "
                    f"off by {r['agreement_preview_likeness']:.0%}); "
                )
                if r["preview_likeness"]
                else ""
            )
            plateau = (
                f", on the reader's plateau {r['reader_plateau']}"
                if r["kept_on_plateau"]
                else f", below the reader's plateau {r['reader_plateau']}"
            )
            stop = (
                f" keeping {r['auto_stop_kept']} ({r['share_auto_stop_kept']:.0%})"
                if r["auto_stop_kept"] is not None
                else ""
            )
            firm = r["resampled"]
            chance = (
                f"; read by the reader's probabilities: best step {r['reader_best_by_chance']} (off by "
                f"{r['agreement_by_chance']:.0%}); the pictures drawn again, the reader agrees with itself "
                f"within 20% in {firm['shown']['reader_with_itself']:.0%} (probabilities "
                f"{firm['chance']['reader_with_itself']:.0%}), the kept step with the reader in "
                f"{firm['shown']['kept_with_reader']:.0%} ({firm['chance']['kept_with_reader']:.0%})"
            )
            loss = (
                f"; the loss alone would keep {r['loss_kept_step']} ({r['share_loss_kept']:.0%}, off by "
                f"{r['agreement_loss']:.0%})"
                if r["kept_by"] == "likeness"
                else ""
            )
            print(
                f"init {init!r:10} seed {seed}: share {r['share_before']:.0%} -> best {r['share_best']:.0%} "
                f"(kept {r['share_kept']:.0%}{plateau}); 80% first at step {r['first_step_80']}; kept step "
                f"{r['kept_step']} (by {r['kept_by']}), the reader's best {r['reader_best_step']}{judges} (off by "
                f"{r['agreement']:.0%}){loss}; {previews}--stop auto at {r['auto_stop_step']}{stop}{chance}; "
                f"{r['train_seconds']} s",
                flush=True,
            )
            if args.out:
                args.out.write_text(json.dumps(results))
    curves = ("shares", "chance_shares", "likeness", "preview_likeness", "verdicts", "losses")
    print(json.dumps([{k: v for k, v in r.items() if k not in (*curves, "pictures")} for r in results], indent=2))
    print(json.dumps({f"{r['init']}/{r['seed']}": {key: r[key] for key in curves} for r in results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
