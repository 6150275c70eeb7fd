"""What training trains: a small protocol, the embedding's vectors as its first implementation, and a composite.

The training loop (train/loop.py), the optimizer, the checkpointer, the resume state, the evaluator and data-parallel
reduction never name an embedding: they speak to a :class:`Trainable`. It gives its parameters by key and in
groups with their own learning-rate schedules, installs itself in the whole model (text encoders through the prompt
encoder, or the UNet by hooks of its own) and removes itself again, begins fresh or from its part of a resume state,
adds its penalty to the loss, constrains itself after each optimizer step, takes snapshots (the kept best steps, the
saved copies) and writes them as the files users get. :class:`Trainables` puts several together - the word's vectors
first, then whatever trains beside them (a LoRA for pivotal tuning) - and is itself a Trainable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch

from tistudio.embeddings.files import Embedding, write_embedding
from tistudio.errors import TistudioError
from tistudio.models.conditioning import PromptEncoder
from tistudio.schedule import Schedule

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ParameterGroup:
    """Parameters that share a learning rate: one optimizer parameter group."""

    keys: tuple[str, ...]  # keys of the trainable's parameters()
    schedule: Schedule  # the learning rate at each step
    label: str = ""  # in words, for the log


class Trainable(Protocol):
    """Tensors the optimizer trains, by key, and how they enter the model and the files."""

    def parameters(self) -> dict[str, torch.nn.Parameter]:
        """The trainable tensors by key (float32); the optimizer and the resume state follow this order."""
        ...

    def groups(self) -> list[ParameterGroup]:
        """The parameters in groups with their own learning-rate schedules, covering parameters() in its order."""
        ...

    def install(self, model: Any, encoder: PromptEncoder) -> None:
        """Make the model compute with the parameters: through its prompt encoder, or by hooks in its modules."""
        ...

    def remove(self) -> None:
        """Undo install(): the model computes as loaded again (hooks removed)."""
        ...

    def start(self, saved: Mapping[str, torch.Tensor] | None) -> None:
        """Begin training: fresh (None) or from the resume state's tensors (its own keys among them)."""
        ...

    def using(self, values: Mapping[str, torch.Tensor]) -> AbstractContextManager[None]:
        """Compute with other values for a while (e.g. to measure another start), then with the parameters again."""
        ...

    def penalty(self) -> torch.Tensor | None:
        """A term added to the loss of each optimizer step (once per step), or None."""
        ...

    def constrain(self) -> None:
        """Called after each optimizer step (e.g. to cap norms)."""
        ...

    def snapshot(self) -> Tensors:
        """CPU float32 copies of the parameters, by the same keys."""
        ...

    def start_values(self) -> Tensors:
        """Where this run started (by the parameters' keys)."""
        ...

    def neutral_start(self) -> Tensors | None:
        """Values of a neutral start the loss's drop is counted from where they differ from start_values(), or
        None where there is none."""
        ...

    def state(self) -> Tensors:
        """Further tensors the resume state must keep (e.g. where training started); keys unique to this trainable."""
        ...

    def write(
        self,
        values: Mapping[str, torch.Tensor],
        path: Path,
        *,
        name: str,
        step: int,
        meta: Mapping[str, str] | None = None,
    ) -> Path:
        """Write values (the parameters, or a snapshot of them; all the run's, by key: a part writes its own) as the
        file users get at `path` (the word's file; a trainable beside it writes its own file next to it), named
        `name`; returns the path written."""
        ...


class EmbeddingTrainable:
    """An embedding's vectors, one float32 Parameter per text encoder, spliced into the prompt encoder.

    `initial` is where the vectors started (kept in the resume state for --init-pull); `norm_limits` caps each
    vector's norm per encoder after every step (--max-norm); `fixed_norms` holds each vector's norm and trains its
    direction only (--fixed-norm); `init_pull` weighs a pull toward the start.
    """

    def __init__(
        self,
        embedding: Embedding,
        device: torch.device,
        schedule: Schedule,
        *,
        norm_limits: Mapping[str, float] | None = None,
        init_pull: float = 0.0,
        fixed_norms: Mapping[str, float] | None = None,
    ) -> None:
        self.embedding, self.device, self.schedule = embedding, device, schedule
        self.vectors = {
            key: torch.nn.Parameter(tensor.to(device, torch.float32).clone())
            for key, tensor in embedding.vectors.items()
        }
        self.norm_limits = dict(norm_limits or {})
        self.fixed_norms = dict(fixed_norms or {})
        self.init_pull = init_pull
        for vectors in self.vectors.values() if self.fixed_norms else ():  # the gradient keeps its part across
            vectors.register_hook(partial(along_sphere, vectors))  # the sphere
        self.initial: Tensors = {}
        self.model: Any = None
        self.encoder: PromptEncoder | None = None

    def start(self, saved: Mapping[str, torch.Tensor] | None) -> None:
        """Where the vectors started comes from the resume state (for --init-pull); a new start is put on its sphere
        (--fixed-norm; a resumed one is there: its bits are kept as saved)."""
        initial = initial_from_state(saved) if saved is not None else None
        if self.fixed_norms and initial is None:
            self.constrain()
        self.initial = (
            {key: tensor.to(self.device) for key, tensor in initial.items()}
            if initial is not None
            else {key: vectors.detach().clone() for key, vectors in self.vectors.items()}
        )

    @property
    def name(self) -> str:
        return self.embedding.name

    def parameters(self) -> dict[str, torch.nn.Parameter]:
        return self.vectors

    def groups(self) -> list[ParameterGroup]:
        return [ParameterGroup(tuple(self.vectors), self.schedule, f"the vectors of {self.name}")]

    def install(self, model: Any, encoder: PromptEncoder) -> None:
        self.model, self.encoder = model, encoder
        encoder.set_embeddings({self.name: self.vectors})

    def remove(self) -> None:
        if self.encoder is not None:
            self.encoder.set_embeddings({})
        self.model = self.encoder = None

    @contextmanager
    def using(self, values: Mapping[str, torch.Tensor]) -> Iterator[None]:
        encoder = self.installed()
        encoder.set_embeddings({self.name: {key: values[key] for key in self.vectors}})
        try:
            yield
        finally:
            encoder.set_embeddings({self.name: self.vectors})

    def installed(self) -> PromptEncoder:
        if self.encoder is None:
            raise TistudioError("the embedding's vectors are not installed in a prompt encoder")
        return self.encoder

    def penalty(self) -> torch.Tensor | None:
        if not self.init_pull:
            return None
        terms = [self.init_pull * (vectors - self.initial[key]).pow(2).mean() for key, vectors in self.vectors.items()]
        total = terms[0]
        for term in terms[1:]:
            total = total + term
        return total

    def constrain(self) -> None:
        """After a step: each vector back on its sphere (--fixed-norm), or shortened to its cap (--max-norm)."""
        if not self.norm_limits and not self.fixed_norms:
            return
        with torch.no_grad():
            for key, vectors in self.vectors.items():
                norms = vectors.norm(dim=1, keepdim=True).clamp(min=1e-12)
                if key in self.fixed_norms:
                    vectors.mul_(self.fixed_norms[key] / norms)
                else:
                    vectors.mul_((self.norm_limits[key] / norms).clamp(max=1.0))

    def snapshot(self) -> Tensors:
        return {key: vectors.detach().to("cpu", torch.float32).clone() for key, vectors in self.vectors.items()}

    def start_values(self) -> Tensors:
        return dict(self.initial)

    def neutral_start(self) -> Tensors | None:
        """The person-like start (create.person_vectors) with as many vectors, where the run started elsewhere."""
        from tistudio.train.create import person_vectors

        count = next(iter(self.vectors.values())).shape[0]
        neutral = {key: vectors.to(self.device) for key, vectors in person_vectors(self.model, count).items()}
        if all(torch.equal(neutral[key], self.initial[key].to(torch.float32)) for key in self.initial):
            return None
        return neutral

    def state(self) -> Tensors:
        return {f"init.{key}": tensor for key, tensor in self.initial.items()}

    def as_embedding(
        self, values: Mapping[str, torch.Tensor], *, name: str, step: int, meta: Mapping[str, str] | None = None
    ) -> Embedding:
        vectors = {key: values[key].detach().to("cpu", torch.float32).clone() for key in self.vectors}
        return replace(
            self.embedding, name=name, vectors=vectors, step=step, meta={**self.embedding.meta, **(meta or {})}
        )

    def write(
        self,
        values: Mapping[str, torch.Tensor],
        path: Path,
        *,
        name: str,
        step: int,
        meta: Mapping[str, str] | None = None,
    ) -> Path:
        return write_embedding(self.as_embedding(values, name=name, step=step, meta=meta), path)


class Trainables:
    """Several trainables trained as one: the word's vectors first, then what trains beside them. Their keys must
    not overlap; the optimizer's groups, the resume state and the snapshots follow the parts' order. Files are
    written last part first, so that the word's file - whose step says where a run resumes - is written last."""

    def __init__(self, parts: Sequence[Trainable]) -> None:
        if not parts:
            raise TistudioError("nothing to train")
        self.parts = list(parts)
        self.keys: list[tuple[str, ...]] = [tuple(part.parameters()) for part in self.parts]
        seen: set[str] = set()
        for keys in self.keys:
            clash = seen.intersection(keys)
            if clash:
                raise TistudioError(f"two trainables share the parameter keys {sorted(clash)}")
            seen.update(keys)

    def _split(self, values: Mapping[str, torch.Tensor]) -> Iterator[tuple[Trainable, Tensors]]:
        for part, keys in zip(self.parts, self.keys, strict=True):
            yield part, {key: values[key] for key in keys}

    def parameters(self) -> dict[str, torch.nn.Parameter]:
        return {key: value for part in self.parts for key, value in part.parameters().items()}

    def groups(self) -> list[ParameterGroup]:
        return [group for part in self.parts for group in part.groups()]

    def install(self, model: Any, encoder: PromptEncoder) -> None:
        for part in self.parts:
            part.install(model, encoder)

    def remove(self) -> None:
        for part in reversed(self.parts):
            part.remove()

    def start(self, saved: Mapping[str, torch.Tensor] | None) -> None:
        for part in self.parts:
            part.start(saved)

    @contextmanager
    def using(self, values: Mapping[str, torch.Tensor]) -> Iterator[None]:
        with ExitStack() as stack:
            for part, own in self._split(values):
                stack.enter_context(part.using(own))
            yield

    def penalty(self) -> torch.Tensor | None:
        terms = [term for term in (part.penalty() for part in self.parts) if term is not None]
        total = terms[0] if terms else None
        for term in terms[1:]:
            total = total + term
        return total

    def constrain(self) -> None:
        for part in self.parts:
            part.constrain()

    def snapshot(self) -> Tensors:
        return {key: value for part in self.parts for key, value in part.snapshot().items()}

    def start_values(self) -> Tensors:
        return {key: value for part in self.parts for key, value in part.start_values().items()}

    def neutral_start(self) -> Tensors | None:
        neutrals = [part.neutral_start() for part in self.parts]
        if all(neutral is None for neutral in neutrals):
            return None
        return {
            key: value
            for part, neutral in zip(self.parts, neutrals, strict=True)
            for key, value in (part.start_values() if neutral is None else neutral).items()
        }

    def state(self) -> Tensors:
        return {key: value for part in self.parts for key, value in part.state().items()}

    def write(
        self,
        values: Mapping[str, torch.Tensor],
        path: Path,
        *,
        name: str,
        step: int,
        meta: Mapping[str, str] | None = None,
    ) -> Path:
        written = path
        for part in reversed(self.parts):  # each part writes its own keys; a part may bundle others' (a LoRA the word)
            written = part.write(values, path, name=name, step=step, meta=meta)
        return written


@dataclass(frozen=True)
class TrainableSetup:
    """What a trainable beside the word is made from: the loaded model, the run's options and main learning-rate
    schedule, the word's file the run continues from (a trainable's own file is beside it) and its step; the word
    itself, the word's file the run writes (its target) and the run folder."""

    model: Any
    options: Any  # config.TrainOptions
    schedule: Schedule
    source: Path
    step: int
    word: EmbeddingTrainable | None = None
    target: Path | None = None
    run_path: Path | None = None


TrainableFactory = Callable[[TrainableSetup], Trainable]


def initial_from_state(tensors: Mapping[str, torch.Tensor]) -> Tensors | None:
    """The start an EmbeddingTrainable saved in its resume state (see state()), if it is there."""
    found = {key[len("init.") :]: tensor for key, tensor in tensors.items() if key.startswith("init.")}
    return found or None


def along_sphere(vectors: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The gradient without its part along each vector: what moves a vector's direction and not its length."""
    unit = vectors.detach() / vectors.detach().norm(dim=1, keepdim=True).clamp(min=1e-12)
    return grad - (grad * unit).sum(dim=1, keepdim=True) * unit


def norm_limits(model: Any, keys: tuple[str, ...], factor: float) -> dict[str, float]:
    """`factor` times the median token norm of each text encoder's vocabulary (--max-norm's caps, --fixed-norm's
    norms)."""
    return {key: factor * float(model.text[key].table.detach().float().norm(dim=1).median()) for key in keys}
