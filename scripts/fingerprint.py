"""Fingerprint what tistudio writes, to show that a change of structure changed no result.

Creates, trains (two sittings, with most training options on), resumes and generates on the tiny SD1 and SD2
models and on the demo world model, then prints one sha256 per file written (embeddings, copies, resume state,
loss and eval logs, previews, generated images and their parameters). Run it before and after a refactoring and
diff the outputs: any line that differs is a behaviour change.

    python scripts/fingerprint.py OUT_DIR > before.txt     # ... change the code ...
    python scripts/fingerprint.py OUT_DIR > after.txt && diff before.txt after.txt

OUT_DIR must be the same folder both times (paths end up in options.json). Takes about two minutes on 2 cores.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SKIP = {"options.json", "report.html"}  # hold paths, times and versions


def digest(path: Path) -> str:
    if path.suffix == ".png":
        from PIL import Image

        with Image.open(path) as image:  # pixels and parameters, not PNG encoder details
            data = image.tobytes() + repr(sorted(image.text.items())).encode()
        return hashlib.sha256(data).hexdigest()[:16]
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:  # tensors and metadata minus the version stamp
            meta = {k: v for k, v in (handle.metadata() or {}).items() if k != "tistudio_version"}
            blobs = {key: handle.get_tensor(key).numpy().tobytes() for key in handle.keys()}  # noqa: SIM118
        if path.parent.name == "state":  # resume state: its values, whatever their names
            data = b"".join(sorted(blobs.values()))
        else:
            data = b"".join(key.encode() + blob for key, blob in sorted(blobs.items()))
        return hashlib.sha256(data + repr(sorted(meta.items())).encode()).hexdigest()[:16]
    if path.suffix == ".json" and path.parent.name == "state":
        import json

        data = json.loads(path.read_text())
        data.pop("tistudio_version", None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def listing(root: Path) -> list[str]:
    lines = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.name in SKIP or path.name.startswith("."):
            continue
        lines.append(f"{path.relative_to(root)} {digest(path)}")
    return lines


def tiny_runs(out: Path, cache: Path) -> None:
    from tistudio.config import CreateOptions, GenerateOptions, ModelOptions, TrainOptions
    from tistudio.generate.images import generate
    from tistudio.models.builtin import build_tiny_model
    from tistudio.models.loading import load_model
    from tistudio.train.create import create_embedding

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from corpus import make_photos

    photos = make_photos(out / "photos", count=6, seed=0)
    for family, seed in (("sd1", 0), ("sd2", 1)):
        folder = build_tiny_model(out / f"model-{family}", family=family, seed=seed)
        model = load_model(ModelOptions(model=str(folder)), cache)
        work = out / family
        emb = str(work / "emb")
        create_embedding(
            CreateOptions(model="-", name="tomtut", init_text="toy figure", vectors=3, embeddings_dir=emb),
            cache_dir=cache,
            model=model,
        )
        create_embedding(
            CreateOptions(model="-", name="badhands", vectors=2, embeddings_dir=emb), cache_dir=cache, model=model
        )
        common = dict(
            model="-",
            embedding="tomtut",
            dataset=str(photos),
            embeddings_dir=emb,
            run_dir=str(work / "run"),
            learning_rate="0.02:4, 0.005",
            batch_size=2,
            gradient_accumulation=2,
            flip=True,
            shuffle_tags=True,
            tag_dropout=0.2,
            template="subject_filewords",
            eval_every=2,
            preview_every=3,
            save_every=3,
            preview_steps=3,
            max_norm=3.0,
            init_pull=0.1,
            clip_grad_norm=1.0,
            weight_decay=0.01,
            seed=7,
            size=64,
        )
        from tistudio.train.loop import train

        train(TrainOptions(**common, max_steps=7), cache_dir=cache, model=model)
        train(TrainOptions(**common, max_steps=12), cache_dir=cache, model=model)
        # A second embedding trained with plainer options, --stop auto and final=last.
        train(
            TrainOptions(
                model="-",
                embedding="badhands",
                dataset=str(photos),
                embeddings_dir=emb,
                run_dir=str(work / "run-badhands"),
                max_steps=6,
                eval_every=1,
                preview_every=0,
                save_every=0,
                stop="auto",
                final="last",
                size=64,
                clip_skip=2,
            ),
            cache_dir=cache,
            model=model,
        )
        for index, (prompt, negative, sampler) in enumerate(
            [
                ("a photo of (tomtut:1.3) on a beach", "badhands, blurry", "DPM++ 2M Karras"),
                ("a [painting] of tomtut BREAK at night", "", "Euler a"),
                (", ".join(["a photo of tomtut"] * 20), "(badhands)", "DDIM"),
            ]
        ):
            generate(
                GenerateOptions(
                    model="-",
                    prompt=prompt,
                    negative_prompt=negative,
                    sampler=sampler,
                    steps=4,
                    seed=40 + index,
                    batch=2,
                    size="64x64",
                    embeddings_dir=emb,
                    out_dir=str(work / "images"),
                    clip_skip=1 + index % 2,
                ),
                cache_dir=cache,
                model=model,
            )


def demo_run(out: Path, cache: Path) -> None:
    from tistudio.demo.run import run_demo

    run_demo(out / "demo", cache_dir=cache, steps=50)


def main() -> int:
    out = Path(sys.argv[1]).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cache = out / "cache"
    logging.basicConfig(level=logging.WARNING)
    from tistudio.cli import quiet_third_party

    quiet_third_party()
    tiny_runs(out, cache)
    demo_run(out, cache)
    for part in ("sd1", "sd2", "demo"):
        for line in listing(out / part):
            print(f"{part}/{line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
