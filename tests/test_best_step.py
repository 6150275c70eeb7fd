"""Evaluation on a fixed batch, the automatic best step, --stop auto, norm control and the person-like start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tistudio.config import CreateOptions, TrainOptions
from tistudio.embeddings.files import read_embedding
from tistudio.train.create import PERSON_NAMES, create_embedding, person_vectors
from tistudio.train.evaluation import best_likeness_step, best_step, converged, floor_step
from tistudio.train.loop import train
from tistudio.train.runfolder import read_eval_log


def options(photos: Path, folder: Path, **changes) -> TrainOptions:
    base = dict(
        model="x",
        embedding="tomtut",
        dataset=str(photos),
        embeddings_dir=str(folder / "emb"),
        run_dir=str(folder / "run"),
        size=64,
        batch_size=2,
        max_steps=12,
        preview_every=0,
        save_every=0,
        eval_every=3,
        learning_rate="0.02",
    )
    base.update(changes)
    return TrainOptions(**base)


def fresh(model, folder: Path, init: str = "toy") -> Path:
    return create_embedding(
        CreateOptions(
            model="x", name="tomtut", init_text=init, vectors=2, overwrite=True, embeddings_dir=str(folder / "emb")
        ),
        cache_dir=folder,
        model=model,
    )


def test_the_dvar_rule() -> None:
    falling = [1.0 / (1 + i) for i in range(30)]
    assert not converged(falling[:9])  # too few evaluations to say (two windows are needed)
    assert converged([1.0, 0.5, 0.3, 0.2] + [0.1 + 0.0001 * (i % 2) for i in range(20)])
    assert not converged([1.0 - 0.03 * i for i in range(30)])  # still going down steadily


def test_the_best_step_is_the_first_on_the_loss_floor() -> None:
    curve = [(25, 0.60), (50, 0.31), (75, 0.215), (100, 0.205), (125, 0.20), (150, 0.21)]
    assert floor_step(curve, start=1.0) == 75  # within 2.5% of the drop (0.8) above the lowest (0.20): <= 0.22
    assert floor_step(curve, start=1.0, plateau=0.0) == 125  # the lowest itself
    assert floor_step(curve, start=1.0, plateau=0.2) == 50  # <= 0.36
    assert floor_step([(10, 0.5), (20, 0.6)], start=0.4) == 10  # no drop at all: the first candidate
    assert floor_step([], start=1.0) is None


def test_the_best_step_is_the_lowest_loss_with_near_ties_going_to_the_earlier_step() -> None:
    curve = [(0, 1.0), (25, 0.60), (50, 0.31), (75, 0.215), (100, 0.205), (125, 0.20), (150, 0.21)]
    assert best_step(curve, neutral=None) == 125  # within 0.5% of the drop (0.8) above the lowest: <= 0.204
    near_tie = [(0, 1.0), (25, 0.60), (50, 0.203), (75, 0.20), (100, 0.22)]
    assert best_step(near_tie, neutral=None) == 50
    assert best_step([(0, 1.0)], neutral=None) is None  # the untrained start is never the best step
    # A far start (1.0) counts the drop from the person-like start's loss (0.4): the band narrows with it.
    assert best_step(near_tie, neutral=0.4) == 75


def test_where_a_likeness_is_measured_the_best_step_is_its_highest_with_near_ties_going_earlier() -> None:
    assert best_likeness_step([(0, 0.0), (25, 0.5), (50, 0.9), (75, 0.95), (100, 0.93)]) == 75
    assert best_likeness_step([(0, 0.0), (25, 0.5), (50, 0.945), (75, 0.95), (100, 0.93)]) == 50  # within 0.01
    assert best_likeness_step([(0, 0.99), (25, 0.5)]) == 25  # the untrained start is never the best step
    assert best_likeness_step([(0, 0.0)]) is None


def scripted_likeness(values: dict[int, float | None]):
    """A likeness that says what it is told, evaluation after evaluation (0, 3, 6, ...)."""
    calls = iter(sorted(values))

    def likeness(model, encoder) -> float | None:
        return values[next(calls)]

    return likeness


def test_the_likeness_chooses_the_kept_step_where_it_was_measured(sd1_model, photos, tmp_path) -> None:
    """With a likeness at every evaluation the trainer keeps its highest step - the vectors of that very step - even
    where the loss would keep another; a likeness that measures nothing (None) leaves the choice to the loss."""
    fresh(sd1_model, tmp_path)
    like = {0: 0.0, 3: 0.2, 6: 0.9, 9: 0.5, 12: 0.6}
    result = train(
        options(photos, tmp_path, save_every=3), cache_dir=tmp_path, model=sd1_model, likeness=scripted_likeness(like)
    )
    rows = read_eval_log(tmp_path / "run" / "eval.csv")
    assert [(step, round(value, 6)) for step, _, value in rows] == sorted(like.items())
    kept = read_embedding(tmp_path / "emb" / "tomtut.safetensors")
    copy = read_embedding(tmp_path / "run" / "embeddings" / "tomtut-6.safetensors")
    assert result.best_step == 6 and kept.step == 6 and torch.equal(kept.tensor, copy.tensor)
    assert kept.meta["best_by"] == "the highest likeness" and "highest likeness" in result.message
    report = (tmp_path / "run" / "report.html").read_text()
    assert "the highest likeness" in report
    assert "Step 6 is kept" in report and "likeness 90% (highest 90% at step 6)" in report
    neutral = json.loads((tmp_path / "run" / "options.json").read_text())["resolved"]["neutral_loss"]
    by_loss = best_step([(step, loss) for step, loss, _ in rows], neutral)
    assert by_loss != 6  # the loss alone would have kept another step

    fresh(sd1_model, tmp_path / "none")
    train(
        options(photos, tmp_path / "none"),
        cache_dir=tmp_path,
        model=sd1_model,
        likeness=scripted_likeness(dict.fromkeys(like)),
    )
    rows_none = read_eval_log(tmp_path / "none" / "run" / "eval.csv")
    assert all(value is None for _, _, value in rows_none)
    assert [loss for _, loss, _ in rows_none] == [loss for _, loss, _ in rows]  # the likeness never steers training
    assert read_embedding(tmp_path / "none" / "emb" / "tomtut.safetensors").step == by_loss


def test_a_resumed_run_keeps_the_likeness_choice_of_its_first_sitting(sd1_model, photos, tmp_path) -> None:
    """The highest likeness came in the first sitting; the second keeps exactly that step's vectors."""
    like = {0: 0.0, 3: 0.95, 6: 0.5, 9: 0.6, 12: 0.7}
    fresh(sd1_model, tmp_path / "straight")
    train(options(photos, tmp_path / "straight"), cache_dir=tmp_path, model=sd1_model, likeness=scripted_likeness(like))
    fresh(sd1_model, tmp_path / "resumed")
    first = {step: value for step, value in like.items() if step <= 6}
    train(
        options(photos, tmp_path / "resumed", max_steps=6),
        cache_dir=tmp_path,
        model=sd1_model,
        likeness=scripted_likeness(first),
    )
    rest = {step: value for step, value in like.items() if step > 6}
    result = train(
        options(photos, tmp_path / "resumed"), cache_dir=tmp_path, model=sd1_model, likeness=scripted_likeness(rest)
    )
    straight = read_embedding(tmp_path / "straight" / "emb" / "tomtut.safetensors")
    resumed = read_embedding(tmp_path / "resumed" / "emb" / "tomtut.safetensors")
    assert result.best_step == 3 and straight.step == resumed.step == 3
    assert torch.equal(straight.tensor, resumed.tensor)


def test_losses_above_the_neutral_start_do_not_count_towards_convergence() -> None:
    # A start far from the subject: a steep fall while its meaning is unlearned, then the slow learning of the
    # subject. Measured against the steep fall the slow part looks flat; measured from the neutral start it is not.
    curve = [3.0, 1.2, 0.60] + [0.5 - 0.01 * i for i in range(10)]
    assert converged(curve)
    assert not converged(curve, ceiling=0.52)
    assert converged(curve[:3] + [0.40 + 0.0001 * (i % 2) for i in range(10)], ceiling=0.52)  # truly flat


def test_a_far_start_measures_the_floor_from_the_person_like_start(sd1_model, photos, tmp_path) -> None:
    fresh(sd1_model, tmp_path / "word")  # starts from the word 'toy'
    fresh(sd1_model, tmp_path / "person", init="")
    train(options(photos, tmp_path / "word", max_steps=6), cache_dir=tmp_path, model=sd1_model)
    train(options(photos, tmp_path / "person", max_steps=6), cache_dir=tmp_path, model=sd1_model)
    word = json.loads((tmp_path / "word" / "run" / "options.json").read_text())["resolved"]
    person = json.loads((tmp_path / "person" / "run" / "options.json").read_text())["resolved"]
    # The neutral start's loss is exactly the person-like start's: the same fixed batch, the person-like vectors.
    assert word["neutral_loss"] == pytest.approx(
        read_eval_log(tmp_path / "person" / "run" / "eval.csv")[0][1], rel=1e-5
    )
    assert person["neutral_loss"] is None  # the person-like start is the neutral start: nothing more to measure
    # A resumed run keeps it (from its resume state) and chooses as an uninterrupted run does.
    straight = read_embedding(tmp_path / "word" / "emb" / "tomtut.safetensors")
    fresh(sd1_model, tmp_path / "again")
    train(options(photos, tmp_path / "again", max_steps=3), cache_dir=tmp_path, model=sd1_model)
    train(options(photos, tmp_path / "again", max_steps=6), cache_dir=tmp_path, model=sd1_model)
    again = json.loads((tmp_path / "again" / "run" / "options.json").read_text())["resolved"]
    assert again["neutral_loss"] == word["neutral_loss"]
    resumed = read_embedding(tmp_path / "again" / "emb" / "tomtut.safetensors")
    assert resumed.step == straight.step and torch.equal(resumed.tensor, straight.tensor)


def test_evaluations_are_logged_and_the_best_step_is_kept(sd1_model, photos, tmp_path) -> None:
    fresh(sd1_model, tmp_path)
    result = train(options(photos, tmp_path), cache_dir=tmp_path, model=sd1_model)
    rows = read_eval_log(tmp_path / "run" / "eval.csv")
    assert [r[0] for r in rows] == [0, 3, 6, 9, 12] and all(r[2] is None for r in rows)
    neutral = json.loads((tmp_path / "run" / "options.json").read_text())["resolved"]["neutral_loss"]
    assert neutral is not None  # this run started from a word, not from the person-like start
    best = floor_step([(step, loss) for step, loss, _ in rows[1:]], min(rows[0][1], neutral), plateau=0.005)
    assert best == best_step([(step, loss) for step, loss, _ in rows], neutral)
    kept = read_embedding(tmp_path / "emb" / "tomtut.safetensors")
    last = read_embedding(tmp_path / "run" / "tomtut-last.safetensors") if best != 12 else kept
    assert kept.step == best and last.step == 12
    if best != 12:
        assert result.best_step == best and "kept step" in result.message
        assert kept.meta["best_step"] == str(best) and kept.meta["last_step"] == "12"
        # Training further continues from the last step, not from the kept best one.
        again = train(options(photos, tmp_path, max_steps=15), cache_dir=tmp_path, model=sd1_model)
        assert again.start_step == 12
    report = (tmp_path / "run" / "report.html").read_text()
    assert "Evaluation" in report and "fixed batch" in report


def test_final_last_keeps_the_last_step(sd1_model, photos, tmp_path) -> None:
    fresh(sd1_model, tmp_path)
    train(options(photos, tmp_path, final="last"), cache_dir=tmp_path, model=sd1_model)
    assert read_embedding(tmp_path / "emb" / "tomtut.safetensors").step == 12
    assert not (tmp_path / "run" / "tomtut-last.safetensors").exists()


def test_stop_auto_ends_training_when_the_loss_has_converged(sd1_model, photos, tmp_path, monkeypatch) -> None:
    from tistudio.train import evaluation

    fresh(sd1_model, tmp_path)
    calls = {"n": 0}

    def after_five(losses, window=evaluation.DVAR_WINDOW, threshold=evaluation.DVAR_THRESHOLD, ceiling=None):
        calls["n"] += 1
        return len(losses) >= 5

    monkeypatch.setattr(evaluation, "converged", after_five)
    result = train(options(photos, tmp_path, max_steps=300, stop="auto"), cache_dir=tmp_path, model=sd1_model)
    assert result.converged_at is not None and result.step == result.converged_at < 300 and not result.stopped
    assert "converged" in result.message
    # ... and only once the curve's first step on its floor had stayed put for five evaluations (every 3 steps).
    rows = read_eval_log(tmp_path / "run" / "eval.csv")
    losses = [(step, loss) for step, loss, _ in rows]
    reached = floor_step(losses[1:], evaluation.drop_start(losses, None))
    assert sum(1 for step, _ in losses if step > reached) == evaluation.DVAR_WINDOW
    # The step kept is the lowest loss up to there.
    assert (result.best_step or result.step) == evaluation.best_step(losses, None)


def test_max_norm_keeps_vectors_near_a_words_length(sd1_model, photos, tmp_path) -> None:
    table = sd1_model.text_encoder.get_input_embeddings().weight.detach().float()
    typical = float(table.norm(dim=1).median())
    fresh(sd1_model, tmp_path / "free")
    fresh(sd1_model, tmp_path / "capped")
    train(options(photos, tmp_path / "free", learning_rate="0.5", final="last"), cache_dir=tmp_path, model=sd1_model)
    train(
        options(photos, tmp_path / "capped", learning_rate="0.5", final="last", max_norm=1.5),
        cache_dir=tmp_path,
        model=sd1_model,
    )
    free = read_embedding(tmp_path / "free" / "emb" / "tomtut.safetensors").tensor.norm(dim=1)
    capped = read_embedding(tmp_path / "capped" / "emb" / "tomtut.safetensors").tensor.norm(dim=1)
    assert free.max() > 2 * typical  # a big learning rate blows the norm up ...
    assert capped.max() <= 1.5 * typical * 1.0001  # ... unless it is limited


def test_init_pull_keeps_vectors_closer_to_their_start(sd1_model, photos, tmp_path) -> None:
    start = fresh(sd1_model, tmp_path / "free")
    fresh(sd1_model, tmp_path / "pulled")
    initial = read_embedding(start).tensor
    train(options(photos, tmp_path / "free", learning_rate="0.05", final="last"), cache_dir=tmp_path, model=sd1_model)
    train(
        options(photos, tmp_path / "pulled", learning_rate="0.05", final="last", init_pull=50.0),
        cache_dir=tmp_path,
        model=sd1_model,
    )
    free = read_embedding(tmp_path / "free" / "emb" / "tomtut.safetensors").tensor
    pulled = read_embedding(tmp_path / "pulled" / "emb" / "tomtut.safetensors").tensor
    assert (pulled - initial).norm() < (free - initial).norm()


def test_the_person_like_start_is_the_mean_of_first_names(sd1_model, tmp_path) -> None:
    vectors = person_vectors(sd1_model, 3)["clip"]  # one set per text encoder; SD1 has one
    table = sd1_model.text_encoder.get_input_embeddings().weight.detach().float()
    ids = [sd1_model.tokenizer(n, add_special_tokens=False).input_ids for n in PERSON_NAMES]
    rows = torch.stack([table[i[0]] for i in ids if len(i) == 1])
    assert torch.allclose(vectors.mean(dim=0) * 3, torch.stack([rows[k::3].mean(0) for k in range(3)]).sum(0))
    assert torch.allclose(vectors[0], rows[0::3].mean(0))
    path = fresh(sd1_model, tmp_path, init="")
    assert torch.allclose(read_embedding(path).tensor, person_vectors(sd1_model, 2)["clip"])  # fresh() makes 2
    assert "first names" in read_embedding(path).meta["init_text"]
    auto = fresh(sd1_model, tmp_path / "auto", init="auto")  # --init auto says the same
    assert torch.equal(read_embedding(auto).tensor, read_embedding(path).tensor)


@pytest.mark.parametrize("bad", [{"stop": "soon"}, {"final": "middle"}, {"eval_every": -1}, {"max_norm": -1.0}])
def test_bad_evaluation_options_are_refused(sd1_model, photos, tmp_path, bad) -> None:
    from tistudio.errors import OptionError

    fresh(sd1_model, tmp_path)
    with pytest.raises(OptionError, match=next(iter(bad))):
        train(options(photos, tmp_path, **bad), cache_dir=tmp_path, model=sd1_model)


def test_the_report_says_when_the_drop_is_counted_from_the_person_like_start() -> None:
    from tistudio.train.report import evaluation_section

    rows = [(0, 0.9, None), (25, 0.5, None), (50, 0.4, None)]
    assert "counted from the latter" in evaluation_section(rows, 25, neutral=0.6)
    assert "counted from the latter" not in evaluation_section(rows, 25, neutral=None)
    assert "counted from the latter" not in evaluation_section(rows, 25, neutral=0.95)  # its own start was nearer


def test_evaluations_thin_out_in_stages_and_the_last_step_is_still_evaluated(sd1_model, photos, tmp_path) -> None:
    from tistudio.train.evaluation import SETTLED_STEP, evaluation_due

    due = [step for step in range(1, 3001) if evaluation_due(step, 25)]
    assert due[:3] == [25, 50, 75] and SETTLED_STEP == 500 and 500 in due and 525 not in due
    assert [s for s in due if 500 <= s <= 1700] == [500, *range(550, 1501, 50), 1600, 1700]
    assert due[-3:] == [2800, 2900, 3000] and len(due) == 55  # 20 evaluations in each stage
    assert not evaluation_due(0, 0) and not evaluation_due(25, 0)
    assert [s for s in range(3401, 3801) if evaluation_due(s, 25)] == [3500, 3600, 3800]  # then every 200
    # the face likeness, at the first evaluation of every 250 steps to step 1500 and of every 500 after
    from tistudio.train.evaluation import likeness_due

    measured: list[int] = []
    for step in [0, *due]:
        if step == 3000 or likeness_due(step, measured[-1] if measured else -1, 250):
            measured.append(step)
    assert measured == [0, 250, 500, 750, 1000, 1250, 1500, 2000, 2500, 3000]
    assert likeness_due(100, 0, 4) and not likeness_due(102, 100, 4)  # between evaluations: the next interval's first
    odd = [step for step in range(1, 1600) if evaluation_due(step, 7)]  # any interval halves its rate the same way
    assert odd[:2] == [7, 14] and 497 in odd and 504 in odd and 511 not in odd and 1512 in odd and 1526 not in odd
    # a run ending between two evaluations is still evaluated at its last step, where it may be kept
    fresh(sd1_model, tmp_path)
    train(options(photos, tmp_path, max_steps=8, eval_every=3, eval_samples=4), cache_dir=tmp_path, model=sd1_model)
    assert [row[0] for row in read_eval_log(tmp_path / "run" / "eval.csv")] == [0, 3, 6, 8]


def test_a_stratified_fixed_batch_covers_the_whole_schedule(sd1_model) -> None:
    from tistudio.models.conditioning import PromptEncoder
    from tistudio.train.evaluation import evaluation_batch
    from tistudio.train.latents import Rows
    from tistudio.train.objective import NoisePrediction

    draws = NoisePrediction(sd1_model, PromptEncoder.for_model(sd1_model))
    assert draws.timesteps == 1000
    for size in (4, 8, 16):
        batch = evaluation_batch(
            Rows([torch.zeros(4, 8, 8)] * 5),
            ["a"] * 5,
            ("a photo of [name]",),
            "tomtut",
            seed=3,
            draws=draws,
            size=size,
            stratified=True,
        )
        strata = sorted(int(t) * size // 1000 for t in batch.timesteps)
        assert strata == list(range(size)), strata  # one timestep in each 1/size of the schedule
        again = evaluation_batch(
            Rows([torch.zeros(4, 8, 8)] * 5),
            ["a"] * 5,
            ("a photo of [name]",),
            "tomtut",
            seed=3,
            draws=draws,
            size=size,
            stratified=True,
        )
        assert torch.equal(batch.timesteps, again.timesteps) and torch.equal(batch.noise, again.noise)
