"""The trainable seam: something that lives in the UNet trains beside the word through the unchanged loop, previews
with it, resumes bit-exactly and keeps its best step - with nothing in the trainer named after it."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tistudio.config import CreateOptions, TrainOptions
from tistudio.embeddings.files import read_embedding
from tistudio.errors import TistudioError
from tistudio.progress import Event
from tistudio.schedule import parse_schedule
from tistudio.storage import write_safetensors
from tistudio.train.create import create_embedding
from tistudio.train.loop import train
from tistudio.train.trainable import ParameterGroup, Trainables, TrainableSetup

KEY = "unet.conv_in.shift"


def shift_path(word_file: Path) -> Path:
    return word_file.with_name(f"{word_file.stem}.shift.safetensors")


class ConvInShift:
    """A learned per-channel shift of the UNet's first convolution, added by a forward hook: small, inside the UNet,
    with its own learning rate, its own resume tensor and its own file beside the word's."""

    def __init__(self, setup: TrainableSetup) -> None:
        conv = setup.model.unet.conv_in
        values = torch.zeros(conv.out_channels)
        if setup.step > 0 and shift_path(setup.source).is_file():
            values = load_file(shift_path(setup.source))[KEY]
        self.shift = torch.nn.Parameter(values.to(setup.model.device, torch.float32).clone())
        self.schedule = parse_schedule("0.05", max_steps=setup.options.max_steps, start_step=setup.step)
        self.initial: dict[str, torch.Tensor] = {}
        self.handle = None
        self.calls = {"training": 0, "drawing": 0}

    def parameters(self) -> dict[str, torch.nn.Parameter]:
        return {KEY: self.shift}

    def groups(self) -> list[ParameterGroup]:
        return [ParameterGroup((KEY,), self.schedule, "the conv_in shift")]

    def install(self, model, encoder) -> None:
        def hook(module, inputs, output):
            self.calls["training" if torch.is_grad_enabled() else "drawing"] += 1
            return output + self.shift.view(1, -1, 1, 1).to(output.dtype)

        self.handle = model.unet.conv_in.register_forward_hook(hook)

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def start(self, saved: Mapping[str, torch.Tensor] | None) -> None:
        start = saved.get("shift.init") if saved is not None else None
        self.initial = {KEY: (start if start is not None else self.shift.detach()).to(torch.float32).clone()}

    @contextmanager
    def using(self, values: Mapping[str, torch.Tensor]) -> Iterator[None]:
        kept = self.shift.detach().clone()
        with torch.no_grad():
            self.shift.copy_(values[KEY])
        try:
            yield
        finally:
            with torch.no_grad():
                self.shift.copy_(kept)

    def penalty(self) -> None:
        return None

    def constrain(self) -> None:
        pass

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {KEY: self.shift.detach().to("cpu", torch.float32).clone()}

    def start_values(self) -> dict[str, torch.Tensor]:
        return dict(self.initial)

    def neutral_start(self) -> None:
        return None

    def state(self) -> dict[str, torch.Tensor]:
        return {"shift.init": self.initial[KEY]}

    def write(self, values, path: Path, *, name: str, step: int, meta=None) -> Path:
        return write_safetensors(
            shift_path(path), {KEY: values[KEY].to("cpu", torch.float32).contiguous()}, {"step": str(step)}
        )


def options(photos: Path, folder: Path, **changes) -> TrainOptions:
    base = dict(
        model="unused",
        embedding="tomtut",
        dataset=str(photos),
        embeddings_dir=str(folder / "emb"),
        run_dir=str(folder / "run"),
        size=64,
        batch_size=2,
        max_steps=6,
        eval_every=2,
        eval_samples=4,
        save_every=2,
        preview_every=3,
        preview_steps=2,
        learning_rate="0.005",
        likeness="off",
    )
    base.update(changes)
    return TrainOptions(**base)


def sitting(model, photos: Path, folder: Path, made: list[ConvInShift], stop_at: int | None = None, likeness=None):
    stop = threading.Event()

    def make(setup: TrainableSetup) -> ConvInShift:
        made.append(ConvInShift(setup))
        return made[-1]

    def on_progress(progress) -> None:
        if stop_at is not None and progress.event == Event.STEP and progress.step == stop_at:
            stop.set()

    return train(
        options(photos, folder),
        cache_dir=folder,
        model=model,
        stop=stop,
        on_progress=on_progress,
        likeness=likeness,
        beside=[make],
    )


def new_word(model, folder: Path) -> None:
    create_embedding(
        CreateOptions(model="unused", name="tomtut", init_text="toy", vectors=2, embeddings_dir=str(folder / "emb")),
        cache_dir=folder,
        model=model,
    )


def test_a_trainable_in_the_unet_trains_previews_and_resumes_exactly(sd1_model, photos, tmp_path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for folder in (straight, resumed):
        new_word(sd1_model, folder)
    made: list[ConvInShift] = []
    whole = sitting(sd1_model, photos, straight, made)
    assert whole.step == 6 and len(whole.previews) == 3  # steps 0, 3 and 6
    assert made[0].calls["training"] > 0 and made[0].calls["drawing"] > 0  # the loop, the evaluator and previews
    assert not sd1_model.unet.conv_in._forward_hooks, "the trainable was not removed from the model"
    trained = load_file(shift_path(straight / "emb" / "tomtut.safetensors"))[KEY]
    assert trained.abs().sum() > 0, "the shift did not train"
    assert load_file(shift_path(straight / "run" / "embeddings" / "tomtut-2.safetensors"))[KEY].abs().sum() > 0

    first = sitting(sd1_model, photos, resumed, made, stop_at=3)
    assert first.stopped and first.step == 3
    second = sitting(sd1_model, photos, resumed, made)
    assert second.start_step == 3 and second.step == 6
    assert torch.equal(load_file(shift_path(resumed / "emb" / "tomtut.safetensors"))[KEY], trained)
    a = read_embedding(straight / "emb" / "tomtut.safetensors")
    b = read_embedding(resumed / "emb" / "tomtut.safetensors")
    assert a.step == b.step == 6 and torch.equal(a.tensor, b.tensor)
    state = load_file(next((resumed / "run" / "state").glob("state-*.safetensors")))
    assert f"optimizer.{KEY}.exp_avg" in state and "shift.init" in state  # its own part of the resume state


def test_the_best_step_keeps_the_unet_trainable_of_that_step(sd1_model, photos, tmp_path) -> None:
    new_word(sd1_model, tmp_path)
    judged = iter([0.0, 0.9, 0.5, 0.2])  # a likeness that peaks at the evaluation of step 2

    result = sitting(sd1_model, photos, tmp_path, [], likeness=lambda model, encoder: next(judged))
    assert result.best_step == 2
    kept = load_file(shift_path(tmp_path / "emb" / "tomtut.safetensors"))[KEY]
    at_two = load_file(shift_path(tmp_path / "run" / "embeddings" / "tomtut-2.safetensors"))[KEY]
    last = load_file(shift_path(tmp_path / "run" / "tomtut-last.safetensors"))[KEY]
    assert torch.equal(kept, at_two) and not torch.equal(kept, last)
    assert read_embedding(tmp_path / "emb" / "tomtut.safetensors").step == 2


def test_trainables_refuse_overlapping_keys(sd1_model, tmp_path) -> None:
    setup = TrainableSetup(
        sd1_model,
        options(tmp_path, tmp_path),
        parse_schedule("0.005", max_steps=6),
        tmp_path / "emb" / "tomtut.safetensors",
        0,
    )
    with pytest.raises(TistudioError, match="share the parameter keys"):
        Trainables([ConvInShift(setup), ConvInShift(setup)])


def test_the_denoiser_is_chosen_by_the_objective_a_family_names(sd1_model) -> None:
    from dataclasses import replace

    from tistudio.errors import ModelError
    from tistudio.models.conditioning import PromptEncoder
    from tistudio.train.objective import NoisePrediction, denoiser_for

    encoder = PromptEncoder.for_model(sd1_model)
    assert isinstance(denoiser_for(sd1_model, encoder), NoisePrediction)
    flowing = replace(sd1_model, spec=replace(sd1_model.spec, objective="flow"))
    with pytest.raises(ModelError, match="'flow' objective"):
        denoiser_for(flowing, encoder)
