"""How a run is judged without looking at a single image, and which step it keeps.

Progress is measured on a *fixed* batch - the same latents, noise, timesteps and prompts at every evaluation - so
that changes in the number come from the trained vectors alone (DVAR, Voronov et al., NeurIPS 2023: "Is This Loss
Informative?"). The best step is the lowest loss on that batch: the first evaluation within BEST_BAND (0.5%) of the
whole drop above the lowest, so that a near-tie goes to the earlier step. On the demo world, scored by its trait
reader with 256 pictures per evaluation, the pictures keep improving a little for as long as this loss keeps falling
a little; the first step on a wider floor (2.5%, the previous rule) came a few points of likeness short. Training
has converged when the loss has stopped moving - the variance of its last W values is a small fraction of the
variance of all of them - and the curve has held its floor (the first step within PLATEAU, 2.5%, of the drop above
the lowest) for W evaluations.

The drop is counted from the *neutral start* - the loss of the person-like start (the default) - or from the run's
own start where that was lower. A start far from the subject (a word with a strong unrelated meaning) first falls
steeply while its meaning is unlearned; counted from there, that fall would widen the floor and both decisions
would come too early, before the subject has been learned. Losses above the neutral start are likewise clipped
to it for the convergence rule.

Where the caller measures a likeness (higher is better; e.g. the demo world's trait reader looking at pictures), it
is logged beside the loss, and where it was measured at every evaluation it chooses the step instead: the highest
likeness, the first within LIKENESS_BAND of it.
"""

from __future__ import annotations

import logging
import random
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tistudio.models.conditioning import PromptEncoder
from tistudio.models.loading import SDModel
from tistudio.storage import append_line, write_text
from tistudio.templates import fill_template
from tistudio.train.latents import Rows
from tistudio.train.objective import Denoiser, seed_for
from tistudio.train.runfolder import EVAL_HEADER, eval_row, read_eval_log
from tistudio.train.trainable import Tensors, Trainable

log = logging.getLogger(__name__)

DVAR_WINDOW = 5  # evaluations
DVAR_THRESHOLD = 0.15
PLATEAU = 0.025  # the floor, for --stop auto: losses within this share of the whole drop above the lowest loss
BEST_BAND = 0.005  # the best step: the first loss within this share of the whole drop above the lowest loss
LIKENESS_BAND = 0.01  # where a likeness is measured, the best step: the first within this of the highest likeness

Likeness = Callable[[SDModel, PromptEncoder], float | None]  # higher is better; None: not measured
SETTLED_STEP = 500  # the fixed batch is evaluated every N steps up to here, then ever less often (evaluation_due)


def evaluation_interval(step: int, every: int, settled: int = SETTLED_STEP) -> int:
    """The evaluation interval in force at `step`: `every` up to `settled`, then doubling in stages that double in
    length - 2 x every up to 3 x settled, 4 x every up to 7 x settled, ... (with the defaults: every 25 steps to step
    500, 50 to 1500, 100 to 3500) - so that each stage has as many evaluations as the first. The curve moves fast at
    first and ever more slowly; a 3000-step run is evaluated 55 times instead of 120."""
    stage = 0
    while step > settled * (2 ** (stage + 1) - 1):
        stage += 1
    return every * 2**stage


def evaluation_due(step: int, every: int, settled: int = SETTLED_STEP) -> bool:
    """Whether the fixed batch is evaluated after `step` (evaluation_interval; never with `every` 0)."""
    return every > 0 and step % evaluation_interval(step, every, settled) == 0


LIKENESS_SETTLED = 3 * SETTLED_STEP  # the face likeness keeps its interval longer: it is what chooses the step


def likeness_due(step: int, last: int, every: int, settled: int = LIKENESS_SETTLED) -> bool:
    """Whether a likeness with its own interval is measured at the evaluation of `step`, `last` being the step it was
    last measured at (-1: never): at the first evaluation of each interval, the interval doubling in stages as the
    evaluations' do but from `settled` (with the defaults: every 250 steps to step 1500, 500 to 4500), so that a
    3000-step run draws its pictures 10 times rather than 13."""
    interval = evaluation_interval(step, every, settled)
    return step // interval > last // interval


# ----------------------------------------------------------------------------------------------------------------
# The fixed batch


@dataclass(frozen=True)
class EvalBatch:
    """A fixed evaluation batch: latents, timesteps, noise and prompts that never change during a run."""

    indices: list[int]
    timesteps: torch.Tensor
    noise: torch.Tensor | list[torch.Tensor]  # one row per sample (a list where the buckets' shapes differ)
    prompts: list[str]
    time_ids: torch.Tensor | None = None  # SDXL: each sample's size and crop conditioning


def evaluation_batch(
    latents: Rows,
    captions: list[str],
    template: tuple[str, ...],
    name: str,
    seed: int,
    draws: Denoiser,
    size: int = 32,
    sizes: torch.Tensor | None = None,
    stratified: bool = False,
) -> EvalBatch:
    """The same samples for every evaluation: each image in turn (the buckets taking turns, so that a batch smaller
    than the set still covers every bucket it uses), with fixed noise, timesteps and prompts, drawn as the denoiser
    `draws` them. With `stratified`, the timesteps cover the schedule evenly (one drawn in each of `size` equal
    strata, the strata shuffled over the samples), so that a small batch does not happen to miss the high or the low
    noise levels."""
    generator = torch.Generator().manual_seed(seed_for(seed, 4))
    rng = random.Random(seed_for(seed, 5))
    turns = interleaved(latents.by_shape)
    indices = [turns[i % latents.count] for i in range(size)]
    prompts = [
        fill_template(template[i % len(template)], name, captions[index], rng) for i, index in enumerate(indices)
    ]
    steps = draws.draw_timesteps(size, generator, stratified)
    if latents.single:
        noise: torch.Tensor | list[torch.Tensor] = draws.draw_noise((size, *latents.shapes[0]), generator)
    else:
        noise = [draws.draw_noise((1, *latents.shape(index)), generator)[0] for index in indices]
    return EvalBatch(
        indices=indices,
        timesteps=steps,
        noise=noise,
        prompts=prompts,
        time_ids=None if sizes is None else sizes[torch.tensor(indices)],
    )


def interleaved(groups: Sequence[Sequence[int]]) -> list[int]:
    """The groups' members taking turns: [a0, b0, c0, a1, b1, a2, ...] (one group: its members in order)."""
    longest = max((len(group) for group in groups), default=0)
    return [group[i] for i in range(longest) for group in groups if i < len(group)]


@torch.no_grad()
def evaluation_loss(
    denoiser: Denoiser, latents: Rows, batch: EvalBatch, chunk: int = 16, weights: Rows | None = None
) -> float:
    """Mean loss over a fixed evaluation batch (no images are generated; a forward pass per chunk of samples of one
    shape), weighted as training is where the images have loss `weights` (train/masks.py)."""
    total, device = 0.0, latents.device
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for place, index in enumerate(batch.indices):
        by_shape.setdefault(latents.shape(index), []).append(place)
    for places in by_shape.values():
        for start in range(0, len(places), chunk):
            part = places[start : start + chunk]
            chosen = [batch.indices[p] for p in part]
            at = torch.tensor(part)
            loss = denoiser.loss(
                latents.take(chosen),
                batch.timesteps[at].to(device),
                torch.stack([batch.noise[p] for p in part]).to(device),
                [batch.prompts[p] for p in part],
                time_ids=None if batch.time_ids is None else batch.time_ids[at],
                weights=None if weights is None else weights.take(chosen),
            )
            total += float(loss) * len(part)
    return total / len(batch.indices)


# ----------------------------------------------------------------------------------------------------------------
# The rules


def converged(
    losses: list[float],
    window: int = DVAR_WINDOW,
    threshold: float = DVAR_THRESHOLD,
    flat: float = 0.05,
    ceiling: float | None = None,
) -> bool:
    """DVAR's rule - the last `window` losses vary less than `threshold` times as much as all of them - plus a
    check that they have stopped falling: over the last window the mean fell by less than `flat` of the whole
    range. (The variance ratio alone also fires on a steady, noise-free decline once enough values are in.)
    Losses above `ceiling` (the neutral start's) count as the ceiling."""
    if len(losses) < 2 * window:
        return False
    if ceiling is not None:
        losses = [min(loss, ceiling) for loss in losses]
    total = statistics.pvariance(losses)
    if total <= 0:
        return True
    recent, before = losses[-window:], losses[-2 * window : -window]
    falling = (statistics.fmean(before) - statistics.fmean(recent)) / (max(losses) - min(losses))
    return statistics.pvariance(recent) / total < threshold and falling < flat


def floor_limit(losses: list[float], start: float, plateau: float = PLATEAU) -> float:
    """The upper edge of the loss curve's floor: `plateau` of the whole drop (start - lowest) above the lowest."""
    lowest = min(losses)
    return lowest + plateau * max(start - lowest, 0.0)


def floor_step(losses: list[tuple[int, float]], start: float, plateau: float = PLATEAU) -> int | None:
    """The first step whose loss is on the floor (see floor_limit)."""
    if not losses:
        return None
    limit = floor_limit([loss for _, loss in losses], start, plateau)
    return next(step for step, loss in losses if loss <= limit)


def drop_start(losses: list[tuple[int, float]], neutral: float | None) -> float:
    """Where the drop is counted from: the untrained start's loss (step 0; if the log lacks it, the highest seen),
    or the neutral start's where that is lower."""
    own = next((loss for step, loss in losses if step == 0), max((loss for _, loss in losses), default=0.0))
    return own if neutral is None else min(own, neutral)


def best_limit(losses: list[tuple[int, float]], neutral: float | None) -> float | None:
    """The upper edge of the best step's band: BEST_BAND of the drop above the lowest loss after the start (None
    before any). It only ever falls, so a step above it can never become the best."""
    after = [loss for step, loss in losses if step > 0]
    return floor_limit(after, drop_start(losses, neutral), BEST_BAND) if after else None


def best_step(losses: list[tuple[int, float]], neutral: float | None) -> int | None:
    """The step to keep: the lowest loss after the start (the first within BEST_BAND of the drop above it)."""
    limit = best_limit(losses, neutral)
    return None if limit is None else next(step for step, loss in losses if step > 0 and loss <= limit)


def best_likeness_step(likeness: list[tuple[int, float]], band: float = LIKENESS_BAND) -> int | None:
    """The step to keep where a likeness measure exists: the highest likeness after the start (the first within
    `band` of it, so that a near-tie goes to the earlier step)."""
    after = [(step, like) for step, like in likeness if step > 0]
    if not after:
        return None
    top = max(like for _, like in after)
    return next(step for step, like in after if like >= top - band)


def should_stop(losses: list[tuple[int, float]], neutral: float | None, window: int = DVAR_WINDOW) -> bool:
    """--stop auto: the fixed-batch loss has converged (DVAR; losses above the neutral start count as it) and the
    curve's first step on its floor (PLATEAU) has not moved for `window` evaluations (a slow fall that still lowers
    the floor is not the end)."""
    start = drop_start(losses, neutral)
    if not converged([loss for _, loss in losses], window=window, ceiling=None if neutral is None else start):
        return False
    reached = floor_step([(step, loss) for step, loss in losses if step > 0], start)
    return reached is not None and sum(1 for step, _ in losses if step > reached) >= window


# ----------------------------------------------------------------------------------------------------------------
# The evaluator of a run


@dataclass
class Best:
    step: int
    loss: float
    values: Tensors  # the trainable's snapshot at that step (CPU float32)
    by: str = "the lowest fixed-batch loss"  # what chose it


class Evaluator:
    """Evaluates the fixed batch every few steps, logs it to eval.csv, and keeps the trainable's snapshots of the
    steps that may still turn out to be the best.

    An optional `likeness(model, encoder) -> float | None` (higher is better, None: not measured) is logged beside
    the loss; where it was measured at every evaluation after the start, it chooses the best step
    (best_likeness_step). Otherwise the loss chooses (best_step), which needs no images.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        latents: Rows,
        batch: EvalBatch,
        log_path: Path,
        likeness: Likeness | None = None,
        likeness_every: int = 0,
        weights: Rows | None = None,
        spec: Mapping[str, Any] | None = None,
    ) -> None:
        self.denoiser, self.latents, self.batch = denoiser, latents, batch
        self.model, self.encoder = denoiser.model, denoiser.encoder  # what a likeness draws its pictures with
        self.weights = weights
        self.spec = dict(spec or {})  # how the fixed batch was drawn (samples, stratified): kept in the resume state
        self.path = log_path
        self.likeness = likeness
        self.likeness_every = likeness_every  # 0: at every evaluation; else at steps that are multiples of it
        self.history: list[tuple[int, float, float | None]] = []
        self.kept: dict[int, Tensors] = {}  # step -> snapshot, for the steps that can still be the best
        self.neutral: float | None = None  # the neutral start's loss, if it differs from this run's start

    def open(self, start_step: int, saved: dict[str, Any] | None) -> None:
        """Read the history up to start_step (a resume), or start a new log; restore the kept snapshots."""
        rows = [row for row in read_eval_log(self.path) if row[0] <= start_step] if start_step > 0 else []
        self.history = rows
        write_text(self.path, "".join(line + "\n" for line in [EVAL_HEADER, *(eval_row(*row) for row in rows)]))
        if not saved:
            return
        if saved["meta"].get("neutral_loss") is not None:
            self.neutral = float(saved["meta"]["neutral_loss"])
        steps = [int(s) for s in saved["meta"].get("kept_steps", [])]
        stacked = {
            key[len("kept.") :]: tensor.to(torch.float32)
            for key, tensor in saved["tensors"].items()
            if key.startswith("kept.")
        }
        if steps and stacked and all(tensor.shape[0] == len(steps) for tensor in stacked.values()):
            self.kept = {
                step: {key: tensor[i].clone() for key, tensor in stacked.items()} for i, step in enumerate(steps)
            }

    def loss(self) -> float:
        return evaluation_loss(self.denoiser, self.latents, self.batch, weights=self.weights)

    def measure_neutral(self, trainable: Trainable) -> None:
        """The fixed-batch loss of the trainable's neutral start (the person-like one), where the run started
        elsewhere (the loss's drop is then counted from it where it is below the run's own start)."""
        neutral = trainable.neutral_start() if self.neutral is None else None
        if neutral is None:
            return
        with trainable.using(neutral):
            self.neutral = self.loss()
        log.info(
            "fixed-batch loss of the person-like start: %.5f (the loss's drop is counted from it where it is "
            "below this run's start)",
            self.neutral,
        )

    def evaluate(
        self, step: int, trainable: Trainable, candidate: bool = True, last: bool = False
    ) -> tuple[float, float | None]:
        """Evaluate and log; a `candidate` step may become the best (the untrained start is not one). The likeness
        is measured where it is due (and at the `last` step)."""
        loss = self.loss()
        like = None
        due = not self.likeness_every or last or likeness_due(step, self._last_likeness_step(), self.likeness_every)
        if self.likeness is not None and due:
            with torch.no_grad():
                value = self.likeness(self.model, self.encoder)
            like = None if value is None else float(value)
        self.history.append((step, loss, like))
        append_line(self.path, eval_row(step, loss, like))
        if candidate:
            self.kept[step] = trainable.snapshot()
            self.kept = {s: v for s, v in self.kept.items() if s in self._contenders()}
        return loss, like

    def _last_likeness_step(self) -> int:
        """The last step the likeness was measured at (-1: never): it is due again in the next interval."""
        return max((step for step, _, like in self.history if like is not None), default=-1)

    def _contenders(self) -> set[int]:
        """The steps that can still become the best, by the loss or by the likeness: both edges only tighten."""
        limit = best_limit([(s, loss) for s, loss, _ in self.history], self.neutral)
        steps = {step for step, loss, _ in self.history if step > 0 and limit is not None and loss <= limit}
        likes = [(step, like) for step, _, like in self.history if step > 0 and like is not None]
        if likes:
            top = max(like for _, like in likes)
            steps |= {step for step, like in likes if like >= top - LIKENESS_BAND}
        return steps

    @property
    def by_likeness(self) -> bool:
        """Whether the likeness chooses the best step: it was measured at every evaluation after the start, or,
        where it has its own interval, at least once after the start (the best is then one of those steps)."""
        after = [like for step, _, like in self.history if step > 0]
        if self.likeness_every:
            return any(like is not None for like in after)
        return bool(after) and all(like is not None for like in after)

    @property
    def best(self) -> Best | None:
        """The best step (the highest likeness where measured, else the lowest loss); its snapshot is always kept
        (the bands' edges only tighten)."""
        if self.by_likeness:
            step = best_likeness_step([(step, like) for step, _, like in self.history if like is not None])
            by = "the highest likeness"
        else:
            step = best_step([(step, loss) for step, loss, _ in self.history], self.neutral)
            by = "the lowest fixed-batch loss"
        if step is None or step not in self.kept:  # a resume state from before snapshots were kept
            return None
        losses = {s: loss for s, loss, _ in self.history if s > 0}
        return Best(step=step, loss=losses[step], values=self.kept[step], by=by)

    def converged(self) -> bool:
        return should_stop([(step, loss) for step, loss, _ in self.history], self.neutral)

    def state(self) -> tuple[dict[str, Any], Tensors]:
        """What the resume state keeps: the neutral loss, and the kept snapshots stacked by key."""
        meta: dict[str, Any] = {} if self.neutral is None else {"neutral_loss": self.neutral}
        if self.spec:
            meta["eval_batch"] = self.spec
        if not self.kept:
            return meta, {}
        steps = sorted(self.kept)
        keys = self.kept[steps[0]]
        return (
            {**meta, "kept_steps": steps},
            {f"kept.{key}": torch.stack([self.kept[s][key] for s in steps]) for key in keys},
        )
