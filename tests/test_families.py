"""The seam for model families, proved with a family that exists only here: two text encoders (keys clip_l and
clip_g, 32 wide each, their hidden states concatenated into the tiny UNet's 64-wide context), declared as one
families.Family entry. create -> train in two sittings (resuming exactly) -> generate runs through it without any
change to the library: the embedding is a tensor per encoder end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from tistudio.config import CreateOptions, GenerateOptions, TrainOptions
from tistudio.embeddings.files import read_embedding
from tistudio.generate.images import generate
from tistudio.models.conditioning import PromptEncoder, TextEncoder
from tistudio.models.families import EncoderSlot, Family
from tistudio.models.loading import SDModel
from tistudio.train.create import create_embedding
from tistudio.train.loop import train

DUO = Family(
    "duo",
    "a two-encoder test family",
    (EncoderSlot("clip_l"), EncoderSlot("clip_g", text_encoder="text_encoder_2", tokenizer="tokenizer_2")),
)


def half_width_encoder(seed: int) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    from tistudio.models.builtin import text_config

    torch.manual_seed(seed)
    config = {
        **text_config("sd1"),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 1,
        "projection_dim": 32,
    }
    return CLIPTextModel(CLIPTextConfig(**config)).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def duo_model(sd1_model) -> SDModel:
    """The tiny SD1 UNet and VAE, conditioned by two 32-wide text encoders instead of its one 64-wide one."""
    tokenizer = sd1_model.tokenizer
    text = {
        slot.key: TextEncoder(slot, tokenizer, half_width_encoder(seed))
        for slot, seed in zip(DUO.encoders, (11, 12), strict=True)
    }
    return SDModel(
        text=text,
        vae=sd1_model.vae,
        unet=sd1_model.unet,
        scheduler_config=sd1_model.scheduler_config,
        family=DUO.key,
        prediction_type=sd1_model.prediction_type,
        native_size=sd1_model.native_size,
        device=sd1_model.device,
        dtype=sd1_model.dtype,
        source="test",
        name="duo",
        spec=DUO,
    )


def test_a_second_text_stack_trains_resumes_exactly_and_generates(duo_model, photos, tmp_path: Path) -> None:
    assert duo_model.widths == {"clip_l": 32, "clip_g": 32}
    hidden = PromptEncoder.for_model(duo_model).encode(["a toy"]).hidden
    assert hidden.shape == (1, 77, 64)

    def create(folder: Path) -> Path:
        return create_embedding(
            CreateOptions(model="x", name="tomtut", init_text="toy figure", vectors=2, embeddings_dir=str(folder)),
            cache_dir=tmp_path,
            model=duo_model,
        )

    def fit(folder: Path, steps: int) -> None:
        train(
            TrainOptions(
                model="x",
                embedding="tomtut",
                dataset=str(photos),
                embeddings_dir=str(folder),
                run_dir=str(folder / "run"),
                size=64,
                batch_size=2,
                max_steps=steps,
                save_every=2,
                preview_every=2,
                preview_steps=2,
            ),
            cache_dir=tmp_path,
            model=duo_model,
        )

    start = read_embedding(create(tmp_path / "once"))
    assert {k: tuple(v.shape) for k, v in start.vectors.items()} == {"clip_l": (2, 32), "clip_g": (2, 32)}
    fit(tmp_path / "once", 4)
    create(tmp_path / "twice")
    fit(tmp_path / "twice", 2)
    fit(tmp_path / "twice", 4)
    once = read_embedding(tmp_path / "once" / "tomtut.safetensors")
    twice = read_embedding(tmp_path / "twice" / "tomtut.safetensors")
    assert once.step == twice.step == 4 and once.meta["model_family"] == "duo"
    for key in ("clip_l", "clip_g"):
        assert not torch.equal(once.vectors[key], start.vectors[key]), f"{key} was not trained"
        assert torch.equal(once.vectors[key], twice.vectors[key]), f"{key} did not resume exactly"
    assert (tmp_path / "once" / "run" / "previews" / "tomtut-4.png").is_file()

    images = generate(
        GenerateOptions(
            model="x",
            prompt="a photo of tomtut",
            steps=2,
            size="64x64",
            seed=5,
            embeddings_dir=str(tmp_path / "once"),
            out_dir=str(tmp_path / "out"),
        ),
        cache_dir=tmp_path,
        model=duo_model,
    )
    assert len(images) == 1 and images[0].image.size == (64, 64)
    with Image.open(images[0].path) as saved:
        assert 'TI hashes: "tomtut: ' in saved.text["parameters"]
