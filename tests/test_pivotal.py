"""Pivotal tuning: the word and a LoRA trained together (--lora-rank), written as files A1111, ComfyUI and diffusers
load, resumed exactly, and called back by the word in generation."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from a1111_rules import (
    a1111_compvis_layers,
    a1111_load_network,
    comfyui_lora_unet_names,
    parse_generation_parameters,
)
from ldm_export import unet_to_ldm
from test_trainables import options as seam_options
from tistudio.config import CreateOptions, GenerateOptions, TrainOptions
from tistudio.embeddings.bundle import lora_hash, read_lora
from tistudio.embeddings.files import read_embedding
from tistudio.errors import EmbeddingError, OptionError
from tistudio.generate.images import generate
from tistudio.generate.networks import take_networks
from tistudio.models.lora import model_layers
from tistudio.progress import Event
from tistudio.train.create import create_embedding
from tistudio.train.loop import train


def options(photos: Path, folder: Path, **changes) -> TrainOptions:
    """The trainable seam's tiny run (tests/test_trainables.py) with a rank-4 LoRA beside the word."""
    lora = {"loras_dir": str(folder / "loras"), "lora_rank": 4, "lora_learning_rate": "0.01"}
    return seam_options(photos, folder, **{**lora, **changes})


def new_word(model, folder: Path) -> None:
    create_embedding(
        CreateOptions(model="unused", name="tomtut", init_text="toy", vectors=2, embeddings_dir=str(folder / "emb")),
        cache_dir=folder,
        model=model,
    )


def sitting(model, photos: Path, folder: Path, stop_at: int | None = None, likeness=None, **changes):
    stop = threading.Event()

    def on_progress(progress) -> None:
        if stop_at is not None and progress.event == Event.STEP and progress.step == stop_at:
            stop.set()

    return train(
        options(photos, folder, **changes),
        cache_dir=folder,
        model=model,
        stop=stop,
        on_progress=on_progress,
        likeness=likeness,
    )


def ups(path: Path) -> list[torch.Tensor]:
    return [tensor for key, tensor in load_file(path).items() if key.endswith(".lora_up.weight")]


@pytest.fixture
def trained(sd1_model, photos, tmp_path) -> Path:
    new_word(sd1_model, tmp_path)
    result = sitting(sd1_model, photos, tmp_path)
    assert result.step == 6 and not result.stopped
    return tmp_path


def test_the_word_and_its_lora_train_together_into_the_files_people_use(sd1_model, trained) -> None:
    word = read_embedding(trained / "emb" / "tomtut.safetensors")
    assert word.step == 6 and word.meta["lora"] == "tomtut" and word.meta["lora_rank"] == "4"
    bundle = trained / "loras" / "tomtut.safetensors"
    lora = read_lora(bundle)
    assert lora.rank == 4 and lora.meta["step"] == "6" and lora.meta["ss_network_dim"] == "4"
    assert len(lora.layers()) == 4 * 2 * sum(1 for name in model_layers(sd1_model) if name.endswith("attn1_to_q"))
    trained_layers = [tensor.abs().sum() > 0 for tensor in ups(bundle)]
    # all but the innermost self-attention's q and k, which see one position in the tiny model and get no gradient
    assert sum(trained_layers) >= len(trained_layers) - 2, "the LoRA did not train"
    assert torch.equal(lora.words["tomtut"].tensor, word.tensor)  # the word bundled is the word's file
    for step in (2, 4, 6):  # each saved step has its word and its LoRA, named for the step
        copy = read_lora(trained / "run" / "loras" / f"tomtut-{step}.safetensors")
        assert copy.meta["step"] == str(step) and set(copy.words) == {f"tomtut-{step}"}
    assert not any(module._forward_hooks for module in sd1_model.unet.modules()), "the LoRA stayed in the UNet"


@pytest.mark.parametrize(
    "layout",
    [
        {},  # SD1's blocks
        {  # SDXL's: no attention in the first level, deeper transformers below
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "block_out_channels": [32, 64, 64],
            "transformer_layers_per_block": [1, 2, 2],
            "attention_head_dim": [1, 1, 1],
            "use_linear_projection": True,
        },
    ],
)
def test_a1111s_and_comfyuis_lora_loaders_find_every_layer_of_a_real_layout(layout, tmp_path) -> None:
    """Real SD1 and SDXL UNets have two resnets per level, which A1111's name conversion assumes (the tiny test
    models have one): every layer a trained LoRA writes must be a module of A1111's model, of the same shape."""
    from diffusers import UNet2DConditionModel

    from tistudio.embeddings.bundle import write_lora
    from tistudio.models.builtin import unet_config
    from tistudio.models.lora import TARGETS, target_layers

    config = {**unet_config("sd1", 64), "layers_per_block": 2, **layout}
    unet = UNet2DConditionModel(**config)
    layers = a1111_compvis_layers(unet_to_ldm(unet.state_dict(), config))
    for targets in TARGETS:
        modules = target_layers(unet, targets)
        tensors = {}
        for name, module in modules.items():
            tensors[f"{name}.lora_down.weight"] = torch.zeros(2, module.in_features)
            tensors[f"{name}.lora_up.weight"] = torch.zeros(module.out_features, 2)
            tensors[f"{name}.alpha"] = torch.tensor(2.0)
        path = write_lora(tmp_path / f"{targets}.safetensors", tensors, [], {})
        matched, failed, _ = a1111_load_network(path, layers)
        assert not failed and len(matched) == len(modules) > 0
        for key, parts in matched.items():
            assert (parts["lora_up.weight"].shape[0], parts["lora_down.weight"].shape[1]) == layers[key][:2]
        assert set(modules) <= comfyui_lora_unet_names(list(unet.state_dict()))  # ComfyUI's LoraLoader finds each


def test_a1111_registers_the_bundled_word_of_a_trained_lora(tiny_sd1, trained) -> None:
    from safetensors.torch import load_file as load

    config = {**__import__("json").loads((tiny_sd1 / "unet" / "config.json").read_text())}
    layers = a1111_compvis_layers(unet_to_ldm(load(tiny_sd1 / "unet" / "diffusion_pytorch_model.safetensors"), config))
    _, failed, bundled = a1111_load_network(trained / "loras" / "tomtut.safetensors", layers)
    assert [key for key in failed if key.startswith("bundle_emb")] == ["bundle_emb.tomtut.string_to_param.*"]
    name, vectors, _ = bundled["tomtut"]
    assert name == "tomtut" and torch.equal(vectors, read_embedding(trained / "emb" / "tomtut.safetensors").tensor)


def test_diffusers_loads_the_lora_and_draws_what_tistudio_draws(sd1_model, tiny_sd1, trained) -> None:
    """diffusers' own kohya converter and PEFT layers against tistudio's merge: the same UNet output."""
    from diffusers import UNet2DConditionModel

    from tistudio.embeddings.bundle import LoraFile
    from tistudio.generate.networks import LoadedLora, LoraCall, model_networks
    from tistudio.models.lora import merged

    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline

    from tistudio.cli import main

    assert (
        main(
            [
                "convert",
                str(trained / "loras" / "tomtut.safetensors"),
                "--to",
                "diffusers",
                "--out-dir",
                str(trained / "for"),
            ]
        )
        == 0
    )
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd1), safety_checker=None, requires_safety_checker=False)
    plain = read_lora(trained / "for" / "tomtut.lora.safetensors")
    assert not plain.words
    pipe.load_lora_weights(str(trained / "for"), weight_name="tomtut.lora.safetensors")
    pipe.load_textual_inversion(str(trained / "for" / "tomtut.safetensors"), token="tomtut")  # the word, apart
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 77, sd1_model.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = pipe.unet(sample, 500, context).sample
        loaded = LoadedLora(LoraCall("tomtut"), LoraFile("tomtut", plain.tensors), trained / "loras")
        with merged(sd1_model, model_networks(sd1_model, [loaded])):
            ours = sd1_model.unet(sample, 500, context).sample
        without = sd1_model.unet(sample, 500, context).sample
    assert isinstance(pipe.unet, UNet2DConditionModel)
    assert (ours - without).abs().max() > 1e-4, "the LoRA changes nothing: the test would prove nothing"
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)


def test_a_stopped_run_resumes_word_lora_and_optimizer_bit_for_bit(sd1_model, photos, tmp_path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for folder in (straight, resumed):
        new_word(sd1_model, folder)
    sitting(sd1_model, photos, straight)
    first = sitting(sd1_model, photos, resumed, stop_at=3)
    assert first.stopped and first.step == 3
    second = sitting(sd1_model, photos, resumed)
    assert second.start_step == 3 and second.step == 6
    a, b = (load_file(folder / "loras" / "tomtut.safetensors") for folder in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    state = load_file(next((resumed / "run" / "state").glob("state-*.safetensors")))
    assert any(key.startswith("optimizer.lora_unet_") and key.endswith("exp_avg_sq") for key in state)


def test_resuming_without_the_lora_or_with_another_rank_is_refused_before_any_compute(sd1_model, trained) -> None:
    for rank in (0, 8):
        with pytest.raises(OptionError, match="lora_rank") as caught:
            sitting(sd1_model, trained / "photos", trained, lora_rank=rank, max_steps=8)
        assert "--lora-rank 4" in str(caught.value)


def test_the_lora_joins_after_its_share_of_the_steps(sd1_model, photos, tmp_path) -> None:
    new_word(sd1_model, tmp_path)
    sitting(sd1_model, photos, tmp_path, lora_start=0.5)  # steps 1-3 the word alone, then both
    at_two = ups(tmp_path / "run" / "loras" / "tomtut-2.safetensors")
    assert all(tensor.abs().sum() == 0 for tensor in at_two)
    assert sum(tensor.abs().sum() > 0 for tensor in ups(tmp_path / "loras" / "tomtut.safetensors")) > 10


def test_the_kept_best_step_keeps_that_steps_lora(sd1_model, photos, tmp_path) -> None:
    new_word(sd1_model, tmp_path)
    judged = iter([0.0, 0.9, 0.5, 0.2])  # a likeness that peaks at the evaluation of step 2
    result = sitting(sd1_model, photos, tmp_path, likeness=lambda model, encoder: next(judged))
    assert result.best_step == 2
    kept = load_file(tmp_path / "loras" / "tomtut.safetensors")
    at_two = load_file(tmp_path / "run" / "loras" / "tomtut-2.safetensors")
    assert all(torch.equal(kept[key], at_two[key]) for key in kept if key.startswith("lora_unet"))


# -- generation -------------------------------------------------------------------------------------------------


def draw(model, folder: Path, prompt: str, **changes):
    base = dict(
        model="unused",
        prompt=prompt,
        steps=3,
        sampler="Euler",
        size="64x64",
        seed=7,
        embeddings_dir=str(folder / "emb"),
        loras_dir=str(folder / "loras"),
        out_dir=str(folder / "out"),
    )
    base.update(changes)
    return generate(GenerateOptions(**base), cache_dir=folder, model=model)


def pixels(images) -> torch.Tensor:
    import numpy as np

    return torch.tensor(np.asarray(images[0].image), dtype=torch.float32)


def test_the_word_calls_its_lora_itself_and_says_so_as_a1111_does(sd1_model, trained) -> None:
    weights = {name: module.weight.detach().clone() for name, module in model_layers(sd1_model).items()}
    called = draw(sd1_model, trained, "a photo of tomtut")
    explicit = draw(sd1_model, trained, "a photo of tomtut <lora:tomtut:1>")
    off = draw(sd1_model, trained, "a photo of tomtut <lora:tomtut:0>")
    assert torch.equal(pixels(called), pixels(explicit))
    assert not torch.equal(pixels(called), pixels(off))
    fields = parse_generation_parameters(called[0].infotext)
    assert fields["Prompt"] == "a photo of tomtut <lora:tomtut:1>"  # A1111 draws the same picture from it
    assert fields["Lora hashes"] == f"tomtut: {lora_hash(trained / 'loras' / 'tomtut.safetensors')}"
    assert parse_generation_parameters(explicit[0].infotext)["Prompt"] == "a photo of tomtut <lora:tomtut:1>"
    assert all(torch.equal(module.weight, weights[name]) for name, module in model_layers(sd1_model).items())


def test_a_bundle_brings_its_word_unless_the_embeddings_folder_has_one(sd1_model, trained) -> None:
    with_file = draw(sd1_model, trained, "a photo of tomtut <lora:tomtut:1>")
    (trained / "emb" / "tomtut.safetensors").rename(trained / "elsewhere.safetensors")
    from_bundle = draw(sd1_model, trained, "a photo of tomtut <lora:tomtut:1>")
    assert torch.equal(pixels(with_file), pixels(from_bundle))  # the same word, from inside the LoRA file
    plain = draw(sd1_model, trained, "a photo of tomtut", lora="tomtut:1")
    assert torch.equal(pixels(plain), pixels(from_bundle))  # --lora says what the tag says


def test_lora_calls_that_cannot_work_get_a_clear_error(sd1_model, sdxl_model, trained) -> None:
    with pytest.raises(OptionError, match=r"no LoRA file nobody\.safetensors"):
        draw(sd1_model, trained, "a photo <lora:nobody:1>")
    with pytest.raises(OptionError, match="weight is a number"):
        draw(sd1_model, trained, "a photo <lora:tomtut:lots>")
    with pytest.raises(EmbeddingError, match="a LoRA for another model"):
        draw(sdxl_model, trained, "a photo <lora:tomtut:1>", size="64x64")


def test_prompt_tags_are_taken_out_as_a1111_reads_them() -> None:
    text, calls = take_networks("a <lora:one> photo <lora:two:0.5> of <lora:three:0.2:0.7> x <hypernet:h:1>")
    assert text == "a  photo  of  x "
    assert [(c.name, c.te_weight, c.unet_weight) for c in calls] == [
        ("one", 1.0, 1.0),
        ("two", 0.5, 0.5),
        ("three", 0.2, 0.7),
    ]
    _, named = take_networks("<lora:four:te=0.3:unet=0.9>")
    assert (named[0].te_weight, named[0].unet_weight) == (0.3, 0.9)


def test_the_command_line_trains_picks_a_step_and_draws_with_the_word_and_its_lora(tiny_sd1, photos, tmp_path, capsys):
    from PIL import Image

    from tistudio.cli import main

    model = ["--model", str(tiny_sd1)]
    assert main(["create", "tomtut", *model, "--init-text", "toy", "--vectors", "2"]) == 0
    train_args = ["train", "tomtut", *model, "--dataset", str(photos), "--size", "64", "--max-steps", "4"]
    train_args += ["--save-every", "2", "--preview-every", "0", "--eval-every", "0", "--lora-rank", "4", "-q"]
    assert main(train_args) == 0
    assert main(["inspect", "loras/tomtut.safetensors"]) == 0
    shown = capsys.readouterr().out
    assert "with bundled words" in shown and "tomtut (2 vectors, clip)" in shown and "rank: 4" in shown
    assert main(["use-step", "tomtut", "2"]) == 0
    assert read_lora(Path("loras/tomtut.safetensors")).meta["step"] == "2"
    assert read_embedding(Path("embeddings/tomtut.safetensors")).step == 2
    assert main(["generate", "a photo of tomtut", *model, "--steps", "2", "--size", "64x64", "--seed", "1", "-q"]) == 0
    text = Image.open(next(Path("outputs").glob("*.png"))).text["parameters"]
    assert text.startswith("a photo of tomtut <lora:tomtut:1>\n") and "Lora hashes: " in text
    # going on from the chosen step sets the later steps aside, the last step's word and its LoRA each whole
    assert main([*train_args, "--max-steps", "6", "--continue-from", "kept"]) == 0
    (aside,) = Path("runs/tomtut").glob("after-2-*")
    assert read_embedding(aside / "tomtut-last.safetensors").step == 4
    assert read_lora(aside / "loras" / "tomtut-last.safetensors").meta["step"] == "4"
    assert read_lora(Path("loras/tomtut.safetensors")).meta["step"] == "6"
    assert main(["train", "tomtut", *model, "--dataset", str(photos), "--max-steps", "6", "-q"]) == 2
    assert "--lora-rank 4" in capsys.readouterr().err  # resuming without the LoRA is refused in one line


def test_sdxl_trains_both_encoders_words_beside_a_lora(sdxl_model, photos, tmp_path) -> None:
    new_word(sdxl_model, tmp_path)
    sitting(sdxl_model, photos, tmp_path, max_steps=2, eval_every=0, save_every=0, preview_every=0)
    lora = read_lora(tmp_path / "loras" / "tomtut.safetensors")
    word = read_embedding(tmp_path / "emb" / "tomtut.safetensors")
    assert set(lora.words["tomtut"].vectors) == {"clip_l", "clip_g"}
    assert all(torch.equal(lora.words["tomtut"].vectors[key], word.vectors[key]) for key in word.vectors)
    keys = load_file(tmp_path / "loras" / "tomtut.safetensors")
    assert "bundle_emb.tomtut.clip_l" in keys and "bundle_emb.tomtut.clip_g" in keys
