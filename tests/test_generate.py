"""Generation: embeddings named in prompts are used, seeds reproduce, PNGs carry A1111's parameters, and an
embedding gives the same picture in tistudio as in diffusers' own pipeline."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tistudio.config import GenerateOptions
from tistudio.embeddings.files import Embedding, write_embedding
from tistudio.errors import OptionError
from tistudio.generate.images import generate, initial_noise


@pytest.fixture
def embeddings(tmp_path: Path) -> Path:
    folder = tmp_path / "embeddings"
    generator = torch.Generator().manual_seed(5)
    write_embedding(
        Embedding(name="tomtut", vectors={"clip": torch.randn((3, 64), generator=generator)}, step=10),
        folder / "tomtut.safetensors",
    )
    write_embedding(
        Embedding(name="badhands", vectors={"clip": torch.randn((2, 64), generator=generator)}),
        folder / "negatives" / "badhands.safetensors",
    )
    write_embedding(
        Embedding(name="sdtwo", vectors={"clip": torch.randn((1, 1024), generator=generator)}),
        folder / "sdtwo.safetensors",
    )
    return folder


def run(model, folder: Path, **changes):
    settings = dict(
        model="x",
        prompt="portrait of tomtut as a lego figure",
        negative_prompt="",
        steps=4,
        seed=42,
        embeddings_dir=str(folder),
        out_dir=str(folder.parent / "out"),
        size="64x64",
    )
    settings.update(changes)
    return generate(GenerateOptions(**settings), cache_dir=folder.parent, model=model)


def pixels(result) -> np.ndarray:
    return np.asarray(result.image, dtype=np.int16)


def test_same_seed_same_image_and_batches_count_up(sd1_model, embeddings) -> None:
    first = run(sd1_model, embeddings)[0]
    again = run(sd1_model, embeddings)[0]
    assert np.array_equal(pixels(first), pixels(again))
    batch = run(sd1_model, embeddings, batch=3)
    assert [image.seed for image in batch] == [42, 43, 44]
    assert not np.array_equal(pixels(batch[0]), pixels(batch[1]))
    # The noise of seed 43 does not depend on the batch it is in (pixels agree up to float rounding).
    alone = run(sd1_model, embeddings, seed=43)[0]
    assert np.abs(pixels(alone) - pixels(batch[1])).max() <= 6
    names = sorted(p.name for p in (embeddings.parent / "out").iterdir())
    assert names[:2] == ["00000-42.png", "00001-42.png"] and names[-1] == "00005-43.png"


def test_png_carries_a1111_parameters(sd1_model, embeddings) -> None:
    result = run(sd1_model, embeddings, negative_prompt="badhands, blurry", cfg=6.5, sampler="euler a")[0]
    with Image.open(result.path) as image:
        text = image.text["parameters"]
    lines = text.split("\n")
    assert lines[0] == "portrait of tomtut as a lego figure"
    assert lines[1] == "Negative prompt: badhands, blurry"
    assert lines[2].startswith(
        "Steps: 4, Sampler: Euler a, Schedule type: Automatic, CFG scale: 6.5, Seed: 42, Size: 64x64, Model hash: "
    )
    assert f"Model hash: {sd1_model.hash}" in lines[2]
    import re

    hashes = re.search(r'TI hashes: "tomtut: ([0-9a-f]{12}), badhands: ([0-9a-f]{12})"', lines[2])
    assert hashes, lines[2]


def test_a1111s_png_info_reads_every_field_of_ours(sd1_model, embeddings) -> None:
    from a1111_rules import parse_generation_parameters

    result = run(sd1_model, embeddings, negative_prompt="badhands, blurry", cfg=6.5, sampler="euler a")[0]
    with Image.open(result.path) as image:
        read = parse_generation_parameters(image.text["parameters"])
    assert read["Prompt"] == "portrait of tomtut as a lego figure" and read["Negative prompt"] == "badhands, blurry"
    assert (read["Steps"], read["Sampler"], read["Schedule type"], read["CFG scale"], read["Seed"], read["Size"]) == (
        "4",
        "Euler a",
        "Automatic",
        "6.5",
        "42",
        "64x64",
    )
    assert read["Model hash"] == sd1_model.hash and read["RNG"] == "CPU"  # the noise is drawn on the CPU
    assert re.fullmatch(r"tomtut: [0-9a-f]{12}, badhands: [0-9a-f]{12}", read["TI hashes"])


def test_sampler_and_schedule_type_are_written_apart_as_a1111_1_10_does(sd1_model, embeddings) -> None:
    from a1111_rules import parse_generation_parameters

    for sampler, written in (
        ("DPM++ 2M Karras", ("DPM++ 2M", "Karras")),
        ("DPM++ 2M", ("DPM++ 2M", "Uniform")),
        ("dpm++ 2m sde exponential", ("DPM++ 2M SDE", "Exponential")),
    ):
        read = parse_generation_parameters(run(sd1_model, embeddings, sampler=sampler, steps=2)[0].infotext)
        assert (read["Sampler"], read["Schedule type"]) == written, sampler


def test_embeddings_change_the_picture_only_when_named(sd1_model, embeddings) -> None:
    named = run(sd1_model, embeddings)[0]
    plain = run(sd1_model, embeddings, prompt="portrait of a person as a lego figure")[0]
    assert not np.array_equal(pixels(named), pixels(plain))
    assert "TI hashes" not in plain.infotext
    with_negative = run(sd1_model, embeddings, negative_prompt="badhands")[0]
    assert not np.array_equal(pixels(with_negative), pixels(named))


def test_an_embedding_gives_the_same_picture_in_diffusers(sd1_model, tiny_sd1, embeddings) -> None:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    ours = run(sd1_model, embeddings, sampler="DPM++ 2M", cfg=7.0, steps=5)[0]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1, local_files_only=True, safety_checker=None)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, algorithm_type="dpmsolver++", solver_order=2
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(str(embeddings / "tomtut.safetensors"), token="tomtut")
    theirs = pipe(
        "portrait of tomtut as a lego figure",
        negative_prompt="",
        num_inference_steps=5,
        guidance_scale=7.0,
        height=64,
        width=64,
        latents=initial_noise([42], 64, 64, 8),
    ).images[0]
    difference = np.abs(pixels(ours) - np.asarray(theirs, dtype=np.int16))
    assert difference.max() <= 1, difference.max()


def test_a_wrong_width_embedding_in_the_prompt_is_skipped_with_a_clear_warning(sd1_model, embeddings, caplog) -> None:
    # as A1111 does: the picture is made, the name stays plain words, and the log says why
    with caplog.at_level(logging.WARNING, logger="tistudio"):
        images = run(sd1_model, embeddings, prompt="a photo of sdtwo")
    assert len(images) == 1
    assert re.search(r"skipped the embedding sdtwo: .*1024 wide \(SD 2.x.*64-wide", caplog.text)
    assert "TI hashes" not in images[0].infotext


def test_bad_generation_options_are_refused_before_compute(sd1_model, embeddings) -> None:
    with pytest.raises(OptionError, match=r"unknown sampler; choose one of: DPM\+\+ 2M, .*Euler a"):
        run(sd1_model, embeddings, sampler="Magic")
    with pytest.raises(OptionError, match="size"):
        run(sd1_model, embeddings, size="63x64")
    with pytest.raises(OptionError, match="steps"):
        run(sd1_model, embeddings, steps=0)
    with pytest.raises(OptionError, match="prompt"):
        run(sd1_model, embeddings, prompt="  ")


@pytest.mark.parametrize(
    "sampler",
    [
        "Euler",
        "Euler a",
        "DPM++ 2M",
        "DPM++ 2M Karras",
        "DDIM",
        "UniPC",
        "LMS",
        "LMS Karras",
        "DPM++ SDE Karras",
        "DPM++ 3M SDE Exponential",
        "LCM",
    ],
)
def test_the_a1111_samplers_run_and_the_same_seed_draws_the_same(sd1_model, embeddings, sampler) -> None:
    from tistudio.samplers import split

    result, again = (run(sd1_model, embeddings, sampler=sampler, steps=3)[0] for _ in range(2))
    base, schedule = split(sampler)
    assert f"Sampler: {base}, Schedule type: {schedule}," in result.infotext and result.image.size == (64, 64)
    assert np.array_equal(pixels(result), pixels(again)), sampler  # DPM++ SDE's Brownian noise is seeded too
