"""Creating a new embedding (A1111's "Create embedding").

The vectors start from the initialization text's token embeddings the way A1111 does it: with T tokens and
n vectors, vector i is token ``i * T // n`` (evenly spaced tokens, repeated when there are fewer tokens than
vectors); an empty text gives zero vectors. The name must be one word that is neither an existing embedding
(unless ``overwrite``) nor a single token the model already knows (``woman``, ``cat``): such a name would
mean both the word and the embedding.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .config import CreateOptions, validate_create
from .embedding import SUFFIXES, Embedding, list_embedding_files, write_embedding
from .errors import OptionError
from .models import SDModel, load_model

log = logging.getLogger(__name__)


def init_vectors(model: SDModel, text: str, count: int) -> torch.Tensor:
    """A1111's initialization: evenly spaced token embeddings of `text`, as float32 [count, width]."""
    table = model.text_encoder.get_input_embeddings().weight
    ids = list(model.tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids)
    if not ids:
        return torch.zeros((count, table.shape[1]), dtype=torch.float32)
    rows = [ids[i * len(ids) // count] for i in range(count)]
    return table[torch.tensor(rows, device=table.device)].detach().to("cpu", torch.float32).clone()


def check_new_name(name: str, model: SDModel, folder: Path, overwrite: bool) -> None:
    ids = model.tokenizer(name, add_special_tokens=False, verbose=False).input_ids
    if len(ids) == 1:
        word = model.tokenizer.convert_ids_to_tokens(ids)[0].replace("</w>", "")
        raise OptionError("name", name, f"'{word}' is already a word the model knows (token {ids[0]}), so prompts "
                          "could not tell it from the embedding; pick a made-up word such as 'tomtut' or 'sks1'")
    if overwrite:
        return
    lowered = {stem.lower(): path for stem, path in list_embedding_files(folder).items()}
    if name.lower() in lowered:
        raise OptionError("name", name, f"an embedding with this name exists ({lowered[name.lower()]}); pick "
                          "another name or pass --overwrite")


def create_embedding(options: CreateOptions, *, cache_dir: Path, model: SDModel | None = None) -> Path:
    """Write a new, untrained (step 0) embedding to embeddings_dir/NAME.safetensors."""
    validate_create(options)
    folder = Path(options.embeddings_dir)
    if model is None:
        model = load_model(options, cache_dir, text_only=True)
    check_new_name(options.name, model, folder, options.overwrite)
    vectors = init_vectors(model, options.init_text, options.vectors)
    embedding = Embedding(name=options.name, vectors={"clip": vectors}, step=0, model_hash=model.hash,
                          model_name=model.name, meta={"init_text": options.init_text, "model_family": model.family})
    path = write_embedding(embedding, folder / f"{options.name}.safetensors")
    if options.overwrite:
        for suffix in SUFFIXES:
            other = folder / f"{options.name}{suffix}"
            if other != path and other.is_file():
                log.warning("%s also exists; it has the same name, so A1111 may load either", other)
    log.info("created %s: %d vectors of width %d from %r", path, options.vectors, vectors.shape[1],
             options.init_text)
    return path
