"""A one-page HTML report of a training run: loss curve, previews over steps, and optional extra sections.

The page is self-contained (images inlined as data URIs, the chart as inline SVG), so it can be mailed or
opened anywhere without a server or network.
"""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path

from tistudio.pages import STYLE, data_uri
from tistudio.storage import write_text
from tistudio.train.runfolder import read_eval_log, read_loss_log


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_chart(rows: list[dict[str, float]], width: int = 720, height: int = 240) -> str:
    """An inline SVG of the per-step loss (light) and its moving average (dark)."""
    rows = [r for r in rows if math.isfinite(r.get("loss", float("nan")))]
    if len(rows) < 2:
        return "<p class='muted'>Not enough steps for a loss curve yet.</p>"
    steps = [r["step"] for r in rows]
    losses = [r["loss"] for r in rows]
    smooth = moving_average(losses, max(1, len(losses) // 20))
    low, high = min(losses), max(losses)
    span = (high - low) or 1.0
    left, right, top, bottom = 56, 12, 12, 32

    def x(step: float) -> float:
        return left + (step - steps[0]) / ((steps[-1] - steps[0]) or 1) * (width - left - right)

    def y(value: float) -> float:
        return top + (high - value) / span * (height - top - bottom)

    def line(values: list[float], color: str, stroke: float) -> str:
        points = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in zip(steps, values, strict=True))
        return f"<polyline fill='none' stroke='{color}' stroke-width='{stroke}' points='{points}'/>"

    ticks = "".join(
        f"<text x='{left - 6}' y='{y(v) + 4:.1f}' text-anchor='end'>{v:.4f}</text>"
        f"<line x1='{left}' x2='{width - right}' y1='{y(v):.1f}' y2='{y(v):.1f}' stroke='#eee'/>"
        for v in (low, low + span / 2, high)
    )
    labels = (
        f"<text x='{left}' y='{height - 10}'>step {int(steps[0])}</text>"
        f"<text x='{width - right}' y='{height - 10}' text-anchor='end'>step {int(steps[-1])}</text>"
    )
    return (
        f"<svg viewBox='0 0 {width} {height}' width='100%' role='img' aria-label='loss curve' "
        f"style='max-width:{width}px;font:11px sans-serif'>{ticks}{line(losses, '#9ecae1', 1)}"
        f"{line(smooth, '#08519c', 2)}{labels}</svg>"
    )


def eval_chart(
    rows: list[tuple[int, float, float | None]], best: int | None, width: int = 720, height: int = 240
) -> str:
    """The fixed-batch loss (left axis) and, if measured, the likeness share (right axis, 0-100%), with the best
    step marked."""
    rows = [r for r in rows if math.isfinite(r[1])]
    if len(rows) < 2:
        return "<p class='muted'>Not enough evaluations for a curve yet.</p>"
    left, right, top, bottom = 56, 48, 12, 32
    steps = [r[0] for r in rows]
    losses = [r[1] for r in rows]
    low, high = min(losses), max(losses)
    span = (high - low) or 1.0

    def x(step: float) -> float:
        return left + (step - steps[0]) / ((steps[-1] - steps[0]) or 1) * (width - left - right)

    def y_loss(value: float) -> float:
        return top + (high - value) / span * (height - top - bottom)

    def y_share(value: float) -> float:
        return top + (1 - value) * (height - top - bottom)

    parts = [
        "<polyline fill='none' stroke='#08519c' stroke-width='2' points='"
        + " ".join(f"{x(s):.1f},{y_loss(v):.1f}" for s, v in zip(steps, losses, strict=True))
        + "'/>"
    ]
    shares = [(s, like) for s, _, like in rows if like is not None]
    if len(shares) >= 2:
        parts.append(
            "<polyline fill='none' stroke='#d94801' stroke-width='2' stroke-dasharray='5,3' points='"
            + " ".join(f"{x(s):.1f},{y_share(v):.1f}" for s, v in shares)
            + "'/>"
        )
        parts.append(
            f"<text x='{width - right + 4}' y='{y_share(1) + 4:.1f}'>100%</text>"
            f"<text x='{width - right + 4}' y='{y_share(0) + 4:.1f}'>0%</text>"
        )
    if best is not None:
        parts.append(
            f"<line x1='{x(best):.1f}' x2='{x(best):.1f}' y1='{top}' y2='{height - bottom}' stroke='#2ca02c' "
            f"stroke-width='2'/><text x='{x(best) + 4:.1f}' y='{top + 12}' fill='#2ca02c'>best: step {best}"
            "</text>"
        )
    ticks = "".join(
        f"<text x='{left - 6}' y='{y_loss(v) + 4:.1f}' text-anchor='end'>{v:.4f}</text>" for v in (low, high)
    )
    labels = (
        f"<text x='{left}' y='{height - 10}'>step {steps[0]}</text>"
        f"<text x='{width - right}' y='{height - 10}' text-anchor='end'>step {steps[-1]}</text>"
    )
    return (
        f"<svg viewBox='0 0 {width} {height}' width='100%' role='img' aria-label='evaluation curves' "
        f"style='max-width:{width}px;font:11px sans-serif'>{ticks}{''.join(parts)}{labels}</svg>"
    )


def preview_grid(run_dir: Path, name: str) -> str:
    previews = []
    for path in (run_dir / "previews").glob(f"{name}-*.png"):
        match = re.fullmatch(rf"{re.escape(name)}-(\d+)\.png", path.name)
        if match:
            previews.append((int(match.group(1)), path))
    if not previews:
        return "<p class='muted'>No previews (preview_every is 0).</p>"
    cells = "".join(
        f"<figure><img src='{data_uri(p)}' alt='step {s}'><figcaption>step {s}</figcaption></figure>"
        for s, p in sorted(previews)
    )
    return f"<div class='grid'>{cells}</div>"


def kept_choice(run_dir: Path, name: str) -> tuple[int | None, str]:
    """The step kept as the embedding when it is not the last, and what chose it (from the run's final file)."""
    final = run_dir / f"{name}.safetensors"
    if not final.is_file():
        return None, ""
    from tistudio.embeddings.files import read_embedding
    from tistudio.errors import TistudioError

    try:
        embedding = read_embedding(final)
    except TistudioError:  # the report marks nothing rather than fail on a damaged file
        return None, ""
    return embedding.meta_count("best_step"), embedding.meta.get("best_by", "")


FACE_IDENTITY = (
    "The likeness is face identity: each picture's largest face against the training photos' faces "
    "(dlib's descriptor; 100% the same face, 50% dlib's same-person line, 0% far or no face), averaged "
    "over the pictures."
)


def evaluation_section(
    rows: list[tuple[int, float, float | None]],
    best: int | None,
    neutral: float | None = None,
    by: str = "",
    judged: str | None = None,
) -> str:
    if not rows:
        return ""
    measured = any(like is not None for _, _, like in rows)
    # The trainer chooses by the likeness where it was measured at every evaluation (the kept file says so; when
    # the last step was the best, nothing else was written)
    if "likeness" in by or (not by and measured and all(like is not None for step, _, like in rows if step > 0)):
        chosen = (
            "the best step - the highest likeness (within one point of it, so a near-tie goes to the earlier "
            "step) - is marked and kept as the embedding."
            if best is not None
            else "the last step had the highest likeness."
        )
    else:
        chosen = (
            "the best step - the lowest loss (within 0.5% of the curve's drop) - is marked and kept as the embedding."
            if best is not None
            else "the last step had the lowest loss."
        )
    text = (
        "The loss on a fixed batch (the same images, noise, timesteps and prompts every time; solid) "
        + (
            "and the likeness of pictures from unseen prompts and seeds to the subject (dashed, right axis, 0-100%); "
            if measured
            else "; "
        )
        + chosen
    )
    text += kept_numbers(rows, best)
    if judged == "face identity" and measured:
        text += " " + FACE_IDENTITY
    start = next((loss for step, loss, _ in rows if step == 0), None)
    if neutral is not None and start is not None and neutral < start:
        text += (
            f" This run started farther from the subject ({start:.4f}) than the person-like start would have "
            f"({neutral:.4f}), so the drop is counted from the latter: the fall while the start's own meaning "
            "is unlearned does not count."
        )
    return f"<h2>Evaluation</h2>{eval_chart(rows, best)}<p class='muted'>{text}</p>"


def kept_numbers(rows: list[tuple[int, float, float | None]], best: int | None) -> str:
    """' Step 250 is kept: fixed-batch loss 0.1234 (lowest 0.1230 at step 300), likeness 87% (highest 88% at
    step 275).' - the kept step (the last where none was marked) against the curve's best values."""
    after = [(step, loss, like) for step, loss, like in rows if step > 0]
    if not after:
        return ""
    step = best if best is not None else after[-1][0]
    row = next((r for r in after if r[0] == step), None)
    if row is None:
        return ""
    low = min(after, key=lambda r: r[1])
    text = f" Step {step} is kept: fixed-batch loss {row[1]:.4f} (lowest {low[1]:.4f} at step {low[0]})"
    liked = [r for r in after if r[2] is not None]
    if row[2] is not None and liked:
        top = max(liked, key=lambda r: r[2])
        text += f", likeness {100 * row[2]:.0f}% (highest {100 * top[2]:.0f}% at step {top[0]})"
    return text + "."


def write_run_report(
    run_dir: Path, name: str, *, title: str | None = None, banner: str = "", extra_sections: str = ""
) -> Path:
    """Write run_dir/report.html from the run's files."""
    run_dir = Path(run_dir)
    rows = read_loss_log(run_dir / "loss.csv")
    evaluations = read_eval_log(run_dir / "eval.csv")
    best, by = kept_choice(run_dir, name)
    options_file = run_dir / "options.json"
    summary = ""
    resolved: dict = {}
    if options_file.is_file():
        data = json.loads(options_file.read_text("utf-8"))
        resolved, options = data.get("resolved", {}), data.get("options", {})
        facts = {
            "Model": resolved.get("model"),
            "Images": resolved.get("images"),
            "Size": resolved.get("size"),
            "Learning rate": options.get("learning_rate"),
            "Batch x accumulation": (
                f"{resolved.get('batch_size', options.get('batch_size'))} x {options.get('gradient_accumulation')}"
            ),
            "Template": options.get("template"),
            "Loss weighted": resolved.get("loss_mask") or "-",
            "Pictures judged by": resolved.get("likeness") or "-",
            "Steps": (f"{rows[-1]['step']:.0f}" if rows else "0")
            + (f" (the last sitting resumed at step {resolved['start_step']})" if resolved.get("start_step") else ""),
        }
        summary = (
            "<table>"
            + "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in facts.items())
            + "</table>"
        )
    page = (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title or name)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title or f'Training run: {name}')}</h1>"
        f"{f'<p class=banner>{banner}</p>' if banner else ''}{summary}"
        f"<h2>Loss</h2>{loss_chart(rows)}<p class='muted'>Per-step training loss (light) and its moving "
        f"average (dark). The loss of diffusion training is noisy by nature: it mostly measures which noise "
        f"level each step drew.</p>"
        f"{evaluation_section(evaluations, best, resolved.get('neutral_loss'), by, resolved.get('likeness'))}"
        f"<h2>Previews over training</h2>{preview_grid(run_dir, name)}{extra_sections}</body></html>"
    )
    return write_text(run_dir / "report.html", page)
