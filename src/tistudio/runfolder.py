"""A training run's folder, and the resume state in it, written so that no crash or kill loses more than the
steps since the last save.

Resume state is safetensors + JSON, never a pickle: ``state/state-STEP.safetensors`` (the optimizer's tensors and
the vectors) and ``state/state-STEP.json`` (the step, a digest of the vectors it belongs to, optimizer scalars,
the learning-rate factor). A state is only deleted after a newer embedding file is safely on disk, so whatever
moment a run is killed at, the embedding on disk has the state of its own step beside it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from .errors import UnsafeFileError
from .storage import append_line, write_json, write_safetensors, write_text

log = logging.getLogger(__name__)

LOSS_HEADER = "step,epoch,loss,lr"
MAX_STATE_BYTES = 64 * 1024 * 1024


def vectors_digest(vectors: torch.Tensor) -> str:
    return hashlib.sha256(vectors.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()


def read_loss_log(path: Path) -> list[dict[str, float]]:
    """Rows of a loss.csv; a partly written last line (a killed run) is ignored."""
    if not path.is_file():
        return []
    out = []
    for row in csv.DictReader(io.StringIO(path.read_text("utf-8", errors="replace"))):
        try:
            out.append({"step": int(row["step"]), "epoch": int(row["epoch"]), "loss": float(row["loss"]),
                        "lr": float(row["lr"])})
        except (TypeError, ValueError, KeyError):
            continue
    return out


EVAL_HEADER = "step,eval_loss,likeness"


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
                rows.append((int(parts[0]), float(parts[1]),
                             float(parts[2]) if len(parts) > 2 and parts[2] else None))
            except (ValueError, IndexError):
                continue
    return rows


class RunFolder:
    def __init__(self, path: Path, name: str) -> None:
        self.path = Path(path)
        self.name = name
        self.loss_log = self.path / "loss.csv"
        self.states = self.path / "state"

    def copy_path(self, step: int) -> Path:
        return self.path / "embeddings" / f"{self.name}-{step}.safetensors"

    def preview_path(self, step: int) -> Path:
        return self.path / "previews" / f"{self.name}-{step}.png"

    def resolved_batch(self) -> int | None:
        """The batch size an earlier sitting of this run trained with (from its options.json), if it says."""
        try:
            batch = json.loads((self.path / "options.json").read_text("utf-8"))["resolved"]["batch_size"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return batch if isinstance(batch, int) and batch > 0 else None

    def open(self, start_step: int) -> None:
        """Prepare the folder: a fresh start (step 0) moves an earlier run aside; a resume trims the loss log."""
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

    def trim_losses(self, step: int) -> None:
        """Keep the rows up to `step` (a killed run may have logged steps it never saved)."""
        rows = self.loss_log.read_text("utf-8", errors="replace").splitlines()
        kept = [LOSS_HEADER] + [r for r in rows[1:] if r.split(",")[0].isdigit() and int(r.split(",")[0]) <= step
                                and len(r.split(",")) == 4]
        if kept != rows:
            write_text(self.loss_log, "\n".join(kept) + "\n")

    def append_losses(self, lines: list[str]) -> None:
        append_line(self.loss_log, "\n".join(lines))

    def save_state(self, step: int, vectors: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: Any,
                   extra: dict[str, Any], extra_tensors: dict[str, torch.Tensor] | None = None) -> None:
        from . import __version__

        state = optimizer.state_dict()["state"].get(0, {})
        tensors = {key: value.detach().to("cpu").contiguous() for key, value in state.items()
                   if isinstance(value, torch.Tensor)}
        tensors["vectors"] = vectors.detach().to("cpu", torch.float32).contiguous()
        for key, value in (extra_tensors or {}).items():
            tensors[key] = value.detach().to("cpu", torch.float32).contiguous()
        meta = {"step": step, "vectors_sha256": vectors_digest(vectors), "tistudio_version": __version__,
                "scalars": {k: v for k, v in state.items() if isinstance(v, (int, float))}, **extra}
        if scaler is not None:
            meta["grad_scaler"] = {k: v for k, v in scaler.state_dict().items() if isinstance(v, (int, float))}
        write_safetensors(self.states / f"state-{step}.safetensors", tensors)
        write_json(self.states / f"state-{step}.json", meta)

    def load_state(self, step: int, vectors: torch.Tensor) -> dict[str, Any] | None:
        """The saved state of this embedding at this step, or None (then a fresh optimizer is used)."""
        from safetensors.torch import load_file

        from .safeload import check_size

        meta_file, tensor_file = self.states / f"state-{step}.json", self.states / f"state-{step}.safetensors"
        if not (meta_file.is_file() and tensor_file.is_file()):
            others = sorted(self.states.glob("state-*.json")) if self.states.is_dir() else []
            if others:
                log.warning("no optimizer state for step %d in %s (found %s); starting a fresh optimizer, so the "
                            "next steps will differ slightly from an uninterrupted run", step, self.states,
                            ", ".join(p.stem for p in others))
            return None
        try:
            meta = json.loads(meta_file.read_text("utf-8"))
            check_size(tensor_file, MAX_STATE_BYTES, "an optimizer state")
            tensors = load_file(tensor_file)
        except (OSError, ValueError, UnsafeFileError) as exc:
            log.warning("ignoring unreadable optimizer state %s (%s)", tensor_file, exc)
            return None
        if not isinstance(meta, dict) or meta.get("vectors_sha256") != vectors_digest(vectors):
            log.warning("the optimizer state %s belongs to other vectors than this embedding's; starting a fresh "
                        "optimizer", meta_file)
            return None
        return {"meta": meta, "tensors": tensors}

    def prune_states(self, keep: int) -> None:
        """Delete the states of other steps (called once the embedding of step `keep` is on disk)."""
        if not self.states.is_dir():
            return
        for path in self.states.glob("state-*"):
            stem = path.name.split(".")[0]
            if stem != f"state-{keep}":
                path.unlink(missing_ok=True)


def restore_optimizer(optimizer: torch.optim.Optimizer, saved: dict[str, Any], param: torch.Tensor) -> None:
    known = ("vectors", "kept_vectors", "init_vectors")
    state = {k: v.to(param.device) for k, v in saved["tensors"].items() if k not in known}
    state.update(saved["meta"].get("scalars", {}))
    optimizer.load_state_dict({"state": {0: state}, "param_groups": optimizer.state_dict()["param_groups"]})
