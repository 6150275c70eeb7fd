"""Training images: every odd file a phone, camera or download produces is read correctly or skipped with a
reason; captions come from IMAGE.txt or the file name."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from corpus import exif_rotated, png_bomb
from tistudio.errors import DatasetError
from tistudio.prepare.dataset import caption_for, filename_words, load_dataset, read_image, square


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    exif_rotated(tmp_path / "phone.jpg")
    image, size = read_image(tmp_path / "phone.jpg")
    assert image.size == (40, 80) == size
    top, bottom = np.asarray(image)[5, 20], np.asarray(image)[75, 20]
    assert top[2] > 150 and bottom[0] > 150


def test_modes_are_converted_to_rgb_properly(tmp_path: Path) -> None:
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    sixteen = Image.fromarray(np.full((32, 32), 40000, dtype=np.uint16))
    sixteen.save(tmp_path / "sixteen.png")
    palette = Image.new("P", (32, 32), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.info["transparency"] = 1
    palette.save(tmp_path / "palette.png", transparency=1)
    Image.new("LA", (32, 32), (200, 0)).save(tmp_path / "la.png")
    cmyk = np.asarray(read_image(tmp_path / "cmyk.jpg")[0])[16, 16]
    assert cmyk[0] > 200 and cmyk[1] < 60  # cyan-free, so red
    grey = np.asarray(read_image(tmp_path / "sixteen.png")[0])[0, 0]
    assert 150 <= grey[0] <= 160  # 40000/65535 scaled, not clamped to white
    transparent = np.asarray(read_image(tmp_path / "palette.png")[0])[0, 0]
    assert tuple(transparent) == (128, 128, 128)  # flattened on neutral grey, not black
    assert tuple(np.asarray(read_image(tmp_path / "la.png")[0])[0, 0]) == (128, 128, 128)


def test_animations_use_the_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert np.asarray(read_image(tmp_path / "anim.gif")[0])[0, 0][0] > 200


@pytest.mark.parametrize(
    ("maker", "reason"),
    [
        (lambda p: p.write_bytes(b""), "not an image"),
        (lambda p: p.write_text("just text"), "not an image"),
        (lambda p: Image.new("RGB", (1, 1)).save(p, format="PNG"), "too small"),
        (png_bomb, "decompression bomb"),
    ],
)
def test_bad_files_are_refused_with_a_reason(tmp_path: Path, maker, reason) -> None:
    path = tmp_path / "bad.jpg"
    maker(path)
    with pytest.raises(DatasetError, match=reason):
        read_image(path)


def test_truncated_jpeg_is_refused(tmp_path: Path) -> None:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "a.jpg")
    data = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="cannot read"):
        read_image(tmp_path / "cut.jpg")


def test_captions_from_txt_or_file_name(tmp_path: Path) -> None:
    (tmp_path / "00012-0-a woman smiling.png").touch()
    assert caption_for(tmp_path / "00012-0-a woman smiling.png") == "a woman smiling"
    (tmp_path / "x.png").touch()
    (tmp_path / "x.txt").write_text("red hat, smiling\n")
    assert caption_for(tmp_path / "x.png") == "red hat, smiling"


def test_training_reads_captions_by_the_same_rule_as_preparing(tmp_path: Path) -> None:
    # a camera's file name is no caption; underscores are spaces; a sidecar wins, even an empty one
    for stem, caption in (("IMG_1234", ""), ("PXL_20230101_0001", ""), ("tom_at_the_beach", "tom at the beach")):
        (tmp_path / f"{stem}.png").touch()
        assert caption_for(tmp_path / f"{stem}.png") == caption == filename_words(stem)
    (tmp_path / "tom_at_the_beach.caption").write_text("")
    assert caption_for(tmp_path / "tom_at_the_beach.png") == ""


def test_folder_errors(tmp_path: Path, photos: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="has no images"):
        load_dataset(tmp_path / "empty")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.jpg").write_text("no")
    with pytest.raises(DatasetError, match=r"no usable image.*a\.jpg: not an image"):
        load_dataset(tmp_path / "junk")
    dataset = load_dataset(photos)
    assert len(dataset.images) == 6 and not dataset.skipped
    assert dataset.images[0].caption == "toy figure, red cap, blue shirt"  # from 00-toy figure.txt
    assert dataset.images[1].caption == "toy figure"  # from the file name


def test_square_crops_the_centre(tmp_path: Path) -> None:
    wide = Image.new("RGB", (300, 100), (0, 0, 0))
    wide.paste((255, 255, 255), (100, 0, 200, 100))
    out = np.asarray(square(wide, 64))
    assert out.shape == (64, 64, 3) and out.mean() > 250


def test_a_long_strip_costs_only_the_square_training_uses(tmp_path: Path) -> None:
    """A 1000x63990 PNG of 268 KB cost ~260 MB while the set was held: only its centre square is ever trained on."""
    strip = np.zeros((20_000, 1000, 3), dtype=np.uint8)
    strip[9_500:10_500] = 255  # the centre square is white, the rest black
    Image.fromarray(strip).save(tmp_path / "strip.png")
    Image.new("RGB", (300, 200), (10, 20, 30)).save(tmp_path / "photo.png")
    images = {i.path.name: i for i in load_dataset(tmp_path).images}
    kept = images["strip.png"]
    assert kept.image.size == (1000, 1000) and kept.original_size == (1000, 20_000)
    assert np.asarray(square(kept.image, 64)).min() == 255  # what training sees is what it saw before
    assert images["photo.png"].image.size == (300, 200)  # an ordinary photo is kept whole


def test_the_bad_image_corpus_goes_through_train(sd1_model, tmp_path: Path, monkeypatch) -> None:
    from corpus import draw_toy
    from tistudio.config import CreateOptions, TrainOptions
    from tistudio.prepare import dataset as dataset_module
    from tistudio.train.create import create_embedding
    from tistudio.train.loop import train

    folder = tmp_path / "mixed"
    folder.mkdir()
    import random

    rng = random.Random(0)
    for index in range(3):
        draw_toy(rng).save(folder / f"good-{index}.png")
    exif_rotated(folder / "exif-rotated.jpg")
    draw_toy(rng).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(np.full((48, 48), 30000, dtype=np.uint16)).save(folder / "sixteen-bit.png")
    palette = draw_toy(rng).convert("P")
    palette.save(folder / "palette-alpha.png", transparency=0)
    good = (folder / "good-0.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 3])
    (folder / "zero-byte.jpg").write_bytes(b"")
    Image.new("RGB", (1, 1)).save(folder / "one-pixel.png")
    png_bomb(folder / "bomb.png")
    (folder / "fake.jpg").write_text("not an image at all")
    draw_toy(rng).save(folder / "locked.png")
    (folder / "loop-a.jpg").symlink_to(folder / "loop-b.jpg")
    (folder / "loop-b.jpg").symlink_to(folder / "loop-a.jpg")
    os.mkfifo(folder / "pipe.jpg")
    original_open = dataset_module.Image.open

    def open_image(path, *args, **kwargs):  # the suite runs as root, which reads any file: simulate chmod 000
        if Path(path).name == "locked.png":
            raise PermissionError(13, "Permission denied")
        return original_open(path, *args, **kwargs)

    monkeypatch.setattr(dataset_module.Image, "open", open_image)
    create_embedding(
        CreateOptions(model="x", name="tomtut", init_text="toy", embeddings_dir=str(tmp_path / "emb")),
        cache_dir=tmp_path,
        model=sd1_model,
    )
    options = TrainOptions(
        model="x",
        embedding="tomtut",
        dataset=str(folder),
        embeddings_dir=str(tmp_path / "emb"),
        size=64,
        max_steps=2,
        preview_every=0,
        save_every=0,
    )
    result = train(options, cache_dir=tmp_path, model=sd1_model)
    reasons = {path.name: reason for path, reason in result.skipped_images}
    assert result.step == 2
    assert set(reasons) == {
        "truncated.png",
        "zero-byte.jpg",
        "one-pixel.png",
        "bomb.png",
        "fake.jpg",
        "locked.png",
        "loop-a.jpg",
        "loop-b.jpg",
        "pipe.jpg",
    }
    assert "permission denied" in reasons["locked.png"]
    assert "decompression bomb" in reasons["bomb.png"]
    assert "symbolic link" in reasons["loop-a.jpg"] and "not a regular file" in reasons["pipe.jpg"]
    recorded = json.loads((Path("runs") / "tomtut" / "options.json").read_text())
    assert recorded["resolved"]["images"] == 7 and len(recorded["resolved"]["skipped_images"]) == 9


def test_a_thumbnail_of_a_64_megapixel_strip_holds_one_decoded_copy(tmp_path: Path) -> None:
    """The server's photo thumbnails: a 1000x63990 PNG of a few hundred KB decodes to 256 MB (PIL keeps RGB in 4
    bytes a pixel); the thumbnail may hold that once, not the two to four copies a convert-then-shrink takes."""
    import subprocess
    import sys

    strip = np.zeros((63990, 1000, 3), np.uint8)
    strip[::97] = 255
    path = tmp_path / "strip.png"
    Image.fromarray(strip).save(path)
    del strip
    # The child's peak (VmHWM) is reset first: a forked process starts with its parent's, pytest's
    child = (
        "import re, sys\n"
        "from pathlib import Path\n"
        "from tistudio.server.routes.photos import thumbnail\n"
        "def kb(field): return int(re.search(field + r':\\s+(\\d+)', Path('/proc/self/status').read_text())[1])\n"
        "Path('/proc/self/clear_refs').write_text('5')\n"
        "before = kb('VmRSS')\n"
        "small = thumbnail(Path(sys.argv[1]), 256)\n"
        "print((kb('VmHWM') - before) // 1024, len(small))\n"
    )
    done = subprocess.run([sys.executable, "-c", child, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    growth_mb, size = map(int, done.stdout.split())
    decoded_mb = 63990 * 1000 * 4 / 2**20
    assert size > 0 and growth_mb < 1.4 * decoded_mb, f"the thumbnail took {growth_mb} MB ({decoded_mb:.0f} decoded)"


def test_a_thumbnail_shrunk_while_decoding_still_applies_the_exif_orientation(tmp_path: Path) -> None:
    import io

    from tistudio.server.routes.photos import thumbnail

    exif_rotated(tmp_path / "turned.jpg")
    with Image.open(io.BytesIO(thumbnail(tmp_path / "turned.jpg", 32))) as small:
        assert small.size == (16, 32)  # portrait, as the photo is seen
        top, bottom = small.getpixel((8, 4)), small.getpixel((8, 28))
    assert top[2] > top[0] and bottom[0] > bottom[2]  # the blue half on top
