"""Where the loss looks (masks) and how long the vectors may grow (--fixed-norm): what users rely on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tistudio.config import TrainOptions, validate_train
from tistudio.embeddings.files import read_embedding
from tistudio.errors import OptionError
from tistudio.prepare.dataset import load_dataset
from tistudio.train.loop import train
from tistudio.train.masks import head_and_shoulders, loss_weights, mask_mode, style_template
from tistudio.train.trainable import along_sphere


def centre_mask(size: tuple[int, int]) -> Image.Image:
    """White in the middle third, black around it."""
    mask = Image.new("L", size, 0)
    w, h = size
    mask.paste(255, (w // 3, h // 3, 2 * w // 3, 2 * h // 3))
    return mask


def test_masks_come_from_alpha_or_a_file_beside_the_photo_and_are_not_photos(photos, tmp_path) -> None:
    files = sorted(photos.glob("*.png"))
    first = Image.open(files[0]).convert("RGBA")
    first.putalpha(centre_mask(first.size))
    first.save(files[0])
    centre_mask(Image.open(files[1]).size).save(files[1].with_name(files[1].stem + ".mask.png"))
    centre_mask(Image.open(files[2]).size).save(files[2].with_name(files[2].stem + "-masklabel.png"))
    dataset = load_dataset(photos)
    assert len(dataset.images) == len(files) and not dataset.skipped  # the mask files are not training images
    by_name = {item.path.name: item for item in dataset.images}
    for path in files[:3]:
        mask = by_name[path.name].mask
        assert mask is not None and mask.mode == "L" and mask.size == by_name[path.name].image.size
        pixels = np.asarray(mask)
        assert pixels[mask.height // 2, mask.width // 2] > 250 and pixels[0, 0] < 5
    assert all(by_name[path.name].mask is None for path in files[3:])
    # the flattened picture is unchanged by the alpha channel's use as a mask: transparency is still flattened
    assert by_name[files[0].name].image.mode == "RGB"


def test_a_mask_of_another_shape_skips_its_photo_with_the_reason(photos) -> None:
    path = sorted(photos.glob("*.png"))[0]
    width, height = Image.open(path).size
    Image.new("L", (width, height * 2), 255).save(path.with_name(path.stem + ".mask.png"))
    dataset = load_dataset(photos)
    assert [p.name for p, _ in dataset.skipped] == [path.name]
    assert "mask" in dataset.skipped[0][1] and "shape" in dataset.skipped[0][1]


def test_weights_average_one_favour_the_subject_and_mirror_with_flip(photos) -> None:
    files = sorted(photos.glob("*.png"))
    size = Image.open(files[0]).size
    half = Image.new("L", size, 0)
    half.paste(255, (0, 0, size[0] // 2, size[1]))  # the left half is the subject
    half.save(files[0].with_name(files[0].stem + ".mask.png"))
    dataset = load_dataset(photos)
    weights = torch.stack(loss_weights(dataset, 64, 8, flip=True, mode="masks", background=0.1))
    assert weights.shape == (2 * len(files), 1, 8, 8)
    assert torch.allclose(weights.mean(dim=(1, 2, 3)), torch.ones(2 * len(files)), atol=1e-5)
    masked, mirrored = weights[0, 0], weights[1, 0]
    assert masked[:, :2].mean() > 5 * masked[:, -2:].mean()  # the subject weighs about ten times the rest
    assert torch.allclose(mirrored, masked.flip(-1), atol=1e-6)
    assert torch.equal(weights[2:], torch.ones_like(weights[2:]))  # photos without a mask weigh every pixel alike
    assert loss_weights(dataset, 64, 8, flip=True, mode="off", background=0.1) is None


def test_no_mask_means_no_weights_and_face_mode_draws_around_the_face_found(photos) -> None:
    dataset = load_dataset(photos)
    assert loss_weights(dataset, 64, 8, flip=False, mode="masks", background=0.1) is None
    found = []

    def finder(picture: Image.Image):
        found.append(picture.size)
        w, h = picture.size
        return (0.4 * w, 0.25 * h, 0.6 * w, 0.5 * h)

    weights = torch.stack(loss_weights(dataset, 64, 4, flip=False, mode="face", background=0.1, find_face=finder))
    assert len(found) == len(dataset.images)
    grid = weights[0, 0]
    assert grid[5, 8] > 1.5 and grid[0, 0] < 0.5  # the face heavy, a corner light
    shape = np.asarray(head_and_shoulders((100, 100), (40, 25, 60, 50)))
    assert shape[37, 50] == 255 and shape[5, 5] == 0 and shape[80, 50] == 255  # face, corner, shoulders
    assert (
        loss_weights(dataset, 64, 4, flip=False, mode="face", background=0.1, find_face=lambda picture: None) is None
    )  # no face anywhere: the plain loss


def train_options(photos: Path, folder: Path, **changes) -> TrainOptions:
    base = dict(
        model="unused",
        embedding="tomtut",
        dataset=str(photos),
        embeddings_dir=str(folder),
        run_dir=str(folder.parent / "run"),
        size=64,
        batch_size=2,
        max_steps=3,
        preview_every=0,
        save_every=0,
        eval_every=0,
        learning_rate="0.01",
    )
    base.update(changes)
    return TrainOptions(**base)


def trained(model, photos: Path, folder: Path, **changes) -> torch.Tensor:
    from test_train import new_embedding

    new_embedding(model, folder)
    train(train_options(photos, folder, **changes), cache_dir=folder, model=model)
    return read_embedding(folder / "tomtut.safetensors").tensor


def test_the_trainer_weighs_the_loss_by_the_masks(sd1_model, photos, tmp_path) -> None:
    plain = trained(sd1_model, photos, tmp_path / "plain" / "emb")
    white = tmp_path / "white"
    shutil.copytree(photos, white)
    for path in sorted(white.glob("*.png")):  # a mask that keeps everything weighs every pixel 1: the plain loss
        Image.new("L", Image.open(path).size, 255).save(path.with_name(path.stem + ".mask.png"))
    assert torch.allclose(trained(sd1_model, white, tmp_path / "w" / "emb"), plain, atol=1e-6)
    centred = tmp_path / "centred"
    shutil.copytree(photos, centred)
    for path in sorted(centred.glob("*.png")):
        centre_mask(Image.open(path).size).save(path.with_name(path.stem + ".mask.png"))
    masked = trained(sd1_model, centred, tmp_path / "m" / "emb")
    assert not torch.allclose(masked, plain, atol=1e-4)  # the loss looked elsewhere, the vectors moved elsewhere
    off = trained(sd1_model, centred, tmp_path / "off" / "emb", loss_mask="off")
    assert torch.allclose(off, plain, atol=1e-6)
    options = json.loads((tmp_path / "m" / "run" / "options.json").read_text())
    assert options["options"]["loss_mask"] == "auto" and options["options"]["mask_background"] == 0.1
    assert (
        options["resolved"]["loss_mask"] == f"auto: {len(list(centred.glob('*.mask.png')))} of 6 images weighted "
        "toward the subject"
    )


def test_a_fixed_norm_trains_the_direction_only(sd1_model, photos, tmp_path) -> None:
    from test_train import new_embedding

    typical = float(sd1_model.text["clip"].table.norm(dim=1).median())
    start = read_embedding(new_embedding(sd1_model, tmp_path / "start")).tensor
    vectors = trained(sd1_model, photos, tmp_path / "fixed" / "emb", fixed_norm=1.5)
    assert torch.allclose(vectors.norm(dim=1), torch.full((vectors.shape[0],), 1.5 * typical), rtol=1e-5)
    cosine = torch.nn.functional.cosine_similarity(vectors, start, dim=1)
    assert (cosine < 0.99999).all()  # every direction moved
    v, g = torch.randn(4, 64), torch.randn(4, 64)
    assert (along_sphere(v, g) * v).sum(dim=1).abs().max() < 1e-5  # nothing left along the vector


def test_a_fixed_norm_run_resumes_exactly(sd1_model, photos, tmp_path) -> None:
    from test_train import run, twin_folders

    straight, resumed = twin_folders(sd1_model, tmp_path)
    settings = dict(max_steps=6, fixed_norm=1.0, save_every=2)
    run(sd1_model, photos, straight, **settings)
    assert run(sd1_model, photos, resumed, stop_at=3, **settings).stopped
    run(sd1_model, photos, resumed, **settings)
    a, b = read_embedding(straight / "tomtut.safetensors"), read_embedding(resumed / "tomtut.safetensors")
    assert a.step == b.step == 6 and torch.equal(a.tensor, b.tensor)


def test_a_fixed_norm_and_a_norm_cap_are_refused_together(photos, tmp_path) -> None:
    with pytest.raises(OptionError) as caught:
        validate_train(train_options(photos, tmp_path / "emb", fixed_norm=1.0, max_norm=2.0))
    assert "fixed_norm" in str(caught.value) and "max_norm" in str(caught.value)
    with pytest.raises(OptionError) as caught:
        validate_train(train_options(photos, tmp_path / "emb", loss_mask="everywhere"))
    assert "loss_mask" in str(caught.value)


def test_face_mode_finds_the_face_of_a_real_photo_and_weighs_it(tmp_path) -> None:
    from tistudio.train.masks import face_finder

    photo = Image.open(Path(__file__).parent / "data" / "grace_hopper.jpg").convert("RGB")
    folder = tmp_path / "set"
    folder.mkdir()
    photo.save(folder / "hopper.png")
    box = face_finder()(photo)
    assert box is not None
    x1, y1, x2, y2 = box
    weights = torch.stack(loss_weights(load_dataset(folder), 256, 8, flip=False, mode="face", background=0.1))
    grid = weights[0, 0]
    # the training square is the photo's centre square; the face's centre there, in latent cells
    side, (w, h) = 256, photo.size
    scale, left, top = side / min(w, h), (w - min(w, h)) / 2, (h - min(w, h)) / 2
    cx, cy = ((x1 + x2) / 2 - left) * scale / 8, ((y1 + y2) / 2 - top) * scale / 8
    assert grid[int(cy), int(cx)] > 1.2 and grid[0, 0] < 0.5 and grid[0, -1] < 0.5


def test_auto_draws_face_shapes_only_in_a_set_of_faces(photos) -> None:
    dataset = load_dataset(photos)
    count = len(dataset.images)

    def faces_in(share: int):
        def finder(picture: Image.Image):
            seen.append(picture)
            w, h = picture.size
            return (0.4 * w, 0.25 * h, 0.6 * w, 0.5 * h) if len(seen) <= share else None

        seen: list[Image.Image] = []
        return finder

    # a face in under half the photos (a car and a passer-by): no face shapes, the plain loss
    assert (
        loss_weights(dataset, 64, 8, flip=False, mode="auto", background=0.1, find_face=faces_in(count // 2 - 1))
        is None
    )
    # a face in most photos: those are weighted toward head and shoulders, the rest weigh every pixel alike
    found = loss_weights(dataset, 64, 8, flip=False, mode="auto", background=0.1, find_face=faces_in(count - 1))
    assert found is not None
    weights = torch.stack(found)
    assert weights.shape == (count, 1, 8, 8)
    assert all(weights[i].std() > 0.1 for i in range(count - 1)) and torch.equal(weights[-1], torch.ones(1, 8, 8))
    # "face" draws wherever a face is found, however few
    assert loss_weights(dataset, 64, 8, flip=False, mode="face", background=0.1, find_face=faces_in(1)) is not None


def test_auto_keeps_style_runs_and_earlier_runs_unmasked() -> None:
    from tistudio.templates import load_template

    assert style_template(load_template("style")) and style_template(load_template("style_filewords"))
    assert not style_template(load_template("subject")) and not style_template(load_template("subject_filewords"))
    assert style_template(("a portrait in the style of [name]", "a city, [name] style", "a photo of [name]"))
    subject = load_template("subject")
    assert mask_mode("auto", load_template("style"), None, resumed=False) == "masks"
    assert mask_mode("auto", subject, None, resumed=False) == "auto"
    assert mask_mode("auto", subject, "auto", resumed=True) == "auto"
    assert mask_mode("auto", subject, None, resumed=True) == "masks"  # a run begun before auto: as it began
    assert mask_mode("face", load_template("style"), "masks", resumed=True) == "face"  # asked for: as asked


def face_set(folder: Path, size: int = 96) -> Path:
    """Four photos of real faces (tests/data's portraits and their mirror images), a little larger than training."""
    from PIL import ImageOps

    folder.mkdir(parents=True)
    for name in ("astronaut.jpg", "grace_hopper.jpg"):
        photo = Image.open(Path(__file__).parent / "data" / name).convert("RGB")
        photo.thumbnail((size * 2, size * 2))
        photo.save(folder / f"{Path(name).stem}.png")
        ImageOps.mirror(photo).save(folder / f"{Path(name).stem}-mirrored.png")
    return folder


def test_a_run_on_real_faces_weighs_head_and_shoulders_by_default_and_resumes_exactly(sd1_model, tmp_path) -> None:
    from test_train import run, twin_folders

    faces = face_set(tmp_path / "faces")
    straight, resumed = twin_folders(sd1_model, tmp_path)
    settings = dict(max_steps=4, save_every=2, eval_every=2)
    run(sd1_model, faces, straight, **settings)
    resolved = json.loads((straight.parent / "run" / "options.json").read_text())["resolved"]
    assert resolved["loss_mask"] == "auto: 4 of 4 images weighted toward the subject"
    assert "auto: 4 of 4 images weighted toward the subject" in (straight.parent / "run" / "report.html").read_text()
    assert run(sd1_model, faces, resumed, stop_at=3, **settings).stopped
    run(sd1_model, faces, resumed, **settings)
    a, b = read_embedding(straight / "tomtut.safetensors"), read_embedding(resumed / "tomtut.safetensors")
    assert a.step == b.step == 4 and torch.equal(a.tensor, b.tensor)
    # the same photos taught as a style: no face shape narrows the loss
    style = trained(sd1_model, faces, tmp_path / "style" / "emb", template="style")
    resolved = json.loads((tmp_path / "style" / "run" / "options.json").read_text())["resolved"]
    assert resolved["loss_mask"] == "masks: 0 of 4 images weighted toward the subject"
    plain = trained(sd1_model, faces, tmp_path / "off" / "emb", template="style", loss_mask="off")
    assert torch.equal(style, plain)


def test_a_run_resumed_from_before_auto_keeps_training_unmasked(sd1_model, tmp_path) -> None:
    from test_train import run, twin_folders

    faces = face_set(tmp_path / "faces")
    straight, resumed = twin_folders(sd1_model, tmp_path)
    settings = dict(max_steps=4, save_every=2)
    run(sd1_model, faces, straight, loss_mask="masks", **settings)
    assert run(sd1_model, faces, resumed, stop_at=2, loss_mask="masks", **settings).stopped
    saved = resumed.parent / "run" / "state" / "state-2.json"
    old = json.loads(saved.read_text())
    assert old.pop("loss_mask") == "masks"
    saved.write_text(json.dumps(old))  # as a run of the release before --loss-mask auto left it
    run(sd1_model, faces, resumed, **settings)  # --loss-mask auto (the default) now
    a, b = read_embedding(straight / "tomtut.safetensors"), read_embedding(resumed / "tomtut.safetensors")
    assert torch.equal(a.tensor, b.tensor)
