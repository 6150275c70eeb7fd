"""Turning prompts into the text encoder's output, with embeddings spliced in.

The tokenizer and the vocabulary are never changed. Instead the text encoder's token-embedding layer is wrapped:
ids below the vocabulary size look up the (frozen, untouched) table, and ids from the vocabulary size upwards
are "slots" that read the embedding vectors. Training puts its trainable float32 vectors in the slots, so the
gradient reaches them and nothing else; generation puts every embedding the prompt names there. Training and
generation use this same path, so a name means the same thing in both.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .prompt import CHUNK, Chunk, NameMatcher, chunk_prompt, names_in


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


class PromptEncoder:
    """Encodes prompts (A1111 syntax, any length, embedding names) to [batch, 77 * chunks, width]."""

    def __init__(self, tokenizer, text_encoder: nn.Module, clip_skip: int = 1) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.layer = splice(text_encoder)
        self.clip_skip = clip_skip
        self.matcher: NameMatcher | None = None
        self.name_ids: dict[str, tuple[int, ...]] = {}
        self._token_cache: dict[str, list[int]] = {}
        self.bos = int(tokenizer.bos_token_id)
        self.eos = int(tokenizer.eos_token_id)
        self.pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos)

    def tokenize(self, text: str) -> list[int]:
        ids = self._token_cache.get(text)
        if ids is None:
            ids = list(self.tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids)
            if len(self._token_cache) < 10_000:
                self._token_cache[text] = ids
        return ids

    def token_ids(self, name: str) -> tuple[int, ...]:
        return tuple(self.tokenize(name))

    def set_embeddings(self, vectors: Mapping[str, torch.Tensor]) -> None:
        """Use these embeddings ({name: [n, width]}); a single tensor keeps its autograd link (training)."""
        names: dict[tuple[int, ...], tuple[int, int]] = {}
        parts = []
        slot = self.layer.vocab_size
        self.name_ids = {}
        for name, tensor in vectors.items():
            sequence = self.token_ids(name)
            if not sequence or sequence in names:
                continue
            names[sequence] = (slot, int(tensor.shape[0]))
            self.name_ids[name] = sequence
            slot += int(tensor.shape[0])
            parts.append(tensor)
        self.matcher = NameMatcher(names) if names else None
        self.layer.set_extra(None if not parts else parts[0] if len(parts) == 1 else torch.cat(parts))

    def names_in(self, text: str, candidates: Mapping[str, tuple[int, ...]]) -> list[str]:
        return names_in(text, self.tokenize, dict(candidates))

    def chunks(self, text: str) -> list[Chunk]:
        return chunk_prompt(text, self.tokenize, self.matcher)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Hidden states for the prompts; prompts of fewer chunks are padded with empty chunks."""
        per_prompt = [self.chunks(p) for p in prompts]
        count = max(len(c) for c in per_prompt)
        rows, weights = [], []
        for chunks in per_prompt:
            for chunk in chunks + [Chunk()] * (count - len(chunks)):
                ids = [self.bos, *chunk.ids, self.eos] + [self.pad] * (CHUNK - len(chunk.ids))
                rows.append(ids)
                weights.append([1.0, *chunk.weights, 1.0] + [1.0] * (CHUNK - len(chunk.ids)))
        device = self.layer.weight.device
        ids = torch.tensor(rows, dtype=torch.long, device=device)
        if self.clip_skip > 1:
            out = self.text_encoder(ids, output_hidden_states=True)
            hidden = _final_layer_norm(self.text_encoder)(out.hidden_states[-self.clip_skip])
        else:
            hidden = self.text_encoder(ids).last_hidden_state
        if any(w != 1.0 for row in weights for w in row):
            # A1111's "Original" emphasis: scale token outputs by their weights, then restore the mean.
            scale = torch.tensor(weights, dtype=hidden.dtype, device=hidden.device).unsqueeze(-1)
            before = hidden.mean(dim=(1, 2), keepdim=True)
            hidden = hidden * scale
            hidden = hidden * (before / hidden.mean(dim=(1, 2), keepdim=True))
        return hidden.reshape(len(prompts), count * (CHUNK + 2), hidden.shape[-1])
