"""`tistudio prepare`: real photos are cropped around the face, odd files are read or left out with a reason, the
source folder is never touched, reruns reuse what is done, and the verdict names what is wrong."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from corpus import bad_files, odd_but_good_files
from tistudio.cli import main
from tistudio.config import PrepareOptions
from tistudio.errors import DatasetError, OptionError
from tistudio.prepare.faces import FaceDetector
from tistudio.prepare.preprocess import filename_words, perceptual_hash, prepare

DATA = Path(__file__).with_name("data")


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector()


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file() and not path.is_symlink():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def real_photos(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("astronaut.jpg", "grace_hopper.jpg"):
        shutil.copy(DATA / name, folder / name)
    return folder


def test_the_detector_finds_the_faces_in_real_photos(detector) -> None:
    astronaut = detector.detect(Image.open(DATA / "astronaut.jpg"))
    assert len(astronaut) == 1 and astronaut[0].score > 0.99
    x1, y1, x2, y2 = astronaut[0].box
    assert abs(x1 - 179) < 12 and abs(y1 - 60) < 12 and abs(x2 - 268) < 12 and abs(y2 - 173) < 12
    assert astronaut[0].yaw() == "frontal"
    hopper = detector.detect(Image.open(DATA / "grace_hopper.jpg"))
    assert len(hopper) == 1 and 150 < hopper[0].center[0] < 360 and 100 < hopper[0].center[1] < 340
    assert detector.detect(Image.new("RGB", (300, 300), (90, 140, 200))) == []


def test_real_photos_are_cropped_around_the_face(tmp_path, detector) -> None:
    photos = real_photos(tmp_path / "photos")
    result = prepare(PrepareOptions(photos=str(photos), out=str(tmp_path / "out"), size=256), detector=detector)
    items = {item.source: item for item in result.items}
    astronaut = items["astronaut.jpg"]
    assert astronaut.status == "ok" and astronaut.framing == "face" and astronaut.faces == 1
    x1, y1, x2, y2 = astronaut.crop
    fx1, fy1, fx2, fy2 = astronaut.face_box
    assert x1 <= fx1 and y1 <= fy1 and x2 >= fx2 and y2 >= fy2  # the face is inside the crop
    assert 0.35 < astronaut.face_fraction < 0.6 and x2 - x1 == y2 - y1
    with Image.open(tmp_path / "out" / "astronaut.png") as image:
        assert image.size == (256, 256) and image.mode == "RGB"
    head = prepare(
        PrepareOptions(photos=str(photos), out=str(tmp_path / "wide"), size=256, crop="head-and-shoulders"),
        detector=detector,
    )
    wide = {item.source: item for item in head.items}["grace_hopper.jpg"]
    assert wide.face_fraction < items["grace_hopper.jpg"].face_fraction


def test_odd_files_are_read_and_broken_ones_left_out_without_touching_the_source(tmp_path, detector) -> None:
    photos = real_photos(tmp_path / "photos")
    good = odd_but_good_files(photos, Image.open(DATA / "grace_hopper.jpg").convert("RGB"))
    bad = bad_files(photos, DATA / "astronaut.jpg")
    import pillow_heif

    pillow_heif.register_heif_opener()
    Image.open(DATA / "astronaut.jpg").save(photos / "phone.heic", quality=90)
    frames = [Image.open(DATA / "astronaut.jpg").convert("RGB"), Image.new("RGB", (512, 512), (0, 255, 0))]
    frames[0].save(photos / "animated.webp", save_all=True, append_images=frames[1:])
    before = folder_digest(photos)
    result = prepare(PrepareOptions(photos=str(photos), out=str(tmp_path / "out"), size=128), detector=detector)
    assert folder_digest(photos) == before, "the photos folder was changed"
    items = {item.source: item for item in result.items}
    assert {name for name, item in items.items() if item.status != "ok"} == bad
    assert all(items[name].status == "ok" for name in good | {"phone.heic", "animated.webp"})
    assert items["phone.heic"].faces == 1 and items["animated.webp"].faces == 1  # first frame, not the green one
    assert items["exif-rotated.jpg"].faces == 1  # upright after EXIF: the detector found the face
    assert "decompression bomb" in items["bomb.png"].reason and "symbolic link" in items["loop-a.jpg"].reason
    assert "too small" in items["one-pixel.png"].reason
    report = (tmp_path / "out" / "report.html").read_text()
    assert "left out" in report and "data:image/png;base64" in report


def test_reruns_reuse_what_is_done_and_redo_what_changed(tmp_path, detector) -> None:
    photos = real_photos(tmp_path / "photos")
    Image.open(DATA / "astronaut.jpg").rotate(10).save(photos / "tilted.jpg")
    options = PrepareOptions(photos=str(photos), out=str(tmp_path / "out"), size=128, flip=True)
    first = prepare(options, detector=detector)
    assert (first.processed, first.reused) == (3, 0)
    outputs = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.png")}
    second = prepare(options, detector=detector)
    assert (second.processed, second.reused, second.removed) == (0, 3, 0)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.png")} == outputs
    Image.open(DATA / "grace_hopper.jpg").rotate(5).save(photos / "tilted.jpg")  # changed content
    (photos / "astronaut.jpg").unlink()
    third = prepare(options, detector=detector)
    assert (third.processed, third.reused) == (1, 1) and third.removed == 4  # astronaut(-flip).png and .txt
    assert not (tmp_path / "out" / "astronaut.png").exists() and not (tmp_path / "out" / "astronaut-flip.png").exists()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"grace_hopper.jpg", "tilted.jpg"}
    assert manifest["files"]["tilted.jpg"]["sha256"] == hashlib.sha256((photos / "tilted.jpg").read_bytes()).hexdigest()
    changed = prepare(PrepareOptions(photos=str(photos), out=str(tmp_path / "out"), size=96), detector=detector)
    assert changed.processed == 2 and not (tmp_path / "out" / "grace_hopper-flip.png").exists()


def test_the_verdict_names_blur_duplicates_pose_and_background(tmp_path, detector) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    base = Image.open(DATA / "grace_hopper.jpg").convert("RGB")
    rng = random.Random(0)
    for index in range(6):
        shifted = base.crop((rng.randrange(0, 20), rng.randrange(0, 20), 492 + rng.randrange(0, 20), 580))
        shifted.save(photos / f"hopper-{index}.jpg", quality=90 - index)
    base.filter(ImageFilter.GaussianBlur(6)).save(photos / "hopper-blurred.jpg")
    result = prepare(PrepareOptions(photos=str(photos), out=str(tmp_path / "out"), size=256), detector=detector)
    verdict = " ".join(result.verdict)
    assert result.verdict[0].startswith("Ready to train")
    assert "1 image is blurry: hopper-blurred.jpg" in verdict
    assert "are the same photo" in verdict
    assert "show the face straight at the camera" in verdict
    assert "much the same background" in verdict


def test_too_few_images_and_an_all_bad_folder(tmp_path, detector) -> None:
    photos = real_photos(tmp_path / "photos")
    result = prepare(PrepareOptions(photos=str(photos), out=str(tmp_path / "out"), size=128), detector=detector)
    assert result.verdict[0] == "Not ready yet:" and "Only 2 usable images" in result.verdict[1]
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.jpg").write_text("no")
    with pytest.raises(DatasetError, match="none of the 1 files"):
        prepare(PrepareOptions(photos=str(junk), out=str(tmp_path / "junk-out")), detector=detector)
    with pytest.raises(OptionError, match="outside the photos folder"):
        prepare(PrepareOptions(photos=str(photos), out=str(photos / "prepared")), detector=detector)


def test_captions_follow_the_caption_action(tmp_path, detector) -> None:
    photos = real_photos(tmp_path / "photos")
    (photos / "astronaut.txt").write_text("orange suit\n")
    shutil.copy(DATA / "astronaut.jpg", photos / "IMG_20240101_123456.jpg")
    expected = {
        "ignore": "astronaut",
        "copy": "orange suit",
        "prepend": "orange suit astronaut",
        "append": "astronaut orange suit",
    }
    for action, caption in expected.items():
        out = tmp_path / action
        prepare(
            PrepareOptions(photos=str(photos), out=str(out), size=96, caption_action=action, crop="center"),
            detector=detector,
        )
        assert (out / "astronaut.txt").read_text().strip() == caption
        assert not (out / "IMG_20240101_123456.txt").exists()  # a camera file name is not a caption
    assert filename_words("00012-0-a woman smiling") == "a woman smiling"
    assert filename_words("DSC01234") == filename_words("PXL_20230101_0001") == ""
    assert filename_words("tom_at_the_beach") == "tom at the beach"


def test_wide_photos_without_faces_split_into_squares(tmp_path, detector) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    strip = Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 700, 3), dtype=np.uint8))
    strip.save(photos / "panorama.png")
    result = prepare(
        PrepareOptions(photos=str(photos), out=str(tmp_path / "out"), size=128, split=True), detector=detector
    )
    item = result.items[0]
    assert item.framing == "split" and [o for o in item.outputs if o.endswith(".png")] == [
        "panorama-1.png",
        "panorama-2.png",
        "panorama-3.png",
        "panorama-4.png",
        "panorama-5.png",
    ]


def test_perceptual_hash_tells_copies_from_other_photos() -> None:
    astronaut = Image.open(DATA / "astronaut.jpg")
    hopper = Image.open(DATA / "grace_hopper.jpg")
    same = perceptual_hash(astronaut.resize((300, 300)))
    assert bin(int(same, 16) ^ int(perceptual_hash(astronaut), 16)).count("1") <= 6
    assert bin(int(perceptual_hash(hopper), 16) ^ int(perceptual_hash(astronaut), 16)).count("1") > 16


def test_copies_are_the_same_photo_and_small_pictures_in_other_poses_are_not(tmp_path) -> None:
    """A hash a few bits apart is confirmed by the thumbnails: the demo's 64-px cartoons of one person in other
    poses share hashes 4-6 bits apart, and a JPEG re-save, an enlargement or a brighter copy are the same photo."""
    import io
    import itertools

    from PIL import ImageEnhance

    from tistudio.demo.run import person_photos
    from tistudio.prepare.preprocess import Item, same_photo, thumbnail_look

    def item(image: Image.Image) -> Item:
        return Item(source="x", status="ok", phash=perceptual_hash(image), look=thumbnail_look(image))

    folder = person_photos(tmp_path / "demo")
    demo = [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))]
    near = [
        (a, b)
        for a, b in itertools.combinations(demo, 2)
        if bin(int(perceptual_hash(a), 16) ^ int(perceptual_hash(b), 16)).count("1") <= 6
    ]
    assert near  # the hash alone would call these the same photo
    assert not any(same_photo(item(a), item(b)) for a, b in near)
    for photo in (demo[0], Image.open(DATA / "grace_hopper.jpg").convert("RGB")):
        saved = io.BytesIO()
        photo.save(saved, "JPEG", quality=60)
        for copy in (
            Image.open(saved).convert("RGB"),
            photo.resize((photo.width * 2, photo.height * 2)),
            ImageEnhance.Brightness(photo).enhance(1.2),
        ):
            assert same_photo(item(photo), item(copy))


def test_cli_prepare_then_train_on_the_result(tmp_path, sd1_model, tiny_sd1, cache_dir, capsys) -> None:
    photos = real_photos(tmp_path / "photos")
    assert main(["prepare", str(photos), "prepared", "--size", "64", "--flip"]) == 0
    out = capsys.readouterr().out
    assert "prepared 2 of 2 files" in out and "astronaut.jpg: face" in out and "report:" in out
    assert main(["--cache-dir", str(cache_dir), "create", "tomtut", "--model", str(tiny_sd1)]) == 0
    assert (
        main(
            [
                "--cache-dir",
                str(cache_dir),
                "train",
                "tomtut",
                "--model",
                str(tiny_sd1),
                "--dataset",
                "prepared",
                "--steps",
                "2",
                "--preview-every",
                "0",
            ]
        )
        == 0
    )
    options = json.loads(Path("runs/tomtut/options.json").read_text())
    assert options["resolved"]["images"] == 4  # two photos and their mirrored copies


def test_masks_travel_with_their_photos_into_the_prepared_set(tmp_path, detector) -> None:
    """A mask file beside a photo, or its alpha channel, is cut, resized and mirrored as the photo was, kept as
    IMAGE.mask.png beside the prepared picture (never prepared as a photo itself), and redone when it changes."""
    from tistudio.prepare.dataset import load_dataset

    photos = real_photos(tmp_path / "photos")
    hopper = Image.open(photos / "grace_hopper.jpg")
    left = Image.new("L", hopper.size, 0)
    left.paste(255, (0, 0, hopper.width // 2, hopper.height))  # the photo's left half is the subject
    left.save(photos / "grace_hopper.mask.png")
    astronaut = Image.open(photos / "astronaut.jpg").convert("RGBA")
    alpha = Image.new("L", astronaut.size, 0)
    alpha.paste(255, (0, 0, astronaut.width, astronaut.height // 2))  # the top half is opaque
    astronaut.putalpha(alpha)
    astronaut.save(photos / "astronaut.png")
    (photos / "astronaut.jpg").unlink()
    options = PrepareOptions(photos=str(photos), out=str(tmp_path / "out"), size=128, flip=True)
    result = prepare(options, detector=detector)
    out = tmp_path / "out"
    assert sorted(item.source for item in result.items) == ["astronaut.png", "grace_hopper.jpg"]  # no mask photo
    items = {item.source: item for item in result.items}
    assert items["grace_hopper.jpg"].mask == "grace_hopper.mask.png" and items["astronaut.png"].mask == "alpha channel"
    for stem, crop in (("grace_hopper", items["grace_hopper.jpg"].crop), ("astronaut", items["astronaut.png"].crop)):
        cut = np.asarray(Image.open(out / f"{stem}.mask.png"))
        mirrored = np.asarray(Image.open(out / f"{stem}-flip.mask.png"))
        assert cut.shape == (128, 128) and np.array_equal(mirrored, cut[:, ::-1])
        source = np.asarray((left if stem == "grace_hopper" else alpha).crop(crop).resize((128, 128)))
        assert np.abs(cut.astype(int) - source.astype(int)).mean() < 2  # the same cut as the picture's
    # training reads them as the prepared pictures' masks; the photo itself is flattened on grey
    dataset = load_dataset(out)
    assert len(dataset.images) == 4 and all(item.mask is not None for item in dataset.images)
    assert all(item.image.mode == "RGB" for item in dataset.images)
    # a changed mask is prepared again, an unchanged set is reused
    assert prepare(options, detector=detector).reused == 2
    right = Image.new("L", hopper.size, 0)
    right.paste(255, (hopper.width // 2, 0, hopper.width, hopper.height))
    right.save(photos / "grace_hopper.mask.png")
    again = prepare(options, detector=detector)
    assert (again.processed, again.reused) == (1, 1)
    crop = items["grace_hopper.jpg"].crop
    assert (
        np.abs(
            np.asarray(Image.open(out / "grace_hopper.mask.png")).astype(int)
            - np.asarray(right.crop(crop).resize((128, 128))).astype(int)
        ).mean()
        < 2
    )
    # a mask of the wrong shape leaves its photo out, with the reason
    Image.new("L", (hopper.width, hopper.height * 2), 255).save(photos / "grace_hopper.mask.png")
    bad = {item.source: item for item in prepare(options, detector=detector).items}["grace_hopper.jpg"]
    assert bad.status == "skipped" and "mask" in bad.reason and "shape" in bad.reason
    assert not (out / "grace_hopper.mask.png").exists() and not (out / "grace_hopper.png").exists()
