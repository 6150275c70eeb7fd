"""The GPU paths, as far as a CPU can run them: the GradScaler's skip of a non-finite step (the real scaler, on the
CPU), the automatic batch probe backing off from an out-of-memory error (the real probe, CUDA's memory calls
faked), the frozen model in bf16 with the vectors in fp32, and channels-last behind its flag."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from test_train import new_embedding, options
from tistudio.embeddings.files import read_embedding
from tistudio.train import loop as train_module
from tistudio.train.loop import train


def test_a_grad_scaler_skips_a_non_finite_step_and_the_run_goes_on(sd1_model, photos, tmp_path, monkeypatch) -> None:
    """A GPU run's path: fp16 loss scaling (2^16), the step whose loss is infinite skipped by the scaler on the
    device (no host sync), accounted for when the loss log is read; the vectors never take it."""
    folder = tmp_path / "emb"
    new_embedding(sd1_model, folder)
    from tistudio.train.objective import NoisePrediction

    real_make, real_loss = train_module.make_optimizer, NoisePrediction.loss
    scalers, calls = [], []

    def with_a_scaler(trainable, model, opts, step):
        optimizer, _ = real_make(trainable, model, opts, step)
        scalers.append(train_module.grad_scaler("cpu", fp16=True))
        return optimizer, scalers[-1]

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("inf") if len(calls) == 3 else loss

    monkeypatch.setattr(train_module, "make_optimizer", with_a_scaler)
    monkeypatch.setattr(NoisePrediction, "loss", poisoned)
    result = train(
        options(photos, folder, max_steps=5, save_every=1, eval_every=0), cache_dir=tmp_path, model=sd1_model
    )
    assert result.step == 5 and "(1 non-finite steps discarded)" in result.message
    copies = {
        step: read_embedding(result.run_dir / "embeddings" / f"tomtut-{step}.safetensors").tensor
        for step in range(1, 5)
    }
    assert torch.equal(copies[2], copies[3]), "the skipped step changed the vectors"
    assert not torch.equal(copies[3], copies[4]) and not torch.equal(copies[1], copies[2])
    final = read_embedding(folder / "tomtut.safetensors")
    assert final.tensor.dtype == torch.float32 and torch.isfinite(final.tensor).all()
    assert scalers[0].get_scale() == 2.0**15  # backed off once, from 2^16
    rows = (result.run_dir / "loss.csv").read_text().splitlines()
    assert len(rows) == 6 and rows[3].split(",")[2] == "inf"


def test_the_batch_probe_backs_off_from_out_of_memory(sd1_model, photos, tmp_path, monkeypatch) -> None:
    """--batch-size 0 on a GPU: the real probe, with an out-of-memory error above 4 samples and a peak of 1 GiB per
    sample on a 3.5 GiB card (90% headroom: 3.15 GiB): 8 and 4 do not fit, 2 does; 6 photos: 6 does not, 3 does.
    The probe leaves no gradient behind."""
    from tistudio.models.conditioning import PromptEncoder
    from tistudio.prepare.dataset import load_dataset
    from tistudio.schedule import parse_schedule
    from tistudio.templates import load_template
    from tistudio.train.objective import NoisePrediction

    opts = options(photos, tmp_path / "emb", batch_size=0)
    embedding = read_embedding(new_embedding(sd1_model, tmp_path / "emb"))
    encoder = PromptEncoder.for_model(sd1_model)
    samples = train_module.encode_samples(sd1_model, load_dataset(photos), 64, load_template("subject"), "tomtut", opts)
    trainable = train_module.embedding_trainable(embedding, sd1_model, opts, parse_schedule("0.005", max_steps=4))
    trainable.start(None)
    trainable.install(sd1_model, encoder)
    real_loss, peak, tried = NoisePrediction.loss, {}, []

    def loss_on_a_small_card(denoiser, clean, *args, **kwargs):
        tried.append(clean.shape[0])
        if clean.shape[0] > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (faked)")
        peak["bytes"] = clean.shape[0] * 2**30
        return real_loss(denoiser, clean, *args, **kwargs)

    monkeypatch.setattr(NoisePrediction, "loss", loss_on_a_small_card)
    for name in ("empty_cache", "reset_peak_memory_stats", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: peak["bytes"])
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: SimpleNamespace(total_memory=3.5 * 2**30))
    before = {key: value.detach().clone() for key, value in trainable.parameters().items()}
    fits = train_module.cuda_step_fits(NoisePrediction(sd1_model, encoder), samples, trainable)
    assert train_module.largest_fitting(fits, 8) == 2 and tried == [8, 4, 2]
    assert train_module.choose_batch(opts, None, samples.count, lambda: fits) == 3
    assert all(p.grad is None for p in trainable.parameters().values())
    assert all(torch.equal(before[k], v) for k, v in trainable.parameters().items())


def test_the_frozen_model_in_bf16_trains_fp32_vectors(tiny_sd1: Path, sd1_model, photos, tmp_path, cache_dir) -> None:
    """The mixed-precision path on the CPU: every frozen weight in bf16, the vectors and their optimizer in fp32;
    the loss stays within bf16's rounding of the fp32 run's, and the vectors stay finite and float32."""
    from tistudio.config import ModelOptions
    from tistudio.models.loading import load_model
    from tistudio.train.runfolder import read_loss_log

    model = load_model(ModelOptions(model=str(tiny_sd1), precision="bf16"), cache_dir)
    assert model.dtype == torch.bfloat16 and next(model.unet.parameters()).dtype == torch.bfloat16
    losses = {}
    for label, used in (("bf16", model), ("fp32", sd1_model)):
        folder = tmp_path / label / "emb"
        new_embedding(model, folder)
        start = read_embedding(folder / "tomtut.safetensors").tensor
        result = train(options(photos, folder, max_steps=4, precision=label), cache_dir=cache_dir, model=used)
        trained = read_embedding(folder / "tomtut.safetensors")
        assert trained.tensor.dtype == torch.float32 and torch.isfinite(trained.tensor).all()
        assert not torch.equal(trained.tensor, start)
        losses[label] = [row["loss"] for row in read_loss_log(result.run_dir / "loss.csv")]
    assert len(losses["bf16"]) == len(losses["fp32"]) == 4
    assert all(abs(a - b) < 0.02 * b for a, b in zip(losses["bf16"], losses["fp32"], strict=True)), losses


def test_channels_last_gives_the_same_embedding_and_is_undone(sd1_model, photos, tmp_path) -> None:
    weight = sd1_model.unet.conv_in.weight
    results, seen = [], []
    for layout in (False, True):
        folder = tmp_path / f"channels-last-{layout}" / "emb"
        new_embedding(sd1_model, folder)
        train(
            options(photos, folder, max_steps=3, channels_last=layout),
            cache_dir=folder,
            model=sd1_model,
            on_progress=lambda p: seen.append(weight.is_contiguous(memory_format=torch.channels_last)),
        )
        results.append(read_embedding(folder / "tomtut.safetensors").tensor)
    assert True in seen and False in seen
    weight = sd1_model.unet.conv_in.weight
    assert weight.is_contiguous() and not weight.is_contiguous(memory_format=torch.channels_last)
    # The layouts sum convolutions in other orders; Adam's normalised steps turn those last bits into up to a few
    # percent of one step (lr 0.005) where a gradient component is near zero.
    assert torch.allclose(results[0], results[1], atol=0.1 * 0.005, rtol=0), (results[0] - results[1]).abs().max()
