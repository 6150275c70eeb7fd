"""Training really learns: the loss on a fixed evaluation batch falls by a margin that broken trainers
(learning rate ~0, gradients that never reach the vectors) and random moves of the same size cannot reach.

The tiny test model has random weights; its cross-attention is scaled up (models/builtin.py, TEXT_GAIN) so that the
prompt measurably steers its prediction. The margins below were measured on it (see the issue note)."""

from __future__ import annotations

import shutil

import torch

from tistudio.config import CreateOptions, TrainOptions
from tistudio.embeddings.files import read_embedding
from tistudio.models.conditioning import PromptEncoder, SplicedTokenEmbedding
from tistudio.prepare.dataset import load_dataset
from tistudio.templates import load_template
from tistudio.train.create import create_embedding
from tistudio.train.evaluation import evaluation_batch, evaluation_loss
from tistudio.train.loop import encode_latents, train
from tistudio.train.objective import NoisePrediction

STEPS = 60


def test_training_lowers_the_fixed_batch_loss_by_a_margin_broken_trainers_cannot_reach(
    sd1_model, photos, tmp_path, monkeypatch
) -> None:
    template_file = create_embedding(
        CreateOptions(model="x", name="tomtut", init_text="toy", vectors=2, embeddings_dir=str(tmp_path / "start")),
        cache_dir=tmp_path,
        model=sd1_model,
    )
    start = read_embedding(template_file).tensor
    latents, captions = encode_latents(sd1_model, load_dataset(photos), 64, flip=False)
    encoder = PromptEncoder.for_model(sd1_model)
    denoiser = NoisePrediction(sd1_model, encoder)
    batch = evaluation_batch(
        latents,
        captions,
        load_template("subject"),
        "tomtut",
        seed=7,
        draws=denoiser,
        size=64,
    )

    def fixed_batch_loss(vectors: torch.Tensor) -> float:
        encoder.set_embeddings({"tomtut": vectors})
        return evaluation_loss(denoiser, latents, batch)

    def trained(label: str, **changes) -> torch.Tensor:
        folder = tmp_path / label / "emb"
        folder.mkdir(parents=True)
        shutil.copy(template_file, folder / "tomtut.safetensors")
        settings = dict(
            model="x",
            embedding="tomtut",
            dataset=str(photos),
            embeddings_dir=str(folder),
            run_dir=str(folder.parent / "run"),
            size=64,
            batch_size=4,
            max_steps=STEPS,
            preview_every=0,
            save_every=0,
            learning_rate="0.005",
            seed=3,
        )
        settings.update(changes)
        train(TrainOptions(**settings), cache_dir=tmp_path, model=sd1_model)
        return read_embedding(folder / "tomtut.safetensors").tensor

    before = fixed_batch_loss(start)
    learned = trained("good")
    gain = before - fixed_batch_loss(learned)

    gain_lr_zero = before - fixed_batch_loss(trained("lr-zero", learning_rate="1e-12"))

    original_forward = SplicedTokenEmbedding.forward

    def detached(self, ids):
        extra = self.extra
        self.set_extra(None if extra is None else extra.detach() + 0.0 * extra)  # gradient is exactly zero
        try:
            return original_forward(self, ids)
        finally:
            self.set_extra(extra)

    monkeypatch.setattr(SplicedTokenEmbedding, "forward", detached)
    blocked = trained("blocked")
    monkeypatch.undo()
    gain_blocked = before - fixed_batch_loss(blocked)

    distance = (learned - start).norm()
    gains_random = []
    for seed in range(4):
        direction = torch.randn(start.shape, generator=torch.Generator().manual_seed(seed))
        gains_random.append(before - fixed_batch_loss(start + direction / direction.norm() * distance))

    print(
        f"fixed-batch loss {before:.5f}; gain trained {gain:.5f}, lr~0 {gain_lr_zero:.5f}, "
        f"blocked {gain_blocked:.5f}, random moves {[round(g, 5) for g in gains_random]}"
    )
    assert gain > 0.01 * before, "training did not lower the fixed-batch loss by 1%"
    assert torch.equal(blocked, start), "with no gradient the vectors must not move"
    assert abs(gain_blocked) == 0.0
    assert gain > 20 * abs(gain_lr_zero)
    assert gain > 5 * max(gains_random), "a random move of the same size did about as well"
