"""How small and how rare can the fixed-batch evaluation be before the kept step suffers? A replay on the demo world.

    python bench/evaluation.py [--steps 300] [--seeds 0,1,2,3] [--batch-seeds 5] [--out F.json]

Each training seed trains the demo's embedding (the demo's recipe, the loss keeping the step, as with real photos)
and, at every 25 steps, looks at the vectors several ways at once, none of which changes the training:
- the reader: 64 pictures from the four unseen prompts and sixteen judge seeds, the share showing the person;
- fixed batches of 4, 8, 16 and 32 samples, timesteps drawn at random (the trainer's way until now) or stratified,
  each drawn with --batch-seeds different seeds: their loss.
Each fixed batch's loss curve then keeps a step by the trainer's own rule (evaluation.best_step), read at every 25
steps, and thinned: every 50 throughout, or in the trainer's stages (RULES below) from step 500 and from the demo
world's faster pace. It prints, per way of evaluating, how often the kept step lands within 20% of the reader's best
step, how often it is on the reader's plateau (bench/learning.py's one-sided test at 95%), how often it is the step
the trainer's former batch (16 samples, random timesteps) keeps, the mean share of pictures showing the person
at the kept step, and the kept step's excess loss: its loss on all the other fixed batches together (300 samples a
seed, precise_curve) above the lowest of that precise curve, as a share of the drop from the start to that lowest -
0% where the small, thinned batch kept a step as good by the loss as a precise one could.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
SIZES = (4, 8, 16, 32)
JUDGE_SEEDS = tuple(range(1000, 1008)) + tuple(range(2000, 2008))


# The evaluation rules replayed: every 25 or 50 steps, and the trainer's stages (evaluation.evaluation_interval:
# every 25 up to S, 50 up to 3S, 100 up to 7S, ...) from its S = 500 and from the demo world's pace: it learns in
# about a tenth of a real run's steps (the reader's best is near step 250), so S = 50 and 100 put the thinning where
# the curve still moves, as S = 500 does in a 3000-step run on real photos.
RULES = ("every 25", "every 50", "stages from 500", "stages from 100", "stages from 50")


def thinned(curve: list[tuple[int, float]], rule: str) -> list[tuple[int, float]]:
    from tistudio.train.evaluation import evaluation_due

    if rule == "every 25":
        return curve
    if rule == "every 50":
        return [(s, v) for s, v in curve if s % 50 == 0]
    settled = int(rule.rsplit(" ", 1)[1])
    last = curve[-1][0]  # the trainer always evaluates the last step
    return [(s, v) for s, v in curve if s == 0 or s == last or evaluation_due(s, 25, settled)]


def run_seed(seed: int, steps: int, batch_seeds: int, cache: Path, model, folder: Path, work: Path) -> dict:
    from tistudio.config import CreateOptions, TrainOptions
    from tistudio.demo import world
    from tistudio.demo.run import NAME, TEMPLATE, person_photos
    from tistudio.models.conditioning import PromptEncoder
    from tistudio.prepare.dataset import load_dataset
    from tistudio.templates import load_template
    from tistudio.train.create import create_embedding
    from tistudio.train.evaluation import evaluation_batch, evaluation_loss
    from tistudio.train.loop import encode_samples, train
    from tistudio.train.objective import NoisePrediction

    photos = person_photos(work / "photos")
    template_file = work / "template.txt"
    template_file.write_text(TEMPLATE)
    embeddings = work / "embeddings"
    create_embedding(
        CreateOptions(model="demo", name=NAME, vectors=4, embeddings_dir=str(embeddings)), cache_dir=cache, model=model
    )
    options = TrainOptions(
        model="demo",
        embedding=NAME,
        dataset=str(photos),
        embeddings_dir=str(embeddings),
        run_dir=str(work / "run"),
        template=str(template_file),
        batch_size=4,
        max_steps=steps,
        eval_every=25,
        preview_every=0,
        save_every=0,
        seed=seed,
        likeness="off",
    )
    template = load_template(str(template_file))
    samples = encode_samples(model, load_dataset(photos), model.native_size, template, NAME, options)
    batches = {
        (size, stratified, b): evaluation_batch(
            samples.latents,
            samples.captions,
            template,
            NAME,
            100 + b,
            NoisePrediction(model, PromptEncoder.for_model(model)),
            size=size,
            stratified=stratified,
        )
        for size in SIZES
        for stratified in (False, True)
        for b in range(batch_seeds)
    }
    judge = world.likeness_scorer(folder, world.HELD_OUT, NAME, seeds=JUDGE_SEEDS)
    steps_seen: list[int] = []
    shares: list[float] = []
    losses: dict[tuple, list[float]] = {key: [] for key in batches}

    def look(model, encoder) -> None:  # measures for the replay; the trainer is told nothing
        shares.append(judge(model, encoder))
        for key, batch in batches.items():
            losses[key].append(evaluation_loss(NoisePrediction(model, encoder), samples.latents, batch))

    train(
        options,
        cache_dir=cache,
        model=model,
        likeness=look,
        on_progress=lambda p: steps_seen.append(p.step) if p.event == "eval" else None,
    )
    return {
        "seed": seed,
        "steps": steps_seen,
        "shares": shares,
        "losses": {
            f"{size}/{'stratified' if strat else 'random'}/{b}": values for (size, strat, b), values in losses.items()
        },
    }


def replay(runs: list[dict], batch_seeds: int) -> list[dict]:
    from learning import on_plateau

    from tistudio.train.evaluation import best_likeness_step, best_step

    rows = []
    for size in SIZES:
        for timesteps in ("random", "stratified"):
            for rule in RULES:
                within = same = plateau = count = 0
                kept_shares, excess = [], []
                for run in runs:
                    share_at = dict(zip(run["steps"], run["shares"], strict=True))
                    pictures = 4 * len(JUDGE_SEEDS)
                    reader = best_likeness_step(list(share_at.items()), 1 / pictures)
                    top = max(share for step, share in share_at.items() if step > 0)
                    for b in range(batch_seeds):
                        curve = list(zip(run["steps"], run["losses"][f"{size}/{timesteps}/{b}"], strict=True))
                        former = best_step(list(zip(run["steps"], run["losses"][f"16/random/{b}"], strict=True)), None)
                        kept = best_step(thinned(curve, rule), None)
                        precise = precise_curve(run, f"{size}/{timesteps}/{b}")
                        lowest = min(precise[1:])
                        excess.append((precise[run["steps"].index(kept)] - lowest) / (precise[0] - lowest))
                        count += 1
                        within += abs(kept - reader) <= 0.2 * reader
                        same += kept == former
                        plateau += on_plateau(share_at[kept], top, pictures)
                        kept_shares.append(share_at[kept])
                rows.append(
                    {
                        "samples": size,
                        "timesteps": timesteps,
                        "evaluations": rule,
                        "within_20_of_reader": within / count,
                        "same_as_former": same / count,
                        "on_reader_plateau": plateau / count,
                        "share_at_kept": sum(kept_shares) / count,
                        "excess_loss": sum(excess) / count,
                        "replays": count,
                    }
                )
    return rows


def precise_curve(run: dict, leave_out: str) -> list[float]:
    """The run's loss at each evaluation as precisely as the replay knows it: the mean over every fixed batch's samples
    (all sizes and draws, 300 samples a seed) but the batch under test's own."""
    weights = {key: int(key.split("/")[0]) for key in run["losses"] if key != leave_out}
    total = sum(weights.values())
    return [sum(weights[key] * run["losses"][key][i] for key in weights) / total for i in range(len(run["steps"]))]


def print_replay(runs: list[dict], batch_seeds: int) -> None:
    print(
        f"{'samples':>7} {'timesteps':>10} {'evaluations':>26} {'within 20% of reader':>21} "
        f"{'on its plateau':>15} {'same as former':>15} {'share at kept':>14} {'excess loss':>12}"
    )
    for row in replay(runs, batch_seeds):
        print(
            f"{row['samples']:>7} {row['timesteps']:>10} {row['evaluations']:>26} "
            f"{row['within_20_of_reader']:>21.0%} {row['on_reader_plateau']:>15.0%} {row['same_as_former']:>15.0%} "
            f"{row['share_at_kept']:>14.1%} {row['excess_loss']:>12.2%}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--batch-seeds", type=int, default=5)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--replay", type=Path, help="only replay the runs of an earlier --out file")
    args = parser.parse_args()
    if args.replay:
        print_replay(json.loads(args.replay.read_text()), args.batch_seeds)
        return 0
    from learning import demo_world

    cache, model, folder = demo_world()
    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        with tempfile.TemporaryDirectory() as work:
            runs.append(run_seed(seed, args.steps, args.batch_seeds, cache, model, folder, Path(work)))
        print(f"seed {seed}: shares {[round(s, 2) for s in runs[-1]['shares']]}", flush=True)
        if args.out:
            args.out.write_text(json.dumps(runs))
    print_replay(runs, args.batch_seeds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
