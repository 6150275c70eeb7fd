"""Models: diffusers folders and single-file checkpoints (.safetensors, .ckpt) load offline, identically."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ldm_export import export_single_file
from tistudio.config import ModelOptions
from tistudio.errors import ModelError
from tistudio.models.loading import load_model, resolve_dtype, source_kind


@pytest.fixture(scope="module")
def single_files(tiny_sd1: Path, tiny_sd2: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("single")
    files = {}
    for family, model in (("sd1", tiny_sd1), ("sd2", tiny_sd2)):
        state = export_single_file(model, family)
        save_file(state, folder / f"{family}.safetensors")
        torch.save({"state_dict": state, "global_step": 1000, "epoch": 3}, folder / f"{family}.ckpt")
        files[family] = folder / f"{family}.safetensors"
        files[family + "-ckpt"] = folder / f"{family}.ckpt"
    return files


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    left, right = a.state_dict(), b.state_dict()
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


@pytest.mark.parametrize("kind", ["sd1", "sd1-ckpt", "sd2", "sd2-ckpt"])
def test_single_file_loads_bit_identical_to_the_folder(kind, single_files, tiny_sd1, tiny_sd2, cache_dir) -> None:
    folder = tiny_sd1 if kind.startswith("sd1") else tiny_sd2
    reference = load_model(ModelOptions(model=str(folder)), cache_dir)
    loaded = load_model(ModelOptions(model=str(single_files[kind])), cache_dir)
    for part in ("unet", "vae", "text_encoder"):
        assert same_weights(getattr(reference, part), getattr(loaded, part)), part
    assert loaded.family == kind[:3]
    assert loaded.prediction_type == ("epsilon" if kind.startswith("sd1") else "v_prediction")
    assert loaded.native_size == (512 if kind.startswith("sd1") else 768)
    assert len(loaded.hash) == 10
    assert len(loaded.tokenizer) == 49408


def test_format_is_read_from_content_not_extension(single_files, tmp_path, cache_dir) -> None:
    renamed = tmp_path / "really-safetensors.ckpt"
    renamed.write_bytes(single_files["sd1"].read_bytes())
    assert load_model(ModelOptions(model=str(renamed)), cache_dir).family == "sd1"


def test_real_world_ckpt_with_a_lightning_callback_loads_without_running_it(
    single_files, tmp_path, cache_dir, monkeypatch
) -> None:
    # Real SD .ckpt files hold PyTorch Lightning's ModelCheckpoint class as a dict key. Build one with a
    # stand-in module of that name, then remove the module: loading must not need (or run) it.
    package = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__ = package.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    package.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"):
        monkeypatch.setitem(sys.modules, name, package)
    state = torch.load(single_files["sd1-ckpt"], weights_only=True)
    state["callbacks"] = {ModelCheckpoint: {"best_model_score": torch.tensor(0.1)}}
    path = tmp_path / "lightning.ckpt"
    torch.save(state, path)
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"):
        monkeypatch.delitem(sys.modules, name)
    assert load_model(ModelOptions(model=str(path)), cache_dir).family == "sd1"


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_ckpt_is_refused_and_nothing_runs(tmp_path, cache_dir) -> None:
    marker = tmp_path / "pwned"
    torch.save(
        {"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "evil": Payload(marker)}, tmp_path / "evil.ckpt"
    )
    with pytest.raises(ModelError, match="refused"):
        load_model(ModelOptions(model=str(tmp_path / "evil.ckpt")), cache_dir)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (
            {"conditioner.embedders.0.transformer.text_model.x": 1, "model.diffusion_model.input_blocks.0.0.weight": 1},
            "SDXL",
        ),
        ({"model.diffusion_model.joint_blocks.0.x": 1}, "Stable Diffusion 3"),
        ({"lora_unet_down_blocks_0.alpha": 1}, "no Stable Diffusion UNet"),
        ({"model.diffusion_model.input_blocks.0.0.weight": 1, "cond_stage_model.transformer.x": 1}, "no VAE weights"),
    ],
)
def test_unsupported_checkpoints_are_refused_with_what_they_are(keys, message, tmp_path, cache_dir) -> None:
    path = tmp_path / "other.safetensors"
    save_file({k: torch.zeros(v) for k, v in keys.items()}, path)
    with pytest.raises(ModelError, match=message):
        load_model(ModelOptions(model=str(path)), cache_dir)


def test_inpainting_checkpoint_is_refused(single_files, tmp_path, cache_dir) -> None:
    from safetensors.torch import load_file

    state = load_file(single_files["sd1"])
    key = "model.diffusion_model.input_blocks.0.0.weight"
    state[key] = torch.zeros((state[key].shape[0], 9, 3, 3))
    save_file(state, tmp_path / "inpaint.safetensors")
    with pytest.raises(ModelError, match="inpainting"):
        load_model(ModelOptions(model=str(tmp_path / "inpaint.safetensors")), cache_dir)


def test_prediction_type_comes_from_the_checkpoint_or_its_yaml(single_files, tmp_path, cache_dir) -> None:
    copy = tmp_path / "sd2base.safetensors"
    copy.write_bytes(single_files["sd2"].read_bytes())
    (tmp_path / "sd2base.yaml").write_text('model:\n  params:\n    parameterization: "eps"\n')
    model = load_model(ModelOptions(model=str(copy)), cache_dir, text_only=True)
    assert model.prediction_type == "epsilon" and model.native_size == 512
    assert "sd2base.yaml" in model.notes[0]
    forced = load_model(ModelOptions(model=str(copy), prediction_type="v_prediction"), cache_dir, text_only=True)
    assert forced.prediction_type == "v_prediction"


def test_text_only_loading_skips_unet_and_vae(single_files, cache_dir) -> None:
    model = load_model(ModelOptions(model=str(single_files["sd1"])), cache_dir, text_only=True)
    assert model.unet is None and model.vae is None and model.width == 64


def test_bad_model_specs_get_clear_errors(tmp_path, cache_dir) -> None:
    with pytest.raises(ModelError, match="no such file"):
        source_kind(str(tmp_path / "missing.safetensors"))
    with pytest.raises(ModelError, match=r"model_index\.json"):
        source_kind(str(tmp_path))
    (tmp_path / "notes.ckpt").write_text("hello")
    with pytest.raises(ModelError, match="not a checkpoint"):
        load_model(ModelOptions(model=str(tmp_path / "notes.ckpt")), cache_dir)
    assert source_kind("runwayml/stable-diffusion-v1-5") == "hub"


def test_hub_ids_stay_offline(cache_dir, monkeypatch) -> None:
    monkeypatch.setenv("HF_HOME", str(cache_dir / "empty-hf-home"))
    with pytest.raises(ModelError, match="local Hugging Face cache"):
        load_model(ModelOptions(model="someone/not-cached-model"), cache_dir)


def test_precision_defaults() -> None:
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ModelError, match="fp16"):
        resolve_dtype("fp16", torch.device("cpu"))


@pytest.mark.parametrize(
    ("class_name", "message"),
    [
        ("StableDiffusionXLPipeline", "SDXL"),
        ("FluxPipeline", "only Stable Diffusion"),
        ("StableDiffusionInpaintPipeline", "plain text-to-image"),
    ],
)
def test_other_diffusers_pipelines_are_refused_before_loading(class_name, message, tmp_path, cache_dir) -> None:
    import json

    (tmp_path / "m" / "unet").mkdir(parents=True)
    (tmp_path / "m" / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    with pytest.raises(ModelError, match=message):
        load_model(ModelOptions(model=str(tmp_path / "m")), cache_dir)


def test_a_text_only_load_knows_the_native_size(tiny_sd1, cache_dir) -> None:
    """Creating an embedding loads the text encoders alone; it logged the family's 512 px (1024 for SDXL) for the
    demo models, whose pictures are 64 px. (Issue 33.)"""
    from tistudio.config import ModelOptions
    from tistudio.models.loading import load_model

    whole = load_model(ModelOptions(model=str(tiny_sd1)), cache_dir)
    text = load_model(ModelOptions(model=str(tiny_sd1)), cache_dir, text_only=True)
    assert text.unet is None and text.native_size == whole.native_size == 64


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sd1-ckpt"])
def test_the_width_embeddings_need_is_read_without_loading_weights(kind, single_files, cache_dir) -> None:
    from tistudio.models.loading import model_width

    options = ModelOptions(model=str(single_files[kind]))
    expected = None if kind.endswith("ckpt") else load_model(options, cache_dir, text_only=True).width
    assert model_width(options, cache_dir) == expected  # a pickled .ckpt is not opened for it
