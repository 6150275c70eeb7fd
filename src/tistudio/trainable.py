"""What training trains: a small protocol, and the embedding's vectors as its first implementation.

The training loop (train.py) never names an embedding: it asks a :class:`Trainable` for its parameters (for the
optimizer and the resume state), installs them in the model, adds its penalty to the loss, lets it constrain itself
after each optimizer step, and takes snapshots of it (the kept best steps, the saved copies) that it writes back
as files. A LoRA for pivotal tuning, trained beside the embedding, would be a second implementation.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch

from .conditioning import PromptEncoder
from .embedding import Embedding, write_embedding

Tensors = dict[str, torch.Tensor]


class Trainable(Protocol):
    """Tensors the optimizer trains, by key, and how they enter the model and the files."""

    def parameters(self) -> dict[str, torch.nn.Parameter]:
        """The trainable tensors by key (float32); the optimizer and the resume state follow this order."""
        ...

    def install(self, encoder: PromptEncoder) -> None:
        """Make the model (through its prompt encoder, or by hooks of its own) compute with the parameters."""
        ...

    def using(self, encoder: PromptEncoder, values: Mapping[str, torch.Tensor]) -> AbstractContextManager[None]:
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

    def state(self) -> Tensors:
        """Further tensors the resume state must keep (e.g. where training started)."""
        ...

    def write(self, values: Mapping[str, torch.Tensor], path: Path, *, name: str, step: int,
              meta: Mapping[str, str] | None = None) -> Path:
        """Write values (the parameters, or a snapshot of them) as the file users get, named `name`."""
        ...


class EmbeddingTrainable:
    """An embedding's vectors, one float32 Parameter per text encoder, spliced into the prompt encoder.

    `initial` is where the vectors started (kept in the resume state for --init-pull); `norm_limits` caps each
    vector's norm per encoder after every step (--max-norm); `fixed_norms` holds each vector's norm and trains its
    direction only (--fixed-norm); `init_pull` weighs a pull toward the start.
    """

    def __init__(self, embedding: Embedding, device: torch.device, *, initial: Mapping[str, torch.Tensor] | None = None,
                 norm_limits: Mapping[str, float] | None = None, init_pull: float = 0.0,
                 fixed_norms: Mapping[str, float] | None = None) -> None:
        self.embedding = embedding
        self.vectors = {key: torch.nn.Parameter(tensor.to(device, torch.float32).clone())
                        for key, tensor in embedding.vectors.items()}
        self.norm_limits = dict(norm_limits or {})
        self.fixed_norms = dict(fixed_norms or {})
        self.init_pull = init_pull
        if self.fixed_norms:  # a new start put on its sphere (a resumed one is there: its bits are kept as saved);
            if initial is None:  # the gradient keeps only its part across the sphere
                self.constrain()
            for vectors in self.vectors.values():
                vectors.register_hook(partial(along_sphere, vectors))
        self.initial = ({key: tensor.to(device) for key, tensor in initial.items()} if initial is not None
                        else {key: vectors.detach().clone() for key, vectors in self.vectors.items()})

    @property
    def name(self) -> str:
        return self.embedding.name

    def parameters(self) -> dict[str, torch.nn.Parameter]:
        return self.vectors

    def install(self, encoder: PromptEncoder) -> None:
        encoder.set_embeddings({self.name: self.vectors})

    @contextmanager
    def using(self, encoder: PromptEncoder, values: Mapping[str, torch.Tensor]) -> Iterator[None]:
        encoder.set_embeddings({self.name: dict(values)})
        try:
            yield
        finally:
            self.install(encoder)

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

    def state(self) -> Tensors:
        return {f"init.{key}": tensor for key, tensor in self.initial.items()}

    def as_embedding(self, values: Mapping[str, torch.Tensor], *, name: str, step: int,
                     meta: Mapping[str, str] | None = None) -> Embedding:
        vectors = {key: tensor.detach().to("cpu", torch.float32).clone() for key, tensor in values.items()}
        return replace(self.embedding, name=name, vectors=vectors, step=step,
                       meta={**self.embedding.meta, **(meta or {})})

    def write(self, values: Mapping[str, torch.Tensor], path: Path, *, name: str, step: int,
              meta: Mapping[str, str] | None = None) -> Path:
        return write_embedding(self.as_embedding(values, name=name, step=step, meta=meta), path)


def initial_from_state(tensors: Mapping[str, torch.Tensor]) -> Tensors | None:
    """The start an EmbeddingTrainable saved in its resume state (see state()), if it is there."""
    found = {key[len("init."):]: tensor for key, tensor in tensors.items() if key.startswith("init.")}
    return found or None


def along_sphere(vectors: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The gradient without its part along each vector: what moves a vector's direction and not its length."""
    unit = vectors.detach() / vectors.detach().norm(dim=1, keepdim=True).clamp(min=1e-12)
    return grad - (grad * unit).sum(dim=1, keepdim=True) * unit


def norm_limits(model: Any, keys: tuple[str, ...], factor: float) -> dict[str, float]:
    """`factor` times the median token norm of each text encoder's vocabulary (--max-norm's caps, --fixed-norm's
    norms)."""
    return {key: factor * float(model.text[key].table.detach().float().norm(dim=1).median()) for key in keys}
