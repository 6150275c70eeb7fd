"""What a whole training run costs beyond its training steps: evaluations, previews, saves and the set-up.

    python bench/wholerun.py [--model sd15] [--size 256] [--steps 50] [--eval-samples 8,16] [--likeness]
                             [--peer-step-s 8.0] [--json F]

It runs real trainings (full-size SD1.5 architecture with seeded random weights by default, batch 1, the subject
template, 8 photos) and times every event the trainer reports: a training step (the median gap between two steps),
an evaluation of the fixed batch for each --eval-samples (the gap from a step to its evaluation), a preview (DPM++
2M Karras, 20 steps, CFG 7, at the training size), a save (embedding copy and resume state), and the set-up
(encoding the photos, and the person-like start's loss where the run starts elsewhere). The first run trains
--steps steps with an evaluation, a preview and a save every 25; each other sample count trains 2 steps with an
evaluation after each. With --likeness the first run trains on photos of a face (tests/data's two portraits,
cropped and mirrored) with --likeness on, and its evaluations at step 0 and at the last step also draw and score the
face-likeness pictures (at defaults: 4 pictures of 12 steps, at the first evaluation of every 250 steps to step
1500 and of every 500 after it, and at the last).

From these it works out a default run (3000 steps; `--eval-every 25` in the trainer's stages - every 25 steps to
500, 50 to 1500, 100 after; a preview and a copy every 500; the model's load is left out) - its wall time and the
share that is not a training step - for each sample count, and the same with an evaluation every 25 steps throughout
(the rule before this release). With --peer-step-s (the peer's seconds per step, measured by bench/speed.py on the
same machine) it adds the peer's whole run: its steps alone, as diffusers' example at its defaults evaluates nothing
and saves only the vectors.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
DEFAULT_STEPS, PREVIEW_EVERY, SAVE_EVERY, EVAL_EVERY, LIKENESS_EVERY = 3000, 500, 500, 25, 250


def timed_run(model, options_for, work: Path, steps: int, every: int, eval_samples: int) -> dict:
    from tistudio.train.loop import train

    events: list[tuple[str, float]] = []
    liked: set[float] = set()  # the times of evaluations that measured the face likeness

    def seen(progress) -> None:
        events.append((str(progress.event), time.perf_counter()))
        if progress.event == "eval" and progress.likeness is not None:
            liked.add(events[-1][1])

    started = time.perf_counter()
    train(options_for(work, steps, every, eval_samples), cache_dir=work, model=model, on_progress=seen)
    wall = time.perf_counter() - started

    def gaps(kind: str, until: float = float("inf"), since: float = 0.0, likeness: bool | None = False) -> list[float]:
        """Each event of this kind: the seconds since the event before it (a save follows its step's evaluation,
        a preview its save); evaluations with or without the likeness, as asked."""
        return [
            t - events[i - 1][1]
            for i, (event, t) in enumerate(events)
            if event == kind and i and since < t <= until and (likeness is None or (t in liked) == likeness)
        ]

    begin = next(t for event, t in events if event == "start")
    first_step = next(t for event, t in events if event == "step")
    start_eval, start_preview = sum(gaps("eval", until=begin, likeness=None)), sum(gaps("preview", until=begin))
    steps = [
        t - events[i - 1][1]
        for i, (event, t) in enumerate(events)
        if event == "step" and i and events[i - 1][0] == "step"
    ]
    return {
        "wall_s": wall,
        "setup_s": begin - started - start_eval - start_preview,
        "first_step_s": first_step - begin,
        "step_s": statistics.median(steps) if steps else None,
        "eval_s": gaps("eval", until=begin) + gaps("eval", since=begin),
        "eval_with_likeness_s": gaps("eval", until=begin, likeness=True) + gaps("eval", since=begin, likeness=True),
        "preview_s": gaps("preview", until=begin) + gaps("preview", since=begin),
        "save_s": gaps("save"),
    }


def projected(
    step_s: float,
    eval_s: float,
    preview_s: float,
    save_s: float,
    setup_s: float,
    thinned: bool,
    likeness_s: float = 0.0,
) -> dict:
    """A default run's wall time from the measured parts; `likeness_s`: what a face-likeness measurement adds to its
    evaluation (measured where evaluation.likeness_due says and at the last step, as the trainer does)."""
    from tistudio.train.evaluation import evaluation_due, likeness_due

    at = [
        0,
        *(
            s
            for s in range(1, DEFAULT_STEPS + 1)
            if (evaluation_due(s, EVAL_EVERY) if thinned else s % EVAL_EVERY == 0)
        ),
    ]
    likeness_at: list[int] = []
    for s in at:
        if s == DEFAULT_STEPS or likeness_due(s, likeness_at[-1] if likeness_at else -1, LIKENESS_EVERY):
            likeness_at.append(s)
    previews = 1 + DEFAULT_STEPS // PREVIEW_EVERY
    saves = DEFAULT_STEPS // SAVE_EVERY  # the copies, the last one being the final save
    parts = {
        "training": DEFAULT_STEPS * step_s,
        "evaluation": len(at) * eval_s,
        "previews": previews * preview_s,
        "saves": saves * save_s,
        "set-up": setup_s,
    }
    if likeness_s:
        parts["face likeness"] = len(likeness_at) * likeness_s
    total = sum(parts.values())
    return {
        "evaluations": len(at),
        "likeness_measurements": len(likeness_at) if likeness_s else 0,
        "parts_s": {k: round(v, 1) for k, v in parts.items()},
        "total_s": round(total, 1),
        "not_training": round(1 - parts["training"] / total, 4),
        "face_likeness_share": round(parts.get("face likeness", 0.0) / total, 4),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15", help="sd15, tiny or a diffusers folder (default: %(default)s)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--eval-samples", default="8,16")
    parser.add_argument(
        "--likeness",
        action="store_true",
        help="train the first run on photos of a face with the face likeness on (tistudio[faces])",
    )
    parser.add_argument("--peer-step-s", type=float, help="the peer's seconds per step on this machine")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--parts",
        type=Path,
        help="work out the default run again from the parts an earlier --json measured (no training)",
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.parts:
        earlier = json.loads(args.parts.read_text())
        runs = {int(samples): run for samples, run in earlier["runs"].items()}
        return report_runs(runs, list(runs), earlier["machine"], earlier["model"], earlier["size"], args)
    from speed import machine

    counts = [int(c) for c in args.eval_samples.split(",")]
    return report_runs(measure(args, counts), counts, machine(), args.model, args.size, args)


def measure(args: argparse.Namespace, counts: list[int]) -> dict[int, dict]:
    """The timed runs: the first trains args.steps steps; each other sample count, 2 steps."""
    from speed import make_photos, model_folder

    from tistudio.cli import quiet_third_party
    from tistudio.config import CreateOptions, ModelOptions, TrainOptions
    from tistudio.models.loading import load_model
    from tistudio.train.create import create_embedding

    quiet_third_party()
    cache = Path(os.environ.get("TISTUDIO_CACHE", Path.home() / ".cache" / "tistudio"))
    folder = str(model_folder(args.model, cache))
    model = load_model(ModelOptions(model=folder, device="cpu", precision="fp32"), cache)
    with tempfile.TemporaryDirectory() as scratch:
        photos = make_photos(Path(scratch) / "photos", args.size)
        faces = face_photos(Path(scratch) / "faces", args.size) if args.likeness else photos

        def options_for(work: Path, steps: int, every: int, samples: int) -> TrainOptions:
            create_embedding(
                CreateOptions(
                    model=folder, name="benchword", vectors=4, overwrite=True, embeddings_dir=str(work / "embeddings")
                ),
                cache_dir=cache,
                model=model,
            )
            whole = steps > 2
            return TrainOptions(
                model=folder,
                embedding="benchword",
                dataset=str(faces if whole else photos),
                size=args.size,
                embeddings_dir=str(work / "embeddings"),
                run_dir=str(work / "run"),
                batch_size=1,
                max_steps=steps,
                eval_every=every,
                preview_every=every if whole else 0,
                save_every=every if whole else 0,
                eval_samples=samples,
                likeness="on" if whole and args.likeness else "off",
            )

        runs = {}
        for index, samples in enumerate(counts):
            with tempfile.TemporaryDirectory() as work:
                whole = index == 0
                runs[samples] = timed_run(
                    model, options_for, Path(work), args.steps if whole else 2, 25 if whole else 1, samples
                )
            r = runs[samples]
            print(
                f"{samples:>3} samples: wall {r['wall_s']:.1f} s; step {r['step_s'] or 0:.2f} s; evaluations "
                f"{[round(x, 1) for x in r['eval_s']]} s, with the face likeness "
                f"{[round(x, 1) for x in r['eval_with_likeness_s']]} s; previews "
                f"{[round(x, 1) for x in r['preview_s']]} s; saves {[round(x, 2) for x in r['save_s']]} s; set-up "
                f"{r['setup_s']:.1f} s",
                flush=True,
            )
    return runs


def report_runs(
    runs: dict[int, dict], counts: list[int], machine: dict, model: str, size: int, args: argparse.Namespace
) -> int:
    """The default run worked out from the measured parts, printed (and written to --json)."""
    first = runs[counts[0]]
    step_s = first["step_s"]
    preview_s = statistics.mean(first["preview_s"]) if first["preview_s"] else 0.0
    save_s = statistics.mean(first["save_s"]) if first["save_s"] else 0.0
    likeness_s = (
        statistics.median(first["eval_with_likeness_s"]) - statistics.median(first["eval_s"])
        if first["eval_with_likeness_s"]
        else 0.0
    )
    report = {
        "machine": machine,
        "model": model,
        "size": size,
        "step_s": step_s,
        "preview_s": preview_s,
        "save_s": save_s,
        "likeness_s": likeness_s,
        "runs": runs,
        "default_run": {},
    }
    print(
        f"\na default run ({DEFAULT_STEPS} steps, batch 1, {size} px; a training step {step_s:.2f} s, a preview "
        f"{preview_s:.1f} s, a save {save_s:.2f} s"
        + (f", a face-likeness measurement {likeness_s:.1f} s" if likeness_s else "")
        + "):"
    )
    for samples in counts:
        eval_s = statistics.median(runs[samples]["eval_s"])
        for thinned in (True, False):
            for like in (0.0, likeness_s) if likeness_s else (0.0,):
                p = projected(step_s, eval_s, preview_s, save_s, runs[samples]["setup_s"], thinned, like)
                rule = ("every 25, 50 after step 500, 100 after 1500" if thinned else "every 25 throughout") + (
                    ", face likeness" if like else ""
                )
                report["default_run"][f"{samples} samples, {rule}"] = p
                print(
                    f"  {samples:>3} samples ({eval_s:.1f} s an evaluation), {rule:44}: {p['evaluations']} "
                    f"evaluations, {p['total_s'] / 3600:.2f} h, not training {p['not_training']:.1%}"
                    + (f" (the face likeness {p['face_likeness_share']:.1%})" if like else "")
                    + f" {p['parts_s']}"
                )
    if args.peer_step_s:
        from tistudio.config import TrainOptions

        default = TrainOptions.__dataclass_fields__["eval_samples"].default
        peer = DEFAULT_STEPS * args.peer_step_s
        ours = report["default_run"][
            f"{default if default in runs else counts[0]} samples, every 25, 50 after step 500, 100 after 1500"
        ]["total_s"]
        report["peer_default_run_s"] = peer
        print(
            f"  the peer: {peer / 3600:.2f} h ({args.peer_step_s} s a step); tistudio's whole run at the default "
            f"is {peer / ours:.2f}x as fast (per step {args.peer_step_s / step_s:.2f}x)"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


def face_photos(folder: Path, size: int) -> Path:
    """8 photos of a face at the training size: tests/data's two portraits, cropped four ways and mirrored."""
    from PIL import Image, ImageOps

    folder.mkdir(parents=True, exist_ok=True)
    index = 0
    for name in ("astronaut.jpg", "grace_hopper.jpg"):
        source = Image.open(ROOT / "tests" / "data" / name).convert("RGB")
        w, h = source.size
        side = min(w, h)
        for left, top, mirror in (
            (0, 0, False),
            (w - side, h - side, True),
            ((w - side) // 2, 0, True),
            ((w - side) // 2, (h - side) // 2, False),
        ):
            crop = source.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)
            (ImageOps.mirror(crop) if mirror else crop).save(folder / f"face_{index:02d}.png")
            index += 1
    return folder


if __name__ == "__main__":
    sys.exit(main())
