"""Training: only the new vectors change, resume is exact, and training really learns."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import torch

from tistudio.config import CreateOptions, TrainOptions
from tistudio.embeddings.files import Embedding, read_embedding, write_embedding
from tistudio.errors import DatasetError, EmbeddingError, OptionError
from tistudio.train.create import create_embedding
from tistudio.train.loop import train
from tistudio.train.runfolder import RunFolder


def new_embedding(model, folder: Path, name: str = "tomtut", vectors: int = 2, init: str = "toy") -> Path:
    return create_embedding(
        CreateOptions(
            model="unused", name=name, init_text=init, vectors=vectors, embeddings_dir=str(folder), overwrite=True
        ),
        cache_dir=Path("cache"),
        model=model,
    )


def options(photos: Path, folder: Path, **changes) -> TrainOptions:
    base = dict(
        model="unused",
        embedding="tomtut",
        dataset=str(photos),
        embeddings_dir=str(folder),
        run_dir=str(folder.parent / "run"),
        size=64,
        batch_size=2,
        max_steps=6,
        preview_every=0,
        save_every=0,
        learning_rate="0.005",
    )
    base.update(changes)
    return TrainOptions(**base)


def test_only_the_new_vectors_change(sd1_model, photos, tmp_path) -> None:
    new_embedding(sd1_model, tmp_path / "emb")
    before = {
        part: {k: v.clone() for k, v in getattr(sd1_model, part).state_dict().items()}
        for part in ("unet", "vae", "text_encoder")
    }
    start = read_embedding(tmp_path / "emb" / "tomtut.safetensors").tensor
    train(options(photos, tmp_path / "emb", max_steps=5), cache_dir=tmp_path, model=sd1_model)
    after = read_embedding(tmp_path / "emb" / "tomtut.safetensors")
    assert after.step == 5 and not torch.equal(after.tensor, start)
    for part, state in before.items():
        now = getattr(sd1_model, part).state_dict()
        assert now.keys() == state.keys()
        assert all(torch.equal(now[k], state[k]) for k in state), f"{part} changed"
    for part in ("unet", "vae", "text_encoder"):
        for name, parameter in getattr(sd1_model, part).named_parameters():
            assert not parameter.requires_grad and parameter.grad is None, f"{part}.{name} has a gradient"


def test_the_vectors_gradient_is_the_same_every_time(sd1_model) -> None:
    # A name that appears many times in a batch of prompts: its gradient sums many contributions, which must be
    # added in the same order every time for a step (and so a resumed run) to come out the same to the last bit.
    from tistudio.models.conditioning import PromptEncoder

    encoder = PromptEncoder.for_model(sd1_model)
    vectors = torch.nn.Parameter(torch.randn((4, 64), generator=torch.Generator().manual_seed(0)) * 0.01)
    encoder.set_embeddings({"tomtut": vectors})
    gradients = []
    for _ in range(5):
        encoder.encode(["a photo of tomtut, smiling, tomtut"] * 16).hidden.pow(2).sum().backward()
        gradients.append(vectors.grad)
        vectors.grad = None
    encoder.set_embeddings({})
    assert all(torch.equal(gradient, gradients[0]) for gradient in gradients[1:])


def run(model, photos, folder: Path, stop_at: int | None = None, **changes):
    stop = threading.Event()

    def on_progress(progress) -> None:
        if stop_at is not None and progress.event == "step" and progress.step == stop_at:
            stop.set()

    return train(options(photos, folder, **changes), cache_dir=folder, model=model, on_progress=on_progress, stop=stop)


def twin_folders(model, tmp_path: Path) -> tuple[Path, Path]:
    """Two embeddings folders holding the same new embedding: one to train straight, one to stop and resume."""
    template = new_embedding(model, tmp_path / "template")
    straight, resumed = tmp_path / "straight" / "emb", tmp_path / "resumed" / "emb"
    for folder in (straight, resumed):
        folder.mkdir(parents=True)
        shutil.copy(template, folder / "tomtut.safetensors")
    return straight, resumed


@pytest.mark.parametrize("k", [1, 3, 5])
def test_resume_equals_an_uninterrupted_run(sd1_model, photos, tmp_path, k) -> None:
    settings = dict(
        max_steps=8, gradient_accumulation=2, flip=True, learning_rate="0.01:4, 0.003", save_every=3, shuffle_tags=True
    )
    straight, resumed = twin_folders(sd1_model, tmp_path)
    run(sd1_model, photos, straight, **settings)
    first = run(sd1_model, photos, resumed, stop_at=k, **settings)
    assert first.stopped and first.step == k
    assert read_embedding(resumed / "tomtut.safetensors").step == k
    second = run(sd1_model, photos, resumed, **settings)
    assert second.start_step == k and second.step == 8 and not second.stopped
    a, b = read_embedding(straight / "tomtut.safetensors"), read_embedding(resumed / "tomtut.safetensors")
    assert a.step == b.step == 8
    assert torch.equal(a.tensor, b.tensor), "resumed vectors differ from the uninterrupted run"
    from safetensors.torch import load_file

    state_a = load_file(straight.parent / "run" / "state" / "state-8.safetensors")
    state_b = load_file(resumed.parent / "run" / "state" / "state-8.safetensors")
    assert state_a.keys() == state_b.keys() and all(torch.equal(state_a[x], state_b[x]) for x in state_a)
    assert sorted(p.name for p in (resumed.parent / "run" / "state").iterdir()) == [
        "state-8.json",
        "state-8.safetensors",
    ]
    rows = (straight.parent / "run" / "loss.csv").read_text().splitlines()
    assert rows == (resumed.parent / "run" / "loss.csv").read_text().splitlines()
    assert len(rows) == 9


def test_a_stop_acts_within_one_micro_batch_and_the_run_still_resumes_exactly(
    sd1_model, photos, tmp_path, monkeypatch
) -> None:
    """At a large gradient accumulation one step is many micro-batches (a served 1024-accumulation job ignored stop
    for minutes): a stop asked between two of them drops that step unapplied, and resuming gives the vectors of an
    uninterrupted run, bit for bit."""
    from tistudio.train.objective import NoisePrediction

    settings = dict(max_steps=6, gradient_accumulation=3, eval_every=0, save_every=2)
    straight, resumed = twin_folders(sd1_model, tmp_path)
    run(sd1_model, photos, straight, **settings)
    calls, stop = [], threading.Event()
    real_loss = NoisePrediction.loss

    def counting_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3 * 3 + 2:  # two micro-batches into step 4
            stop.set()
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(NoisePrediction, "loss", counting_loss)
    first = train(options(photos, resumed, **settings), cache_dir=resumed, model=sd1_model, stop=stop)
    assert len(calls) == 11, "the step went on after the stop"
    assert first.stopped and first.step == 3 and read_embedding(resumed / "tomtut.safetensors").step == 3
    assert RunFolder(resumed.parent / "run", "tomtut").copy_steps() == [2, 3]  # the stop's step can be chosen later
    monkeypatch.setattr(NoisePrediction, "loss", real_loss)
    second = train(options(photos, resumed, **settings), cache_dir=resumed, model=sd1_model)
    assert second.start_step == 3 and second.step == 6
    a, b = read_embedding(straight / "tomtut.safetensors"), read_embedding(resumed / "tomtut.safetensors")
    assert torch.equal(a.tensor, b.tensor), "the dropped step changed what the resume continued from"


def test_several_preview_prompts_draw_a_picture_each_at_every_preview(sd1_model, photos, tmp_path) -> None:
    """(Issue 33: more than one preview prompt.) One per line: NAME-STEP.png for the first, NAME-STEP-2.png ..."""
    from PIL import Image

    from tistudio.config import validate_train

    folder = tmp_path / "emb"
    new_embedding(sd1_model, folder)
    prompts = "a photo of tomtut\n\n  a painting of tomtut on a beach  \n"
    run(sd1_model, photos, folder, max_steps=2, preview_every=2, preview_steps=2, preview_prompt=prompts)
    previews = tmp_path / "run" / "previews"
    assert sorted(p.name for p in previews.iterdir()) == [
        "tomtut-0-2.png",
        "tomtut-0.png",
        "tomtut-2-2.png",
        "tomtut-2.png",
    ]
    with Image.open(previews / "tomtut-2-2.png") as image:
        assert image.text["parameters"].startswith("a painting of tomtut on a beach\n")
    folder_run = RunFolder(tmp_path / "run", "tomtut")
    assert folder_run.preview_steps() == [0, 2] and folder_run.more_previews(2) == [previews / "tomtut-2-2.png"]
    with pytest.raises(OptionError, match="at most 8 preview prompts"):
        validate_train(options(photos, folder, preview_prompt="\n".join(f"prompt {i}" for i in range(9))))


def test_why_no_likeness_judged_a_run_is_recorded_with_it(sd1_model, photos, tmp_path) -> None:
    """The test photos show no face: options.json says why the loss chose the step, for the page and the report
    (it was only in the log; issue 33)."""
    import json

    from tistudio.extras import faces_available

    folder = tmp_path / "emb"
    new_embedding(sd1_model, folder)
    run(sd1_model, photos, folder, max_steps=2, eval_every=2, likeness="auto")
    judged = json.loads((tmp_path / "run" / "options.json").read_text())["resolved"]["likeness"]
    reason = "training images show a face large enough" if faces_available() else "needs pip install"
    assert judged.startswith("none: the fixed-batch loss chooses the step (") and reason in judged, judged


def test_a_resume_state_of_the_earlier_layout_still_resumes_exactly(sd1_model, photos, tmp_path) -> None:
    """Runs left by the release before states were kept by encoder key (one trained tensor under unkeyed names)."""
    import json

    from safetensors.torch import load_file, save_file

    settings = dict(max_steps=6, gradient_accumulation=2, save_every=3, init_pull=0.1, eval_every=2)
    straight, resumed = twin_folders(sd1_model, tmp_path)
    run(sd1_model, photos, straight, **settings)
    run(sd1_model, photos, resumed, stop_at=3, **settings)
    states = resumed.parent / "run" / "state"
    keyed = load_file(states / "state-3.safetensors")
    old_names = {"vectors.clip": "vectors", "init.clip": "init_vectors", "kept.clip": "kept_vectors"}
    unkeyed = {old_names.get(k, k.removeprefix("optimizer.clip.")): v for k, v in keyed.items()}
    assert set(unkeyed) == {"vectors", "init_vectors", "kept_vectors", "exp_avg", "exp_avg_sq", "step"}
    save_file(unkeyed, states / "state-3.safetensors")
    meta = json.loads((states / "state-3.json").read_text())
    (states / "state-3.json").write_text(json.dumps({**meta, "scalars": {}}))
    second = run(sd1_model, photos, resumed, **settings)
    assert second.start_step == 3 and second.step == 6
    a, b = read_embedding(straight / "tomtut.safetensors"), read_embedding(resumed / "tomtut.safetensors")
    assert a.step == b.step and torch.equal(a.tensor, b.tensor)


def test_gradient_checkpointing_gives_the_same_embedding(sd1_model, photos, tmp_path) -> None:
    """The low-memory option recomputes activations; the trained vectors are the same, and it is switched off after."""
    results, seen = [], []
    for checkpointing in (False, True):
        folder = tmp_path / f"checkpointing-{checkpointing}" / "emb"
        new_embedding(sd1_model, folder)
        train(
            options(photos, folder, max_steps=3, gradient_checkpointing=checkpointing),
            cache_dir=folder,
            model=sd1_model,
            on_progress=lambda p: seen.append(sd1_model.unet.is_gradient_checkpointing),
        )
        results.append(read_embedding(folder / "tomtut.safetensors").tensor)
    assert True in seen and False in seen
    assert not sd1_model.unet.is_gradient_checkpointing
    assert torch.allclose(results[0], results[1], atol=1e-6), (results[0] - results[1]).abs().max()


def test_automatic_batch_size_tries_halving_sizes() -> None:
    from tistudio.train.loop import largest_fitting

    tried = []

    def fits(batch: int) -> bool:
        tried.append(batch)
        return batch <= 3

    assert largest_fitting(fits, 8) == 2 and tried == [8, 4, 2]
    assert largest_fitting(lambda b: False, 8) == 1  # batch 1 is the floor; it is not probed
    assert largest_fitting(lambda b: True, 6) == 6


def test_automatic_batch_size_is_resolved_saved_and_kept_on_resume(sd1_model, photos, tmp_path) -> None:
    """--batch-size 0 is 1 on a CPU; a run resumed with 0 keeps the batch size it began with, exactly."""
    import json

    folder = tmp_path / "auto" / "emb"
    new_embedding(sd1_model, folder)
    run(sd1_model, photos, folder, batch_size=0, max_steps=2)
    resolved = json.loads((folder.parent / "run" / "options.json").read_text())["resolved"]
    assert resolved["batch_size"] == 1
    template = new_embedding(sd1_model, tmp_path / "template")
    straight, resumed = tmp_path / "straight" / "emb", tmp_path / "resumed" / "emb"
    for where in (straight, resumed):
        where.mkdir(parents=True)
        shutil.copy(template, where / "tomtut.safetensors")
    run(sd1_model, photos, straight, batch_size=2, max_steps=4)
    run(sd1_model, photos, resumed, stop_at=2, batch_size=2, max_steps=4)
    second = run(sd1_model, photos, resumed, batch_size=0, max_steps=4)
    assert second.start_step == 2
    assert json.loads((resumed.parent / "run" / "options.json").read_text())["resolved"]["batch_size"] == 2
    assert torch.equal(
        read_embedding(straight / "tomtut.safetensors").tensor, read_embedding(resumed / "tomtut.safetensors").tensor
    )


def test_compiled_unet_is_used_for_the_training_steps_only(sd1_model, photos, tmp_path, monkeypatch) -> None:
    """--compile-unet trains with what torch.compile returns (here with dynamo's eager backend: the real wrapper,
    without minutes of code generation) and gives the same vectors; the model's own UNet is left as it was."""
    compiled = []
    real_compile = torch.compile

    def eager_compile(module, **kwargs):
        compiled.append(module)
        return real_compile(module, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    results = []
    for flag in (False, True):
        folder = tmp_path / f"compile-{flag}" / "emb"
        new_embedding(sd1_model, folder)
        run(sd1_model, photos, folder, compile_unet=flag, max_steps=2, eval_every=0)
        results.append(read_embedding(folder / "tomtut.safetensors").tensor)
    assert compiled == [sd1_model.unet] and type(sd1_model.unet).__name__ == "UNet2DConditionModel"
    assert torch.allclose(results[0], results[1], atol=1e-6), (results[0] - results[1]).abs().max()


def test_run_folder_has_copies_previews_log_options_and_report(sd1_model, photos, tmp_path) -> None:
    new_embedding(sd1_model, tmp_path / "emb")
    result = train(
        options(photos, tmp_path / "emb", max_steps=4, save_every=2, preview_every=2, preview_steps=2),
        cache_dir=tmp_path,
        model=sd1_model,
    )
    run_dir = tmp_path / "run"
    assert sorted(p.name for p in (run_dir / "embeddings").iterdir()) == [
        "tomtut-2.safetensors",
        "tomtut-4.safetensors",
    ]
    assert read_embedding(run_dir / "embeddings" / "tomtut-2.safetensors").step == 2
    assert sorted(p.name for p in (run_dir / "previews").iterdir()) == ["tomtut-0.png", "tomtut-2.png", "tomtut-4.png"]
    from PIL import Image

    with Image.open(run_dir / "previews" / "tomtut-2.png") as image:
        assert "Steps: 2, Sampler: DPM++ 2M, Schedule type: Karras" in image.text["parameters"]
    lines = (run_dir / "loss.csv").read_text().splitlines()
    assert lines[0] == "step,epoch,loss,lr" and len(lines) == 5
    assert [line.split(",")[0] for line in lines[1:]] == ["1", "2", "3", "4"]
    assert (run_dir / "options.json").is_file() and (run_dir / "report.html").is_file()
    assert read_embedding(run_dir / "tomtut.safetensors").step == 4
    assert result.embedding_path == tmp_path / "emb" / "tomtut.safetensors"
    assert "<svg" in (run_dir / "report.html").read_text()


def test_a_previews_parameters_read_in_a1111_with_its_embedding_and_step(sd1_model, photos, tmp_path) -> None:
    from PIL import Image

    from a1111_rules import parse_generation_parameters

    new_embedding(sd1_model, tmp_path / "emb")
    train(
        options(
            photos,
            tmp_path / "emb",
            max_steps=2,
            preview_every=2,
            preview_steps=2,
            preview_prompt="a photo of tomtut",
            preview_negative_prompt="blurry",
        ),
        cache_dir=tmp_path,
        model=sd1_model,
    )
    with Image.open(tmp_path / "run" / "previews" / "tomtut-2.png") as image:
        read = parse_generation_parameters(image.text["parameters"])
    assert read["Prompt"] == "a photo of tomtut" and read["Negative prompt"] == "blurry"
    assert (read["Steps"], read["Sampler"], read["Schedule type"], read["Seed"], read["RNG"]) == (
        "2",
        "DPM++ 2M",
        "Karras",
        "1234",
        "CPU",
    )
    assert (read["Embedding"], read["Embedding step"]) == ("tomtut", "2")


def test_the_schedule_decides_where_training_stops(sd1_model, photos, tmp_path) -> None:
    new_embedding(sd1_model, tmp_path / "emb")
    result = train(
        options(photos, tmp_path / "emb", max_steps=50, learning_rate="0.005:3"), cache_dir=tmp_path, model=sd1_model
    )
    assert result.step == 3


def test_an_embedding_trained_past_max_steps_is_left_alone(sd1_model, photos, tmp_path) -> None:
    new_embedding(sd1_model, tmp_path / "emb")
    train(options(photos, tmp_path / "emb", max_steps=2), cache_dir=tmp_path, model=sd1_model)
    result = train(options(photos, tmp_path / "emb", max_steps=2), cache_dir=tmp_path, model=sd1_model)
    assert result.step == 2 and "already trained to step 2" in result.message


def test_a_fresh_start_moves_an_earlier_run_aside(sd1_model, photos, tmp_path) -> None:
    new_embedding(sd1_model, tmp_path / "emb")
    train(options(photos, tmp_path / "emb", max_steps=2), cache_dir=tmp_path, model=sd1_model)
    new_embedding(sd1_model, tmp_path / "emb")
    train(options(photos, tmp_path / "emb", max_steps=2), cache_dir=tmp_path, model=sd1_model)
    archived = [p for p in tmp_path.iterdir() if p.name.startswith("run-previous-")]
    assert len(archived) == 1 and (archived[0] / "loss.csv").is_file()


def test_wrong_width_embedding_is_refused_before_training(sd1_model, photos, tmp_path) -> None:
    folder = tmp_path / "emb"
    write_embedding(Embedding(name="tomtut", vectors={"clip": torch.zeros(2, 768)}), folder / "tomtut.safetensors")
    with pytest.raises(EmbeddingError, match=r"768 wide \(SD 1.x"):
        train(options(photos, folder), cache_dir=tmp_path, model=sd1_model)
    assert not (tmp_path / "run").exists()


def test_bad_options_and_missing_inputs_fail_before_any_compute(sd1_model, photos, tmp_path) -> None:
    new_embedding(sd1_model, tmp_path / "emb")
    with pytest.raises(OptionError, match="item 2"):
        train(options(photos, tmp_path / "emb", learning_rate="0.005:3, fast"), cache_dir=tmp_path, model=sd1_model)
    with pytest.raises(OptionError, match="batch_size"):
        train(options(photos, tmp_path / "emb", batch_size=-1), cache_dir=tmp_path, model=sd1_model)
    with pytest.raises(DatasetError, match="does not exist"):
        train(options(tmp_path / "nope", tmp_path / "emb"), cache_dir=tmp_path, model=sd1_model)
    with pytest.raises(EmbeddingError, match="create it first"):
        train(options(photos, tmp_path / "emb", embedding="nobody"), cache_dir=tmp_path, model=sd1_model)
    assert not (tmp_path / "run").exists()


def test_unreadable_images_are_skipped_with_a_reason(sd1_model, photos, tmp_path) -> None:
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (photos / "notes.png").write_text("hello")
    new_embedding(sd1_model, tmp_path / "emb")
    result = train(options(photos, tmp_path / "emb", max_steps=1), cache_dir=tmp_path, model=sd1_model)
    reasons = {path.name: reason for path, reason in result.skipped_images}
    assert set(reasons) == {"broken.jpg", "notes.png"}
    assert all(reasons.values())


def test_tensorboard_logs_the_run_as_tensorboard_reads_it(sd1_model, photos, tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    new_embedding(sd1_model, tmp_path / "emb")
    run(
        sd1_model,
        photos,
        tmp_path / "emb",
        stop_at=3,
        tensorboard=True,
        eval_every=2,
        preview_every=2,
        preview_steps=1,
        save_every=2,
    )
    run(
        sd1_model,
        photos,
        tmp_path / "emb",
        tensorboard=True,
        eval_every=2,
        preview_every=2,
        preview_steps=1,
        save_every=2,
    )  # resumed at step 3, saved when it stopped
    board = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0})
    board.Reload()
    losses = {event.step: event.value for event in board.Scalars("train/loss")}
    logged = {
        int(row.split(",")[0]): float(row.split(",")[2])
        for row in (tmp_path / "run" / "loss.csv").read_text().splitlines()[1:]
    }
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and all(abs(losses[s] - logged[s]) < 1e-5 for s in losses)
    assert [e.step for e in board.Scalars("eval/fixed_batch_loss")] == [0, 2, 4, 6]
    assert [e.value for e in board.Scalars("train/learning_rate")][-1] == pytest.approx(0.005)
    assert {e.step for e in board.Images("preview")} >= {2, 4, 6}


def test_tensorboard_without_the_package_is_refused_before_compute(photos, tmp_path, monkeypatch) -> None:
    import importlib.util

    from tistudio.config import validate_train

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(OptionError, match=r"tensorboard=True: TensorBoard is not installed: pip install"):
        validate_train(options(photos, tmp_path / "emb", tensorboard=True))


def test_a_resumed_run_keeps_the_fixed_batch_it_began_with(sd1_model, photos, tmp_path) -> None:
    import json

    settings = dict(max_steps=6, eval_every=2, save_every=2)
    straight, resumed = twin_folders(sd1_model, tmp_path)
    run(sd1_model, photos, straight, eval_samples=4, **settings)
    assert run(sd1_model, photos, resumed, stop_at=3, eval_samples=4, **settings).stopped
    run(sd1_model, photos, resumed, eval_samples=8, **settings)  # asked for another batch: the run keeps its own
    eval_a = (straight.parent / "run" / "eval.csv").read_text()
    assert eval_a == (resumed.parent / "run" / "eval.csv").read_text() and len(eval_a.splitlines()) == 5
    state = json.loads((resumed.parent / "run" / "state" / "state-6.json").read_text())
    assert state["eval_batch"] == {"samples": 4, "stratified": False}
    # A run begun before the batch was recorded resumes with the batch of its day: 16 samples, random timesteps.
    earlier = tmp_path / "earlier" / "emb"
    earlier.mkdir(parents=True)
    shutil.copy(tmp_path / "template" / "tomtut.safetensors", earlier / "tomtut.safetensors")
    assert run(sd1_model, photos, earlier, stop_at=3, eval_samples=4, **settings).stopped
    saved = earlier.parent / "run" / "state" / "state-3.json"
    old = json.loads(saved.read_text())
    del old["eval_batch"]
    saved.write_text(json.dumps(old))
    options = json.loads((earlier.parent / "run" / "options.json").read_text())  # nor in options.json then
    del options["resolved"]["eval_batch"]
    (earlier.parent / "run" / "options.json").write_text(json.dumps(options))
    run(sd1_model, photos, earlier, eval_samples=4, **settings)
    state = json.loads((earlier.parent / "run" / "state" / "state-6.json").read_text())
    assert state["eval_batch"] == {"samples": 16, "stratified": False}
