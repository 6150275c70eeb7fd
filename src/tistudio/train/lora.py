"""Pivotal tuning's second trainable: a LoRA of the UNet's attention that trains beside the word (--lora-rank).

Each targeted Linear layer W gets ``W x + scale * up(down(x))``: ``down`` [rank, in] starts random (Kaiming-uniform,
seeded by the run's seed), ``up`` [out, rank] at zero, so a run begins exactly where the word alone would. It enters
the UNet by forward hooks (models/lora.py), has its own learning-rate schedule (rate 0 until lora_start of the steps:
the word first, then both), and writes one file beside each of the word's: the target's beside it in loras_dir
(``loras/NAME.safetensors``), the run folder's in its ``loras/`` folder - each in kohya's layout with the word bundled
(embeddings/bundle.py), so A1111 loads LoRA and word from ``<lora:NAME:1>``. A run continues from the file beside
the one the word continues from; the word's file names its LoRA (metadata ``lora``), and generation applies it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from tistudio.config import TrainOptions
from tistudio.embeddings.bundle import ALPHA, DOWN, UP, lora_metadata, read_lora, write_lora
from tistudio.embeddings.files import Embedding, whole_number
from tistudio.errors import OptionError, TistudioError
from tistudio.models.lora import Hooked, target_layers
from tistudio.schedule import Schedule, parse_schedule
from tistudio.train.runfolder import STEP_MARKS
from tistudio.train.trainable import EmbeddingTrainable, ParameterGroup, Tensors, TrainableSetup


def lora_schedule(options: TrainOptions, start_step: int) -> Schedule:
    """The LoRA's learning rate: lora_learning_rate, at 0 until the step lora_start of the steps have passed."""
    max_steps = options.max_steps
    rates = parse_schedule(
        options.lora_learning_rate, max_steps=max_steps, start_step=start_step, field_name="lora_learning_rate"
    )
    joins = math.floor(options.lora_start * max_steps)
    if joins <= start_step:
        return rates
    later = tuple((rate, end) for rate, end in rates.pairs if end > joins)
    return Schedule(((0.0, joins), *later)) if later else Schedule(((0.0, max_steps),))


def check_resumable(embedding: Embedding, options: TrainOptions) -> None:
    """A word trained with a LoRA goes on training with one of the same rank (before any compute)."""
    rank = embedding.meta_count("lora_rank") or 0
    wanted = options.lora_rank
    if rank and wanted != rank:
        raise OptionError(
            "lora_rank",
            wanted,
            f"{embedding.name} trains with a rank-{rank} LoRA ({embedding.meta.get('lora', embedding.name)} in the "
            f"LoRA folder); pass --lora-rank {rank} to go on training both, or create a new embedding",
        )


class LoraTrainable:
    """A LoRA of the UNet's attention, trained beside the word; see the module's docstring."""

    def __init__(self, setup: TrainableSetup) -> None:
        options, model = setup.options, setup.model
        if setup.word is None or setup.target is None or setup.run_path is None:
            raise TistudioError("a LoRA trains beside a word: its setup names the word, its file and the run folder")
        self.word: EmbeddingTrainable = setup.word
        self.target, self.run_path = setup.target, setup.run_path
        self.loras_dir = Path(options.loras_dir)
        self.rank, self.targets = options.lora_rank, options.lora_targets
        self.alpha = options.lora_alpha or float(self.rank)
        self.schedule = lora_schedule(options, setup.step)
        self.modules = target_layers(model.unet, self.targets)
        if not self.modules:
            raise TistudioError(f"the UNet has no {self.targets} layers a LoRA can change")
        self.model_hash, self.model_name = model.hash, model.name
        self.tensors = self._begin(setup, model.device)
        self.hooks: Hooked | None = None
        self.word.embedding = replace(
            self.word.embedding,
            meta={
                **self.word.embedding.meta,
                "lora": self.word.name,
                "lora_rank": str(self.rank),
                "lora_targets": self.targets,
            },
        )

    # -- where it starts -------------------------------------------------------------------------------------------

    def _begin(self, setup: TrainableSetup, device: torch.device) -> dict[str, torch.nn.Parameter]:
        """Fresh (seeded) at a new start or where the word's file names no LoRA; else from the file beside the one
        the word continues from."""
        source = self.beside(setup.source)
        if setup.step > 0 and self.word.embedding.meta.get("lora"):
            return self._resumed(source, setup.step, device)
        generator = torch.Generator().manual_seed(int(setup.options.seed))
        tensors: dict[str, torch.nn.Parameter] = {}
        for name, module in self.modules.items():
            down = torch.empty(self.rank, module.in_features)
            bound = 1.0 / math.sqrt(module.in_features)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear and peft do
            down.uniform_(-bound, bound, generator=generator)
            tensors[name + DOWN] = torch.nn.Parameter(down.to(device))
            tensors[name + UP] = torch.nn.Parameter(torch.zeros(module.out_features, self.rank, device=device))
        return tensors

    def _resumed(self, source: Path, step: int, device: torch.device) -> dict[str, torch.nn.Parameter]:
        if not source.is_file():
            raise TistudioError(
                f"{self.word.name} was trained with a LoRA, but {source} is missing; put it back, or create a new "
                "embedding to start again"
            )
        lora = read_lora(source)
        saved_step = whole_number(lora.meta.get("step"))
        if saved_step != step:
            raise TistudioError(
                f"{source} is the LoRA of step {saved_step if saved_step is not None else '?'}, not of step {step} "
                f"where {self.word.name} continues; "
                "put back the LoRA saved with it"
            )
        tensors = {}
        for name, module in self.modules.items():
            down, up = lora.tensors.get(name + DOWN), lora.tensors.get(name + UP)
            if down is None or up is None or tuple(down.shape) != (self.rank, module.in_features):
                raise OptionError(
                    "lora_targets",
                    self.targets,
                    f"{source} holds a LoRA of other layers or rank than rank {self.rank} on {self.targets}; "
                    f"train it with the options it began with (lora_rank={lora.rank})",
                )
            tensors[name + DOWN] = torch.nn.Parameter(down.to(device, torch.float32).clone())
            tensors[name + UP] = torch.nn.Parameter(up.to(device, torch.float32).clone())
        return tensors

    def beside(self, word_file: Path) -> Path:
        """The LoRA file that goes with a word's file: the target's in loras_dir, the run folder's in its loras/."""
        if word_file == self.target:
            return self.loras_dir / word_file.name
        return self.run_path / "loras" / word_file.name

    # -- the Trainable protocol ------------------------------------------------------------------------------------

    def parameters(self) -> dict[str, torch.nn.Parameter]:
        return self.tensors

    def groups(self) -> list[ParameterGroup]:
        label = f"a rank-{self.rank} LoRA of the UNet's {self.targets} ({len(self.modules)} layers)"
        return [ParameterGroup(tuple(self.tensors), self.schedule, label)]

    def install(self, model: object, encoder: object) -> None:
        self.hooks = Hooked(self.modules, self.tensors, self.alpha / self.rank)

    def remove(self) -> None:
        if self.hooks is not None:
            self.hooks.remove()
            self.hooks = None

    def start(self, saved: Mapping[str, torch.Tensor] | None) -> None:
        pass  # where it started is no change at all: start_values()

    @contextmanager
    def using(self, values: Mapping[str, torch.Tensor]) -> Iterator[None]:
        kept = {key: tensor.detach().clone() for key, tensor in self.tensors.items()}
        with torch.no_grad():
            for key, tensor in self.tensors.items():
                tensor.copy_(values[key])
        try:
            yield
        finally:
            with torch.no_grad():
                for key, tensor in self.tensors.items():
                    tensor.copy_(kept[key])

    def penalty(self) -> None:
        return None

    def constrain(self) -> None:
        pass

    def snapshot(self) -> Tensors:
        return {key: tensor.detach().to("cpu", torch.float32).clone() for key, tensor in self.tensors.items()}

    def start_values(self) -> Tensors:
        """No change: the ups at zero (whatever the downs)."""
        return {
            key: torch.zeros_like(tensor) if key.endswith(UP) else tensor.detach().clone()
            for key, tensor in self.snapshot().items()
        }

    def neutral_start(self) -> None:
        return None

    def state(self) -> Tensors:
        return {}

    def write(
        self,
        values: Mapping[str, torch.Tensor],
        path: Path,
        *,
        name: str,
        step: int,
        meta: Mapping[str, str] | None = None,
    ) -> Path:
        """The LoRA beside the word's file `path`, in kohya's layout with the word (named `name`) bundled."""
        tensors: dict[str, torch.Tensor] = {}
        for layer in self.modules:
            tensors[layer + DOWN] = values[layer + DOWN].to("cpu", torch.float32)
            tensors[layer + UP] = values[layer + UP].to("cpu", torch.float32)
            tensors[layer + ALPHA] = torch.tensor(self.alpha, dtype=torch.float32)
        word = self.word.as_embedding(values, name=name, step=step, meta=meta)
        info = {
            "ss_output_name": name,
            "name": name,
            "word": name,
            "step": str(step),
            "lora_targets": self.targets,
            "modelspec.title": name,
            **({"sd_checkpoint": self.model_hash} if self.model_hash else {}),
            **({"sd_checkpoint_name": self.model_name} if self.model_name else {}),
            **{key: value for key, value in (meta or {}).items() if key in STEP_MARKS},
        }
        return write_lora(self.beside(path), tensors, [word], lora_metadata(self.rank, self.alpha, info))
