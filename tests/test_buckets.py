"""Aspect-ratio buckets (issue 32): photos keep their shape from prepare to training - the buckets are kohya's and
SDXL's, prepare cuts each photo to the bucket nearest its aspect with the face inside, a run draws every micro-batch
from one bucket and resumes bit for bit, and SDXL's time_ids carry the real crop."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

from corpus import SHAPES, shaped_photos
from test_train import options as train_options
from tistudio.cli import main
from tistudio.config import CreateOptions, PrepareOptions, TrainOptions
from tistudio.embeddings.files import read_embedding
from tistudio.errors import OptionError
from tistudio.prepare.buckets import bucket_sizes, choose_buckets, nearest_bucket
from tistudio.prepare.dataset import load_dataset
from tistudio.prepare.preprocess import bucketed, prepare
from tistudio.train import loop
from tistudio.train.create import create_embedding

DATA = Path(__file__).with_name("data")


def test_the_buckets_are_kohyas_for_512_and_sdxls_own_for_1024() -> None:
    assert bucket_sizes(512) == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]
    sdxl = [(768, 1344), (832, 1216), (896, 1152), (960, 1088), (1024, 1024)]
    assert bucket_sizes(1024) == sdxl + [(h, w) for w, h in reversed(sdxl[:-1])]
    for size in (64, 512, 768, 1024):
        for width, height in bucket_sizes(size):
            assert width * height <= size * size and width % 8 == 0 and height % 8 == 0
            assert max(width, height) <= 2 * min(width, height)
    buckets = bucket_sizes(512)
    assert nearest_bucket(600, 900, buckets) == (384, 640)  # a 2:3 portrait
    assert nearest_bucket(4000, 3000, buckets) == (576, 448)  # a 4:3 holiday photo
    assert nearest_bucket(900, 900, buckets) == (512, 512)
    assert choose_buckets([(600, 900), (4000, 3000)], 512, on=False) == [(512, 512)] * 2
    # prepare's auto: buckets at SDXL's size, squares at SD1's and SD2's (whose training defaults to squares)
    assert [bucketed(PrepareOptions(photos="p", out="o", size=size)) for size in (512, 768, 1024)] == [0, 0, 1]


def test_the_fixed_evaluation_batch_takes_the_buckets_in_turn(sd1_model) -> None:
    from tistudio.models.conditioning import PromptEncoder
    from tistudio.train.evaluation import evaluation_batch, evaluation_loss
    from tistudio.train.latents import Rows
    from tistudio.train.objective import NoisePrediction

    shapes = [(4, 10, 6)] * 4 + [(4, 6, 10)] * 2 + [(4, 8, 8)] * 3  # tall, wide and square latents, in that order
    latents = Rows([torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i, shape in enumerate(shapes)])
    denoiser = NoisePrediction(sd1_model, PromptEncoder.for_model(sd1_model))
    batch = evaluation_batch(latents, ["a"] * 9, ("a photo of [name]",), "tomtut", seed=1, draws=denoiser, size=3)
    assert {latents.shape(i) for i in batch.indices} == {(4, 10, 6), (4, 6, 10), (4, 8, 8)}  # 3 samples, 3 buckets
    assert [tuple(noise.shape) for noise in batch.noise] == [latents.shape(i) for i in batch.indices]
    assert evaluation_loss(denoiser, latents, batch) > 0
    with pytest.raises(ValueError, match="one shape"):
        latents.take([0, 4])  # a batch never mixes buckets


def test_prepare_keeps_each_photos_shape_with_the_face_inside(tmp_path) -> None:
    from tistudio.prepare.faces import FaceDetector

    face = Image.open(DATA / "astronaut.jpg").convert("RGB")  # 512 x 512, the face near the top
    photos = tmp_path / "photos"
    photos.mkdir()
    tall = Image.new("RGB", (512, 900), (90, 90, 90))
    tall.paste(face, (0, 0))
    tall.save(photos / "portrait.png")
    Image.new("L", tall.size, 255).save(photos / "portrait.mask.png")  # a mask is cut as its photo is
    wide = Image.new("RGB", (900, 512), (90, 90, 90))
    wide.paste(face, (200, 0))
    wide.save(photos / "holiday.png")
    face.save(photos / "square.png")
    detector = FaceDetector()

    bucketed = PrepareOptions(photos=str(photos), out=str(tmp_path / "out"), size=256, buckets="on")
    result = prepare(bucketed, detector=detector)
    items = {item.source: item for item in result.items}
    expected = {"portrait.png": (192, 320), "holiday.png": (320, 192), "square.png": (256, 256)}
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())["files"]
    for name, bucket in expected.items():
        item = items[name]
        assert item.status == "ok" and item.framing == "face" and item.bucket == bucket
        x1, y1, x2, y2 = item.crop
        fx1, fy1, fx2, fy2 = item.face_box
        assert x1 <= fx1 and y1 <= fy1 and x2 >= fx2 and y2 >= fy2, (name, item.crop, item.face_box)
        assert abs((x2 - x1) / (y2 - y1) - bucket[0] / bucket[1]) < 0.02  # the crop has the bucket's shape
        with Image.open(tmp_path / "out" / name) as picture:
            assert picture.size == bucket
        assert manifest[name]["bucket"] == list(bucket)
    # the portrait reaches below the face, where the square stopped (the face's framing keeps its size)
    square_crop = prepare(
        PrepareOptions(photos=str(photos), out=str(tmp_path / "squares"), size=256), detector=detector
    )  # auto below SDXL's 1024: squares
    squares = {item.source: item for item in square_crop.items}
    assert items["portrait.png"].crop[3] > squares["portrait.png"].crop[3]
    assert all(item.bucket == (256, 256) for item in squares.values())
    with Image.open(tmp_path / "out" / "portrait.mask.png") as mask:
        assert mask.size == (192, 320)
    report = (tmp_path / "out" / "report.html").read_text()
    assert "(192x320)" in report and "1 x 192x320" in report
    assert "256px squares" in (tmp_path / "squares" / "report.html").read_text()


def new_word(model, folder: Path) -> None:
    """A new 'tomtut' embedding for `model` in `folder`."""
    create_embedding(
        CreateOptions(model="x", name="tomtut", init_text="toy", embeddings_dir=str(folder)),
        cache_dir=folder.parent,
        model=model,
    )


def bucket_options(photos: Path, folder: Path, **changes) -> TrainOptions:
    """test_train's options, with evaluations, previews, copies, accumulation, mirrors and buckets on."""
    bucketed = dict(gradient_accumulation=2, preview_every=3, preview_steps=1, save_every=2, eval_every=2, flip=True)
    return train_options(photos, folder, **{**bucketed, "likeness": "off", "buckets": "on", **changes})


def test_a_bucketed_run_draws_one_shape_per_batch_and_resumes_bit_exactly(sd1_model, tmp_path, monkeypatch) -> None:
    photos = shaped_photos(tmp_path / "photos")
    mask = Image.new("L", SHAPES["tall"], 0)
    mask.paste(255, (0, 0, 40, 35))  # the upper half of a tall photo is the subject: the masked loss, in buckets
    mask.save(photos / "tall-0.mask.png")
    new_word(sd1_model, tmp_path / "template")
    folders = {}
    for label in ("straight", "resumed"):
        folders[label] = tmp_path / label / "emb"
        folders[label].mkdir(parents=True)
        shutil.copy(tmp_path / "template" / "tomtut.safetensors", folders[label])
    shapes: list[tuple[int, ...]] = []
    draw = loop.Samples.draw

    def watched(self, *args, **kwargs):
        batch = draw(self, *args, **kwargs)
        shapes.append(tuple(batch.clean.shape))
        assert batch.weights is not None and batch.weights.shape[-2:] == batch.clean.shape[-2:]
        return batch

    monkeypatch.setattr(loop.Samples, "draw", watched)
    loop.train(bucket_options(photos, folders["straight"]), cache_dir=tmp_path, model=sd1_model)
    # every micro-batch whole and of one bucket's shape; all three buckets trained
    assert len(shapes) == 6 * 2 and {s[0] for s in shapes} == {2}
    assert {s[2:] for s in shapes} == {(10, 6), (6, 10), (8, 8)}
    resolved = json.loads((tmp_path / "straight" / "run" / "options.json").read_text())["resolved"]
    assert resolved["buckets"] == "on: 3 x 48x80, 3 x 64x64, 3 x 80x48"  # photos per bucket
    assert resolved["loss_mask"].endswith("2 of 18 images weighted toward the subject")  # the photo and its mirror
    with Image.open(tmp_path / "straight" / "run" / "previews" / "tomtut-3.png") as preview:
        assert preview.size == (64, 64)  # the most common bucket; on a tie, the squarest

    stop = threading.Event()
    stopped = loop.train(
        bucket_options(photos, folders["resumed"]),
        cache_dir=tmp_path,
        model=sd1_model,
        on_progress=lambda p: stop.set() if p.event == "step" and p.step == 3 else None,
        stop=stop,
    )
    assert stopped.stopped and stopped.step == 3
    loop.train(bucket_options(photos, folders["resumed"]), cache_dir=tmp_path, model=sd1_model)
    a, b = (read_embedding(folders[k] / "tomtut.safetensors") for k in ("straight", "resumed"))
    assert a.step == b.step == 6 and torch.equal(a.tensor, b.tensor)
    for name in ("loss.csv", "eval.csv"):
        assert (tmp_path / "straight" / "run" / name).read_text() == (tmp_path / "resumed" / "run" / name).read_text()


def test_buckets_off_trains_squares(sd1_model, tmp_path) -> None:
    photos = shaped_photos(tmp_path / "photos", per_shape=1)
    folder = tmp_path / "emb"
    new_word(sd1_model, folder)
    loop.train(
        bucket_options(photos, folder, buckets="off", max_steps=1, eval_every=0, preview_every=1),
        cache_dir=tmp_path,
        model=sd1_model,
    )
    resolved = json.loads((tmp_path / "run" / "options.json").read_text())["resolved"]
    assert resolved["buckets"] == "off: 3 x 64x64"
    with Image.open(tmp_path / "run" / "previews" / "tomtut-1.png") as preview:
        assert preview.size == (64, 64)
    # a chosen preview size instead of the most common bucket; a bad one is refused before any compute
    loop.train(
        bucket_options(photos, folder, max_steps=2, eval_every=0, preview_every=2, preview_size="64x96"),
        cache_dir=tmp_path,
        model=sd1_model,
    )
    with Image.open(tmp_path / "run" / "previews" / "tomtut-2.png") as preview:
        assert preview.size == (64, 96)
    with pytest.raises(OptionError, match="preview_size"):
        loop.train(bucket_options(photos, folder, max_steps=3, preview_size="tall"), cache_dir=tmp_path)


@pytest.mark.parametrize("prepared", [False, True])
def test_sdxl_time_ids_are_the_real_size_and_crop_of_the_bucket(sdxl_model, tmp_path, prepared) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (300, 600), (200, 120, 40)).save(photos / "tall.png")  # 1:2, its bucket 48x80 (0.6)
    folder = photos
    if prepared:  # prepare cuts the bucket's shape: (0, 50, 300, 550) of the photo, then 48x80
        prepare(
            PrepareOptions(photos=str(photos), out=str(tmp_path / "prepared"), size=64, crop="center", buckets="on")
        )
        folder = tmp_path / "prepared"
    dataset = load_dataset(folder)
    if prepared:
        assert dataset.images[0].source_crop == (0, 50, 300, 550) and dataset.images[0].image.size == (48, 80)
    buckets = choose_buckets([item.image.size for item in dataset.images], 64, on=True)
    assert buckets == [(48, 80)]
    # original (h, w) of the photo; the crop's top-left in the photo scaled to cover the bucket (50 x 0.16 = 8),
    # the bucket (h, w) - the same whether prepare or training cut it
    assert loop.latent_sizes(sdxl_model, dataset, buckets, flip=False).tolist() == [[600, 300, 8, 0, 80, 48]]


def test_sdxl_trains_in_buckets_by_default(sdxl_model, tmp_path) -> None:
    photos = shaped_photos(tmp_path / "photos", per_shape=1)
    folder = tmp_path / "emb"
    new_word(sdxl_model, folder)
    changes = dict(buckets="auto", max_steps=1, eval_every=0, preview_every=0, flip=False, gradient_accumulation=1)
    loop.train(bucket_options(photos, folder, **changes), cache_dir=tmp_path, model=sdxl_model)
    resolved = json.loads((tmp_path / "run" / "options.json").read_text())["resolved"]
    assert resolved["buckets"] == "on: 1 x 48x80, 1 x 64x64, 1 x 80x48"


def test_the_cli_prepares_and_trains_in_buckets(tmp_path, tiny_sd1, cache_dir, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    photos = shaped_photos(tmp_path / "photos", per_shape=2)
    assert main(["prepare", str(photos), "prepared", "--size", "64", "--crop", "center", "--buckets", "on"]) == 0
    out = capsys.readouterr().out
    assert "tall-0.png: 48x80, " in out and "wide-0.png: 80x48, " in out and "square-0.png: center, " in out
    base = ["--cache-dir", str(cache_dir)]
    assert main([*base, "create", "tomtut", "--model", str(tiny_sd1)]) == 0
    train = [*base, "train", "tomtut", "--model", str(tiny_sd1), "--dataset", "prepared", "--steps", "2"]
    assert main([*train, "--preview-every", "0", "--batch-size", "2", "--buckets", "on"]) == 0
    resolved = json.loads(Path("runs/tomtut/options.json").read_text())["resolved"]
    assert resolved["buckets"] == "on: 2 x 48x80, 2 x 64x64, 2 x 80x48"
    # auto: squares for SD1 (trained on square crops; bench/buckets.py), kept by a resume; on for SDXL
    assert main([*base, "create", "sqtut", "--model", str(tiny_sd1)]) == 0
    other = [*base, "train", "sqtut", "--model", str(tiny_sd1), "--dataset", "prepared", "--preview-every", "0"]
    assert main([*other, "--steps", "1"]) == 0
    assert json.loads(Path("runs/sqtut/options.json").read_text())["resolved"]["buckets"].startswith("off: 6 x 64x64")
