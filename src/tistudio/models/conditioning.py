"""Turning prompts into what the UNet is conditioned on, with embeddings spliced into every text encoder.

The tokenizers and the vocabulary are never changed. Instead each text encoder's token-embedding layer is wrapped:
ids below the vocabulary size look up the (frozen, untouched) table, and ids from the vocabulary size upwards are
"slots" that read the embedding's vectors for that encoder. Training puts its trainable float32 vectors in the slots,
so the gradient reaches them and nothing else; generation puts every embedding the prompt names there. Training and
generation use this same path, so a name means the same thing in both.

A model has one text encoder (SD1, SD2) or several (SDXL), each kept by the key its vectors have in an embedding
file (models/families.py). They share CLIP's vocabulary, so a prompt is parsed and tokenized once; each encoder
reads the same ids (with its own start, end and padding tokens) and the hidden states are concatenated in the family's
order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from tistudio.errors import EmbeddingError
from tistudio.models.families import EncoderSlot
from tistudio.models.prompt import CHUNK, Chunk, NameMatcher, chunk_prompt, names_in


@dataclass(frozen=True)
class Conditioning:
    """What the UNet is conditioned on for a batch of prompts."""

    hidden: torch.Tensor  # [batch, 77 * chunks, width]: the cross-attention context
    pooled: torch.Tensor | None = None  # [batch, width]: a pooled text vector (SDXL's text_embeds), if any
    extra: Mapping[str, torch.Tensor] = field(default_factory=dict)  # further UNet inputs (SDXL's time_ids)

    def to(self, dtype: torch.dtype) -> Conditioning:
        return replace(
            self,
            hidden=self.hidden.to(dtype),
            pooled=None if self.pooled is None else self.pooled.to(dtype),
            extra={key: value.to(dtype) for key, value in self.extra.items()},
        )

    def with_sizes(self, time_ids: torch.Tensor | None) -> Conditioning:
        """With SDXL's size and crop conditioning: [batch, 6] (original h, w; crop top, left; target h, w)."""
        if time_ids is None:
            return self
        return replace(self, extra={**self.extra, "time_ids": time_ids.to(self.hidden.device, self.hidden.dtype)})

    def unet_inputs(self) -> dict[str, Any]:
        """Keyword arguments of a diffusers UNet2DConditionModel call."""
        inputs: dict[str, Any] = {"encoder_hidden_states": self.hidden}
        added = {**({} if self.pooled is None else {"text_embeds": self.pooled}), **self.extra}
        if added:
            inputs["added_cond_kwargs"] = added
        return inputs


@dataclass
class TextEncoder:
    """One text encoder of a loaded model and its tokenizer, in the slot its family gives it."""

    slot: EncoderSlot
    tokenizer: Any
    module: Any  # a transformers CLIPTextModel

    @property
    def key(self) -> str:
        return self.slot.key

    @property
    def table(self) -> torch.Tensor:
        """The token-embedding table, [vocabulary, width]."""
        return self.module.get_input_embeddings().weight

    @property
    def width(self) -> int:
        return int(self.table.shape[1])


class SplicedTokenEmbedding(nn.Embedding):
    """A token-embedding layer whose ids >= vocab_size read rows of ``extra`` instead of the frozen table.

    It holds the original table itself (the same Parameter, under the same name), so the text encoder's
    state_dict() is unchanged.
    """

    def __init__(self, base: nn.Embedding) -> None:
        nn.Module.__init__(self)
        self.num_embeddings = int(base.num_embeddings)
        self.embedding_dim = int(base.embedding_dim)
        self.padding_idx = base.padding_idx
        self.max_norm = None
        self.norm_type = 2.0
        self.scale_grad_by_freq = False
        self.sparse = False
        self.weight = base.weight
        # Kept outside the module's parameters, so that moving or casting the text encoder never touches the
        # trainable float32 vectors.
        self._extra: list[torch.Tensor | None] = [None]

    @property
    def vocab_size(self) -> int:
        return self.num_embeddings

    @property
    def extra(self) -> torch.Tensor | None:
        return self._extra[0]

    def set_extra(self, value: torch.Tensor | None) -> None:
        self._extra[0] = value

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = nn.functional.embedding(ids.clamp(max=self.num_embeddings - 1), self.weight)
        extra = self.extra
        if extra is None:
            return out
        extra = extra.to(device=out.device, dtype=out.dtype)
        # Slot rows by a one-hot matrix product rather than by indexing: selecting is exact either way, but the
        # backward of indexing adds the gradients of repeated ids in whatever order the threads finish (so the same
        # step gave different vectors in the last bits), and a matrix product's does not.
        slots = ids - self.num_embeddings
        one_hot = (slots.unsqueeze(-1) == torch.arange(extra.shape[0], device=ids.device)).to(out.dtype)
        return torch.where((ids >= self.num_embeddings).unsqueeze(-1), one_hot @ extra, out)


def splice(text_encoder: nn.Module) -> SplicedTokenEmbedding:
    """Install (once) and return the spliced embedding layer of a transformers CLIP text model."""
    layer = text_encoder.get_input_embeddings()
    if isinstance(layer, SplicedTokenEmbedding):
        return layer
    wrapped = SplicedTokenEmbedding(layer)
    text_encoder.set_input_embeddings(wrapped)
    return wrapped


def _final_layer_norm(text_encoder: nn.Module) -> nn.Module:
    norm = getattr(text_encoder, "final_layer_norm", None)
    if norm is None:
        norm = text_encoder.text_model.final_layer_norm
    return norm


class _Stream:
    """One text encoder as the prompt encoder drives it: its spliced layer and its special tokens."""

    def __init__(self, part: TextEncoder) -> None:
        self.part = part
        self.layer = splice(part.module)
        tokenizer = part.tokenizer
        self.bos = int(tokenizer.bos_token_id)
        self.eos = int(tokenizer.eos_token_id)
        self.pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos)

    def hidden(
        self, rows: list[list[int]], clip_skip: int, ends: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The hidden states this encoder conditions the UNet with (A1111's "Clip skip" = clip_skip), and, for the
        pooled slot, each row's pooled vector: the projection of the final hidden state at its end-of-text
        position `ends[i]`. (CLIP's own pooler takes the position of the highest token id, which is an embedding's
        slot rather than the end once one is in the prompt.)"""
        module = self.part.module
        slot = self.part.slot
        ids = torch.tensor(rows, dtype=torch.long, device=self.layer.weight.device)
        if not (slot.penultimate or slot.pooled or clip_skip > 1):
            return module(ids).last_hidden_state, None
        out = module(ids, output_hidden_states=True)
        if slot.penultimate:
            hidden = out.hidden_states[-(clip_skip + 1)]
        elif clip_skip > 1:
            hidden = _final_layer_norm(module)(out.hidden_states[-clip_skip])
        else:
            hidden = out.last_hidden_state
        pooled = None
        if slot.pooled:
            at_end = out.last_hidden_state[torch.arange(len(rows), device=ids.device), torch.tensor(ends)]
            projection = getattr(module, "text_projection", None)
            pooled = at_end if projection is None else projection(at_end)
        return hidden, pooled


class PromptEncoder:
    """Encodes prompts (A1111 syntax, any length, embedding names) to a :class:`Conditioning`."""

    def __init__(self, text: Mapping[str, TextEncoder], clip_skip: int = 1) -> None:
        if not text:
            raise ValueError("a prompt encoder needs at least one text encoder")
        self.streams = {key: _Stream(part) for key, part in text.items()}
        first = next(iter(self.streams.values()))
        if len({s.layer.vocab_size for s in self.streams.values()}) != 1:
            raise EmbeddingError(
                "the model's text encoders have different vocabularies; tistudio cannot splice an embedding into them"
            )
        self.tokenizer = first.part.tokenizer  # the encoders share CLIP's vocabulary: prompts are tokenized once
        self.vocab_size = first.layer.vocab_size
        self.clip_skip = clip_skip
        self.matcher: NameMatcher | None = None
        self.name_ids: dict[str, tuple[int, ...]] = {}
        self._token_cache: dict[str, list[int]] = {}

    @classmethod
    def for_model(cls, model: Any, clip_skip: int = 1) -> PromptEncoder:
        """The prompt encoder of a loaded model (anything with a ``text`` mapping of TextEncoders)."""
        return cls(model.text, clip_skip)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.streams)

    def tokenize(self, text: str) -> list[int]:
        ids = self._token_cache.get(text)
        if ids is None:
            ids = list(self.tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids)
            if len(self._token_cache) < 10_000:
                self._token_cache[text] = ids
        return ids

    def token_ids(self, name: str) -> tuple[int, ...]:
        return tuple(self.tokenize(name))

    def _by_key(self, name: str, vectors: torch.Tensor | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        if isinstance(vectors, torch.Tensor):
            if len(self.streams) != 1:
                raise EmbeddingError(
                    f"embedding {name!r}: this model has {len(self.streams)} text encoders "
                    f"({', '.join(self.streams)}); give its vectors for each"
                )
            return {self.keys[0]: vectors}
        if set(vectors) != set(self.streams):
            raise EmbeddingError(
                f"embedding {name!r} has vectors for {', '.join(vectors)}, but this model's text "
                f"encoders are {', '.join(self.streams)}"
            )
        return vectors

    def set_embeddings(self, vectors: Mapping[str, torch.Tensor | Mapping[str, torch.Tensor]]) -> None:
        """Use these embeddings: {name: {encoder key: [n, width]}} (a bare [n, width] tensor where the model has one
        text encoder). The tensors are used as they are, so trainable ones keep their autograd link."""
        names: dict[tuple[int, ...], tuple[int, int]] = {}
        parts: dict[str, list[torch.Tensor]] = {key: [] for key in self.streams}
        slot = self.vocab_size
        self.name_ids = {}
        for name, value in vectors.items():
            by_key = self._by_key(name, value)
            sequence = self.token_ids(name)
            if not sequence or sequence in names:
                continue
            count = int(next(iter(by_key.values())).shape[0])
            if any(int(tensor.shape[0]) != count for tensor in by_key.values()):
                raise EmbeddingError(f"embedding {name!r} has different vector counts for its text encoders")
            names[sequence] = (slot, count)
            self.name_ids[name] = sequence
            slot += count
            for key in self.streams:
                parts[key].append(by_key[key])
        self.matcher = NameMatcher(names) if names else None
        for key, stream in self.streams.items():
            tensors = parts[key]
            stream.layer.set_extra(None if not tensors else tensors[0] if len(tensors) == 1 else torch.cat(tensors))

    def names_in(self, text: str, candidates: Mapping[str, tuple[int, ...]]) -> list[str]:
        return names_in(text, self.tokenize, dict(candidates))

    def chunks(self, text: str) -> list[Chunk]:
        return chunk_prompt(text, self.tokenize, self.matcher)

    def encode(self, prompts: list[str]) -> Conditioning:
        """The conditioning of the prompts; prompts of fewer chunks are padded with empty chunks."""
        per_prompt = [self.chunks(p) for p in prompts]
        count = max(len(c) for c in per_prompt)
        chunks = [chunk for row in per_prompt for chunk in row + [Chunk()] * (count - len(row))]
        weights = [[1.0, *chunk.weights, 1.0] + [1.0] * (CHUNK - len(chunk.ids)) for chunk in chunks]
        weighted = any(w != 1.0 for row in weights for w in row)
        ends = [1 + len(chunk.ids) for chunk in chunks]
        states, pooled = [], None
        for stream in self.streams.values():
            rows = [[stream.bos, *chunk.ids, stream.eos] + [stream.pad] * (CHUNK - len(chunk.ids)) for chunk in chunks]
            hidden, pooled_rows = stream.hidden(rows, self.clip_skip, ends)
            if weighted:
                hidden = _emphasis(hidden, weights)
            states.append(hidden)
            if pooled_rows is not None:  # a prompt's pooled vector is its first chunk's (as A1111's)
                pooled = pooled_rows[::count]
        hidden = states[0] if len(states) == 1 else torch.cat(states, dim=-1)
        return Conditioning(hidden=hidden.reshape(len(prompts), count * (CHUNK + 2), hidden.shape[-1]), pooled=pooled)


def _emphasis(hidden: torch.Tensor, weights: list[list[float]]) -> torch.Tensor:
    """A1111's "Original" emphasis: scale token outputs by their weights, then restore the mean."""
    scale = torch.tensor(weights, dtype=hidden.dtype, device=hidden.device).unsqueeze(-1)
    before = hidden.mean(dim=(1, 2), keepdim=True)
    hidden = hidden * scale
    return hidden * (before / hidden.mean(dim=(1, 2), keepdim=True))
