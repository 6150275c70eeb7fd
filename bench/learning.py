"""Measure learning on the demo world: how fast each initialization learns the held-out person, and whether the
automatic best step (the lowest fixed-batch loss, no pictures) agrees with the trait reader.

    python bench/learning.py [--steps 400] [--eval-every 20] [--inits auto,person,*] [--seeds 0,1]

For each initialization and training seed it trains the demo's embedding (15 photos of the held-out person,
4 vectors, lr 0.005, batch 4) with the trait reader scoring 32 pictures from unseen prompts and seeds (no
classifier-free guidance) at every evaluation, then prints: the share before training, the best share, the first
step that reached 80 %, the step with the lowest fixed-batch loss, the step the reader likes best (the first to
reach its highest share), and where --stop auto's rule would have stopped. Timings are of this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PICTURES = 32  # scored at every evaluation: 4 unseen prompts x 8 seeds
sys.path.insert(0, str(ROOT / "src"))


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
    scorer = world.likeness_scorer(folder, world.HELD_OUT, NAME, cfg=cfg)
    started = time.monotonic()
    result = train(TrainOptions(model="demo", embedding=NAME, dataset=str(photos), embeddings_dir=str(embeddings),
                                run_dir=str(work / "run"), template=str(template), batch_size=4, max_steps=steps,
                                learning_rate=lr, eval_every=eval_every, preview_every=0, save_every=0, seed=seed),
                   cache_dir=cache, model=model, likeness=scorer)
    seconds = time.monotonic() - started
    rows = read_eval_log(work / "run" / "eval.csv")
    shares = [(s, like) for s, _, like in rows if like is not None]
    top = max(like for _, like in shares)
    # The reader's best step: the first whose share is within one picture of the highest share it saw.
    reader_best = next(s for s, like in shares if like >= top - 1 / PICTURES)
    kept = result.best_step or result.step  # the kept step: the first on the fixed-batch loss floor
    stop_at = next((rows[i][0] for i in range(len(rows)) if converged([r[1] for r in rows[: i + 1]])), None)
    reached = next((s for s, like in shares if like >= 0.8), None)
    return {"init": init, "seed": seed, "share_before": shares[0][1], "share_best": top,
            "share_kept": next(like for s, like in shares if s == kept), "first_step_80": reached,
            "kept_step": kept, "reader_best_step": reader_best, "auto_stop_step": stop_at,
            "agreement": round(abs(kept - reader_best) / max(reader_best, 1), 3),
            "train_seconds": round(seconds, 1), "shares": shares,
            "losses": [(s, round(loss, 6)) for s, loss, _ in rows]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--inits", default="auto,person,*")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--cfg", type=float, default=1.0, help="guidance of the scored pictures (default: %(default)s)")
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
                  f"{r['kept_step']}, by reader {r['reader_best_step']} (off by {r['agreement']:.0%}); "
                  f"--stop auto at {r['auto_stop_step']}; {r['train_seconds']} s", flush=True)
    print(json.dumps([{k: v for k, v in r.items() if k not in ("shares", "losses")} for r in results], indent=2))
    print(json.dumps({f"{r['init']}/{r['seed']}": {"shares": r["shares"], "losses": r["losses"]} for r in results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
