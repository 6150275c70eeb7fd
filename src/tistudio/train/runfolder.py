"""A training run's folder, and the resume state in it, written so that no crash or kill loses more than the
steps since the last save.

    options.json                       the resolved options, the model and the dataset
    loss.csv                           step, epoch, loss, lr
    eval.csv                           step, fixed-batch loss, likeness
    embeddings/NAME-STEP.safetensors   a copy every save_every steps
    previews/NAME-STEP.png             a preview every preview_every steps (A1111 infotext inside)
    state/state-STEP.safetensors|json  the resume state of the embedding's step
    NAME.safetensors                   the final embedding (also written to the embeddings folder)
    NAME-last.safetensors              the last step, where the best step was kept as NAME.safetensors
    report.html                        loss curve and previews

Resume state is safetensors + JSON, never a pickle: ``state/state-STEP.safetensors`` (the trained tensors by key,
``vectors.KEY``, and the optimizer's, ``optimizer.KEY.NAME``, plus what the trainer and evaluator keep) and
``state/state-STEP.json`` (the step, a digest of the tensors it belongs to, optimizer scalars, the learning-rate
factor). A checkpoint writes the copy, then the state, then the embedding, and only then deletes older states, so
whatever moment a run is killed at, the embedding on disk has the state of its own step beside it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from tistudio.config import MAX_PREVIEW_PROMPTS
from tistudio.errors import OptionError, UnsafeFileError
from tistudio.storage import append_line, write_json, write_safetensors, write_text

log = logging.getLogger(__name__)

LOSS_HEADER = "step,epoch,loss,lr"
EVAL_HEADER = "step,eval_loss,likeness"
MAX_STATE_BYTES = 64 * 1024 * 1024
# The marks a word file carries when it holds an earlier step than its run's last (use_step, or the best kept).
STEP_MARKS = ("best_step", "best_by", "last_step")


def vectors_digest(tensors: Mapping[str, torch.Tensor] | torch.Tensor) -> str:
    """sha256 of the tensors' float32 bytes, in key order (one tensor: its bytes alone, as earlier releases had)."""
    values = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors.values())
    digest = hashlib.sha256()
    for value in values:
        digest.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def read_loss_log(path: Path) -> list[dict[str, float]]:
    """Rows of a loss.csv; a partly written last line (a killed run) is ignored."""
    if not path.is_file():
        return []
    out = []
    for row in csv.DictReader(io.StringIO(path.read_text("utf-8", errors="replace"))):
        try:
            out.append(
                {
                    "step": int(row["step"]),
                    "epoch": int(row["epoch"]),
                    "loss": float(row["loss"]),
                    "lr": float(row["lr"]),
                }
            )
        except (TypeError, ValueError, KeyError):
            continue
    return out


def eval_row(step: int, loss: float, like: float | None) -> str:
    """One line of an eval.csv (the likeness column is empty where nothing measured it)."""
    return f"{step},{loss:.6f},{'' if like is None else f'{like:.4f}'}"


def read_eval_log(path: Path) -> list[tuple[int, float, float | None]]:
    """Rows (step, fixed-batch loss, likeness or None) of an eval.csv; damaged lines are ignored."""
    rows = []
    if path.is_file():
        for line in path.read_text("utf-8", errors="replace").splitlines()[1:]:
            parts = line.split(",")
            try:
                rows.append((int(parts[0]), float(parts[1]), float(parts[2]) if len(parts) > 2 and parts[2] else None))
            except (ValueError, IndexError):
                continue
    return rows


@dataclass
class ResumeState:
    """What a checkpoint keeps beside the embedding so that training continues exactly."""

    parameters: Mapping[str, torch.Tensor]  # the trained tensors, by key (the optimizer's order)
    optimizer: torch.optim.Optimizer
    scaler: Any = None  # a CUDA GradScaler, or None
    meta: dict[str, Any] = field(default_factory=dict)  # JSON-able scalars (learning-rate factor, ...)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # further tensors (where training started, ...)


class RunFolder:
    def __init__(self, path: Path, name: str) -> None:
        self.path = Path(path)
        self.name = name
        self.loss_log = self.path / "loss.csv"
        self.eval_log = self.path / "eval.csv"
        self.states = self.path / "state"

    # -- where things go ---------------------------------------------------------------------------------------

    def copy_path(self, step: int) -> Path:
        return self.path / "embeddings" / f"{self.name}-{step}.safetensors"

    def preview_path(self, step: int, number: int = 1) -> Path:
        """A step's preview: NAME-STEP.png for the first prompt, NAME-STEP-N.png for the Nth of several."""
        return (
            self.path / "previews" / (f"{self.name}-{step}.png" if number == 1 else f"{self.name}-{step}-{number}.png")
        )

    def more_previews(self, step: int) -> list[Path]:
        """The step's previews of the further prompts (NAME-STEP-2.png, ...), in order."""
        found = []
        for number in range(2, MAX_PREVIEW_PROMPTS + 1):
            path = self.preview_path(step, number)
            if not path.is_file():
                break
            found.append(path)
        return found

    @property
    def final_path(self) -> Path:
        return self.path / f"{self.name}.safetensors"

    @property
    def last_path(self) -> Path:
        return self.path / f"{self.name}-last.safetensors"

    def _steps(self, folder: Path, suffix: str) -> list[int]:
        prefix = f"{self.name}-"
        steps = []
        if folder.is_dir():
            for path in folder.iterdir():
                tail = (
                    path.name[len(prefix) : -len(suffix)]
                    if path.name.startswith(prefix) and path.name.endswith(suffix)
                    else ""
                )
                if tail.isdigit():
                    steps.append(int(tail))
        return sorted(steps)

    def preview_steps(self) -> list[int]:
        """The steps that have a preview image, in order."""
        return self._steps(self.path / "previews", ".png")

    def copy_steps(self) -> list[int]:
        """The steps that have a saved copy of the embedding, in order."""
        return self._steps(self.path / "embeddings", ".safetensors")

    def options(self) -> dict[str, Any]:
        """options.json as it was written ({"options": ..., "resolved": ...}), or {} if it is missing or damaged."""
        try:
            data = json.loads((self.path / "options.json").read_text("utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def resolved_batch(self, processes: int = 1) -> int | None:
        """The batch size per process an earlier sitting of this run trained with (from its options.json), if it
        says: for `processes` processes, the one that keeps the sitting's micro-batch over all processes where it
        divides evenly (so the run continues exactly), else the sitting's own."""
        resolved = self.options().get("resolved")
        if not isinstance(resolved, dict):
            return None

        def count(key: str, default: int | None) -> int | None:
            value = resolved.get(key, default)
            return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

        batch, earlier = count("batch_size", None), count("processes", 1) or 1
        if batch is not None and (batch * earlier) % processes == 0:
            return batch * earlier // processes
        return batch

    # -- opening, logging --------------------------------------------------------------------------------------

    def open(self, start_step: int, *, set_aside: bool = False) -> None:
        """Prepare the folder: a fresh start (step 0) moves an earlier run aside; a resume trims the loss log (and,
        with `set_aside`, first moves the steps after `start_step` aside: a branch from an earlier step)."""
        if set_aside and start_step > 0:
            self.set_aside_after(start_step)
        if start_step == 0 and any((self.path / p).exists() for p in ("loss.csv", "state", "previews", "embeddings")):
            archived = self.path.with_name(f"{self.path.name}-previous-{time.strftime('%Y%m%d-%H%M%S')}")
            self.path.rename(archived)
            log.info("an earlier run of %s was moved to %s", self.name, archived)
        self.path.mkdir(parents=True, exist_ok=True)
        for folder in (self.path, self.states, self.path / "embeddings", self.path / "previews"):
            for stale in folder.glob(".*.tmp") if folder.is_dir() else ():
                stale.unlink(missing_ok=True)  # left by a run killed while writing
        if start_step == 0 or not self.loss_log.is_file():
            write_text(self.loss_log, LOSS_HEADER + "\n")
        else:
            self.trim_losses(start_step)

    def set_aside_after(self, step: int) -> Path:
        """Move what the run saved after `step` into RUN/after-STEP-TIME (copies, LoRAs, previews, the last step,
        resume states), with a copy of the logs whole, so that training can go on from `step` and lose nothing."""
        aside = self.path / f"after-{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        later = re.compile(rf"^{re.escape(self.name)}-(\d+)(-\d+)?\.(safetensors|pt|png)$")
        moving = [
            path
            for folder in ("embeddings", "loras", "previews")
            if (self.path / folder).is_dir()
            for path in sorted((self.path / folder).iterdir())
            if (found := later.match(path.name)) and int(found.group(1)) > step
        ]
        last = (self.last_path, self.lora_path(self.last_path), self.final_path, self.states)
        moving += [path for path in last if path.exists()]
        for path in moving:  # each to the same place under `aside` as under the run folder
            into = aside / path.relative_to(self.path)
            into.parent.mkdir(parents=True, exist_ok=True)
            path.rename(into)
        for log_file in (self.loss_log, self.eval_log):
            if log_file.is_file():
                aside.mkdir(parents=True, exist_ok=True)
                write_text(aside / log_file.name, log_file.read_text("utf-8", errors="replace"))
        log.info("continuing %s from step %d: %d later files moved to %s", self.name, step, len(moving), aside)
        return aside

    def trim_losses(self, step: int) -> None:
        """Keep the rows up to `step` (a killed run may have logged steps it never saved)."""
        rows = self.loss_log.read_text("utf-8", errors="replace").splitlines()
        kept = [LOSS_HEADER] + [
            r for r in rows[1:] if r.split(",")[0].isdigit() and int(r.split(",")[0]) <= step and len(r.split(",")) == 4
        ]
        if kept != rows:
            write_text(self.loss_log, "\n".join(kept) + "\n")

    def append_losses(self, lines: list[str]) -> None:
        append_line(self.loss_log, "\n".join(lines))

    # -- checkpoints and resume state --------------------------------------------------------------------------

    def checkpoint(
        self,
        step: int,
        write: Callable[[Path, str], Path],
        state: ResumeState,
        target: Path,
        *,
        copy: bool,
        final: bool,
    ) -> Path | None:
        """Save step `step`: a copy (if asked), the resume state, the embedding at `target` (and, if `final`, in the
        run folder), then delete older states - in that order, so a kill never leaves an embedding without its state.
        `write(path, name)` writes the embedding named `name` to `path`. Returns the copy's path."""
        copied = write(self.copy_path(step), f"{self.name}-{step}") if copy else None
        self.save_state(step, state)
        write(target, self.name)
        self.prune_states(keep=step)
        if final:
            write(self.final_path, self.name)
        return copied

    def save_state(self, step: int, state: ResumeState) -> None:
        from tistudio import __version__

        optimizer_state = state.optimizer.state_dict()["state"]
        tensors: dict[str, torch.Tensor] = {}
        scalars: dict[str, dict[str, Any]] = {}
        for index, (key, parameter) in enumerate(state.parameters.items()):
            tensors[f"vectors.{key}"] = parameter.detach().to("cpu", torch.float32).contiguous()
            for name, value in optimizer_state.get(index, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer.{key}.{name}"] = value.detach().to("cpu").contiguous()
                elif isinstance(value, (int, float)):
                    scalars.setdefault(key, {})[name] = value
        for key, value in state.tensors.items():
            tensors[key] = value.detach().to("cpu", torch.float32).contiguous()
        meta = {
            "step": step,
            "vectors_sha256": vectors_digest(state.parameters),
            "tistudio_version": __version__,
            "scalars": scalars,
            **state.meta,
        }
        if state.scaler is not None:
            meta["grad_scaler"] = {k: v for k, v in state.scaler.state_dict().items() if isinstance(v, (int, float))}
        write_safetensors(self.states / f"state-{step}.safetensors", tensors)
        write_json(self.states / f"state-{step}.json", meta)

    def load_state(self, step: int, parameters: Mapping[str, torch.Tensor]) -> dict[str, Any] | None:
        """The saved state of these parameters at this step ({"meta": ..., "tensors": ...}), or None (then a fresh
        optimizer is used)."""
        from safetensors.torch import load_file

        from tistudio.safeload import check_size

        meta_file, tensor_file = self.states / f"state-{step}.json", self.states / f"state-{step}.safetensors"
        if not (meta_file.is_file() and tensor_file.is_file()):
            others = sorted(self.states.glob("state-*.json")) if self.states.is_dir() else []
            if others:
                log.warning(
                    "no optimizer state for step %d in %s (found %s); starting a fresh optimizer, so the "
                    "next steps will differ slightly from an uninterrupted run",
                    step,
                    self.states,
                    ", ".join(p.stem for p in others),
                )
            return None
        try:
            meta = json.loads(meta_file.read_text("utf-8"))
            check_size(tensor_file, MAX_STATE_BYTES, "an optimizer state")
            tensors = load_file(tensor_file)
        except (OSError, ValueError, UnsafeFileError) as exc:
            log.warning("ignoring unreadable optimizer state %s (%s)", tensor_file, exc)
            return None
        if not isinstance(meta, dict) or meta.get("vectors_sha256") != vectors_digest(parameters):
            log.warning(
                "the optimizer state %s belongs to other vectors than this embedding's; starting a fresh optimizer",
                meta_file,
            )
            return None
        return upgrade_state({"meta": meta, "tensors": tensors}, tuple(parameters))

    def prune_states(self, keep: int) -> None:
        """Delete the states of other steps (called once the embedding of step `keep` is on disk)."""
        if not self.states.is_dir():
            return
        for path in self.states.glob("state-*"):
            stem = path.name.split(".")[0]
            if stem != f"state-{keep}":
                path.unlink(missing_ok=True)

    # -- using a saved step ------------------------------------------------------------------------------------

    def lora_path(self, word_file: Path) -> Path:
        """The LoRA a run folder's word file goes with (pivotal tuning: train/lora.py writes it)."""
        return self.path / "loras" / word_file.name

    def use_step(self, step: int, target: Path, loras_dir: Path | None = None) -> Path:
        """Make the copy saved at `step` the embedding at `target` (A1111's way: pick the step whose previews
        look best). Nothing is lost: the embedding it replaces is kept as the copy of its own step, and the run's
        last step stays where training resumes from (NAME-last.safetensors, named in the embedding's
        last_step), so training further continues the run rather than restarting at `step`. A word trained with a
        LoRA brings that step's LoRA to loras_dir (default: loras, as training's), the same way."""
        from tistudio.embeddings.bundle import copy_renamed
        from tistudio.embeddings.files import read_embedding, write_embedding

        copy = self.copy_path(step)
        if not copy.is_file():
            saved = ", ".join(map(str, self.copy_steps())) or "none"
            raise OptionError(
                "step", step, f"there is no saved copy of {self.name} at step {step} (saved steps: {saved})"
            )
        chosen = read_embedding(copy)
        lora = Path(loras_dir or "loras") / target.name
        with_lora = bool(chosen.meta.get("lora"))
        if with_lora and not self.lora_path(copy).is_file():
            raise OptionError("step", step, f"the LoRA of step {step} is missing ({self.lora_path(copy)})")
        last = step
        if target.is_file():
            current = read_embedding(target)
            backup = self.copy_path(current.step)
            if not backup.exists():
                if with_lora and lora.is_file():
                    copy_renamed(lora, self.lora_path(backup), f"{self.name}-{current.step}")
                write_embedding(replace(current, name=f"{self.name}-{current.step}"), backup)
            last = max(step, current.meta_count("last_step") or 0)
            if current.step > last:  # the embedding is the run's last step: resume from it
                last = current.step
                if with_lora and lora.is_file():
                    copy_renamed(lora, self.lora_path(self.last_path), f"{self.name}-last")
                write_embedding(replace(current, name=f"{self.name}-last"), self.last_path)
        # what the chosen step's files say of it: the chosen step, and the last step where training goes on from
        marks: dict[str, str | None] = dict.fromkeys(STEP_MARKS)
        if last > step:
            marks.update(best_step=str(step), best_by="chosen", last_step=str(last))
        meta = {k: v for k, v in chosen.meta.items() if k not in marks}
        meta.update({k: v for k, v in marks.items() if v is not None})
        if with_lora:
            copy_renamed(self.lora_path(copy), lora, self.name, {"step": str(step), **marks})
        return write_embedding(replace(chosen, name=self.name, step=step, meta=meta), target)


def run_folder(name: str, run_dir: str | Path = "") -> RunFolder:
    """The run folder of an embedding: run_dir if given, else runs/NAME."""
    return RunFolder(Path(run_dir or Path("runs") / name), name)


# Resume states written before tensors were kept by key (one trained tensor): their names, and the new ones.
_UNKEYED = {"vectors": "vectors.{}", "kept_vectors": "kept.{}", "init_vectors": "init.{}"}


def upgrade_state(saved: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """A resume state in the current layout: an earlier release's (unkeyed tensor names, one trained tensor) is
    renamed to it."""
    tensors = saved["tensors"]
    if "vectors" not in tensors or len(keys) != 1:
        return saved
    key = keys[0]
    renamed = {
        (_UNKEYED[name].format(key) if name in _UNKEYED else f"optimizer.{key}.{name}"): value
        for name, value in tensors.items()
    }
    scalars = saved["meta"].get("scalars", {})
    return {"meta": {**saved["meta"], "scalars": {key: scalars} if scalars else {}}, "tensors": renamed}


def restore_optimizer(
    optimizer: torch.optim.Optimizer, saved: dict[str, Any], parameters: Mapping[str, torch.Tensor]
) -> None:
    """Load the optimizer state of a resume state (see RunFolder.load_state) for these parameters."""
    scalars = saved["meta"].get("scalars", {})
    state: dict[int, dict[str, Any]] = {}
    for index, (key, parameter) in enumerate(parameters.items()):
        prefix = f"optimizer.{key}."
        entry = {
            name[len(prefix) :]: value.to(parameter.device)
            for name, value in saved["tensors"].items()
            if name.startswith(prefix)
        }
        entry.update(scalars.get(key, {}))
        if entry:
            state[index] = entry
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
