"""Creating a new embedding (A1111's "Create embedding").

With an initialization text, the vectors start from its token embeddings the way A1111 does it: with T tokens
and n vectors, vector i is token ``i * T // n`` (evenly spaced tokens, repeated when there are fewer tokens than
vectors). Without one (the default) they start person-like: the mean embedding of common first names.

The name must be one word that is neither an existing embedding (unless ``overwrite``) nor a single token the
model already knows (``woman``, ``cat``): such a name would mean both the word and the embedding.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from tistudio.config import CreateOptions, validate_create
from tistudio.embeddings.files import SUFFIXES, Embedding, taken_name, write_embedding
from tistudio.errors import OptionError
from tistudio.models.conditioning import TextEncoder
from tistudio.models.loading import SDModel, load_model

log = logging.getLogger(__name__)


# Common first names, each a single CLIP token: their mean is "a person" to the text encoder (Cross
# Initialization, Pang et al. 2024, uses the same idea to learn faces in a few hundred steps instead of thousands).
PERSON_NAMES = (
    "james",
    "mary",
    "john",
    "linda",
    "robert",
    "susan",
    "michael",
    "karen",
    "david",
    "lisa",
    "william",
    "nancy",
    "richard",
    "betty",
    "thomas",
    "sandra",
    "charles",
    "ashley",
    "daniel",
    "emily",
    "matthew",
    "anna",
    "anthony",
    "laura",
    "mark",
    "sarah",
    "paul",
    "julia",
    "steven",
    "emma",
    "andrew",
    "olivia",
    "peter",
    "sophia",
    "george",
    "grace",
    "kevin",
    "alice",
    "brian",
    "helen",
    "jason",
    "kate",
    "eric",
    "maria",
    "adam",
    "jessica",
    "ryan",
    "rachel",
)


def person_vectors(model: SDModel, count: int) -> dict[str, torch.Tensor]:
    """A person-like start, for each text encoder: vector i is the mean token embedding of the i-th group of
    common first names."""
    return {key: _person_rows(part, count) for key, part in model.text.items()}


def _person_rows(part: TextEncoder, count: int) -> torch.Tensor:
    table = part.table
    ids = []
    for name in PERSON_NAMES:
        tokens = part.tokenizer(name, add_special_tokens=False, verbose=False).input_ids
        if len(tokens) == 1:
            ids.append(tokens[0])
    rows = table[torch.tensor(ids, device=table.device)].detach().to("cpu", torch.float32)
    groups = [rows[i::count] for i in range(count)] if len(ids) >= count else [rows] * count
    return torch.stack([group.mean(dim=0) for group in groups])


def person_start(text: str) -> bool:
    """No init text, or 'auto', asks for the person-like start."""
    return not text.strip() or text.strip().lower() == "auto"


def init_vectors(model: SDModel, text: str, count: int) -> dict[str, torch.Tensor]:
    """A1111's initialization, for each text encoder: evenly spaced token embeddings of `text`, as float32
    [count, width]; no text (or 'auto') gives the person-like start."""
    if person_start(text):
        return person_vectors(model, count)
    return {key: _text_rows(part, text, count) for key, part in model.text.items()}


def _text_rows(part: TextEncoder, text: str, count: int) -> torch.Tensor:
    table = part.table
    ids = list(part.tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids)
    if not ids:
        return torch.zeros((count, table.shape[1]), dtype=torch.float32)
    rows = [ids[i * len(ids) // count] for i in range(count)]
    return table[torch.tensor(rows, device=table.device)].detach().to("cpu", torch.float32).clone()


def check_new_name(name: str, model: SDModel, folder: Path, overwrite: bool) -> None:
    ids = model.tokenizer(name, add_special_tokens=False, verbose=False).input_ids
    if len(ids) == 1:
        word = model.tokenizer.convert_ids_to_tokens(ids)[0].replace("</w>", "")
        raise OptionError(
            "name",
            name,
            f"'{word}' is already a word the model knows (token {ids[0]}), so prompts "
            "could not tell it from the embedding; pick a made-up word such as 'tomtut' or 'sks1'",
        )
    if overwrite:
        return
    existing = taken_name(folder, name)
    if existing is not None:
        raise OptionError(
            "name", name, f"an embedding with this name exists ({existing}); pick another name or pass --overwrite"
        )


def create_embedding(options: CreateOptions, *, cache_dir: Path, model: SDModel | None = None) -> Path:
    """Write a new, untrained (step 0) embedding to embeddings_dir/NAME.safetensors."""
    validate_create(options)
    folder = Path(options.embeddings_dir)
    if model is None:
        model = load_model(options, cache_dir, text_only=True)
    check_new_name(options.name, model, folder, options.overwrite)
    vectors = init_vectors(model, options.init_text, options.vectors)
    person = person_start(options.init_text)
    start = "(person-like: the mean of first names)" if person else options.init_text
    embedding = Embedding(
        name=options.name,
        vectors=vectors,
        step=0,
        model_hash=model.hash,
        model_name=model.name,
        meta={"init_text": start, "model_family": model.family},
    )
    path = write_embedding(embedding, folder / f"{options.name}.safetensors")
    if options.overwrite:
        for suffix in SUFFIXES:
            other = folder / f"{options.name}{suffix}"
            if other != path and other.is_file():
                log.warning("%s also exists; it has the same name, so A1111 may load either", other)
    log.info(
        "created %s: %d vectors of width %d from %s",
        path,
        options.vectors,
        embedding.width,
        "the person-like start" if person else repr(options.init_text),
    )
    return path
