"""LoRA files, with the embeddings a LoRA is called by bundled inside: what pivotal tuning writes and generation reads.

Written (``.safetensors``, A1111's Lora folder):
  * the LoRA in kohya's layout - for each changed layer ``NAME.lora_down.weight``, ``NAME.lora_up.weight`` and
    ``NAME.alpha`` (models/lora.py names the layers) - which A1111's built-in Lora extension, ComfyUI's LoraLoader and
    diffusers' ``load_lora_weights`` read;
  * the word's vectors under A1111's bundle keys: ``bundle_emb.WORD.string_to_param.*`` (SD1, SD2) or
    ``bundle_emb.WORD.clip_l`` and ``.clip_g`` (SDXL). A1111 registers them as the embedding WORD when the prompt
    says ``<lora:FILE:weight>`` (networks.py: an embedding of that name in the embeddings folder wins);
  * kohya's metadata (ss_network_module, ss_network_dim, ss_network_alpha) and tistudio's (step, word).

Read (by content): safetensors, and ``.pt``/``.ckpt`` through the restricted unpickler. A file is a LoRA when it holds
``.lora_down.weight`` tensors; its bundled words are read like embedding files.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tistudio import safeload
from tistudio.embeddings.files import Embedding, a1111_data, files_by_stem, from_data
from tistudio.errors import EmbeddingError, UnsafeFileError
from tistudio.storage import write_safetensors

log = logging.getLogger(__name__)

BUNDLE = "bundle_emb"
DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
SUFFIXES = (".safetensors", ".pt", ".ckpt")  # what A1111 lists in its Lora folder
MAX_FILE_BYTES = 4 * 1024**3  # the largest SDXL LoRAs (rank 256 with text encoders) are under 2 GB
MAX_TENSORS = 20_000
MAX_ELEMENTS = MAX_FILE_BYTES // 2


@dataclass(frozen=True)
class LoraFile:
    """A LoRA: its layers' tensors by kohya key, the words bundled with it, its metadata."""

    name: str  # the file stem: <lora:NAME:weight>
    tensors: dict[str, torch.Tensor]  # NAME.lora_down.weight, NAME.lora_up.weight, NAME.alpha
    words: dict[str, Embedding] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)
    path: Path | None = None

    def layers(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """(down, up, alpha) by layer name; alpha defaults to the rank, as kohya's loaders take it."""
        found = {}
        for key, down in self.tensors.items():
            if key.endswith(DOWN):
                name = key[: -len(DOWN)]
                up = self.tensors.get(name + UP)
                if up is None:
                    continue
                alpha = self.tensors.get(name + ALPHA)
                found[name] = (down, up, float(alpha) if alpha is not None else float(down.shape[0]))
        return found

    @property
    def rank(self) -> int:
        ranks = {int(down.shape[0]) for down, _, _ in self.layers().values()}
        return max(ranks) if ranks else 0


def bundle_keys(embedding: Embedding) -> dict[str, torch.Tensor]:
    """The embedding as A1111 reads a bundled one: bundle_emb.WORD.string_to_param.* or .clip_l/.clip_g."""
    data = a1111_data(embedding)
    tensors: dict[str, torch.Tensor] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            tensors.update(
                {
                    f"{BUNDLE}.{embedding.name}.{key}.{sub}": tensor
                    for sub, tensor in value.items()
                    if isinstance(tensor, torch.Tensor)  # string_to_param's vectors, not string_to_token's id
                }
            )
        elif isinstance(value, torch.Tensor):
            tensors[f"{BUNDLE}.{embedding.name}.{key}"] = value
    return {key: tensor.detach().to("cpu", torch.float32).contiguous() for key, tensor in tensors.items()}


def lora_metadata(rank: int, alpha: float, meta: dict[str, str] | None = None) -> dict[str, str]:
    """kohya's metadata, which its tools and A1111's Lora tab read, with tistudio's own."""
    from tistudio import __version__

    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": f"{alpha:g}",
        "tistudio_version": __version__,
        **(meta or {}),
    }


def write_lora(path: Path, tensors: dict[str, torch.Tensor], words: list[Embedding], meta: dict[str, str]) -> Path:
    """Write a LoRA (kohya keys) with the words bundled in, atomically."""
    everything = {key: tensor.detach().to("cpu").contiguous() for key, tensor in tensors.items()}
    for word in words:
        everything.update(bundle_keys(word))
    for key, tensor in everything.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise EmbeddingError(f"refusing to write {path.name}: {key} holds NaN or infinite values")
    return write_safetensors(path, everything, meta)


def _load(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    safeload.check_size(path, MAX_FILE_BYTES, "a LoRA file")
    kind = safeload.sniff(path)
    if kind == safeload.SAFETENSORS:
        return safeload.load_safetensors(path, MAX_FILE_BYTES, MAX_TENSORS, MAX_ELEMENTS)
    if kind in (safeload.TORCH_ZIP, safeload.TORCH_LEGACY):
        data = safeload.load_torch_pickle(path, MAX_FILE_BYTES)
        if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
            data = data["state_dict"]
        if not isinstance(data, dict):
            raise EmbeddingError(f"{path}: holds a {type(data).__name__}; a LoRA file holds tensors by name")
        return {str(k): v for k, v in data.items() if isinstance(v, torch.Tensor)}, {}
    raise EmbeddingError(f"{path}: not a LoRA file: its content is neither safetensors nor a PyTorch file")


def _bundled(path: Path, tensors: dict[str, Any]) -> dict[str, Embedding]:
    """The words bundled in a LoRA file, read as A1111 reads them (networks.py's bundle_emb keys)."""
    parts: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        if not key.startswith(BUNDLE + "."):
            continue
        word, _, rest = key[len(BUNDLE) + 1 :].partition(".")
        head, _, sub = rest.partition(".")
        if head == "string_to_param":
            parts.setdefault(word, {})["string_to_param"] = {sub or "*": tensor}
        elif rest:
            parts.setdefault(word, {})[rest] = tensor
    words = {}
    for word, data in parts.items():
        embedding = from_data(Path(f"{path}/{word}"), data, {}, "bundled in a LoRA")
        words[word] = Embedding(
            name=word, vectors=embedding.vectors, step=embedding.step, meta={}, source_format=embedding.source_format
        )
    return words


def read_lora(path: str | Path) -> LoraFile:
    """A LoRA file of any layout tistudio reads, with its bundled words."""
    path = Path(path)
    if not path.is_file():
        raise EmbeddingError(f"{path}: no such LoRA file")
    try:
        tensors, meta = _load(path)
    except UnsafeFileError as exc:
        raise EmbeddingError(str(exc)) from None
    layers = {k: v for k, v in tensors.items() if not k.startswith(BUNDLE + ".")}
    lora = LoraFile(path.stem, layers, _bundled(path, tensors), meta, path)
    if not lora.layers():
        raise EmbeddingError(
            f"{path}: not a LoRA: it holds no '...lora_down.weight' / '...lora_up.weight' pairs (kohya's layout)"
        )
    return lora


def is_lora(path: Path) -> bool:
    """Whether a safetensors file holds LoRA layers (read from its header alone)."""
    try:
        if safeload.sniff(path) != safeload.SAFETENSORS:
            return False
        header, _ = safeload.safetensors_header(path, MAX_TENSORS, MAX_ELEMENTS)
    except (OSError, UnsafeFileError):
        return False
    return any(key.endswith(DOWN) for key in header)


def list_lora_files(folder: str | Path) -> dict[str, Path]:
    """LoRA files in a folder and its sub-folders by file stem (A1111's <lora:NAME>); hidden and empty files, and
    files of other extensions, are skipped."""
    return files_by_stem(folder, SUFFIXES)


def lora_hash(path: Path) -> str:
    """A1111's short hash of a LoRA file (the "Lora hashes" infotext): sha256 of a safetensors file's bytes after
    its header (kohya's addnet hash) or of a whole other file, first 12 hex digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if safeload.sniff(path) == safeload.SAFETENSORS:
            length = int.from_bytes(handle.read(8), "little")
            handle.seek(8 + length)
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def plain_lora_path(folder: Path, name: str) -> Path:
    """Where a LoRA without its bundled words is written for the tools that read words apart (NAME.lora.safetensors,
    so that it does not clash with the word's NAME.safetensors)."""
    return folder / f"{name}.lora.safetensors"


def split_bundle(lora: LoraFile, folder: Path) -> Path:
    """The LoRA alone, without bundled words - what diffusers' load_lora_weights takes (it refuses a file with any key
    that does not say 'lora') and ComfyUI's LoraLoader reads without a warning for each word."""
    return write_safetensors(
        plain_lora_path(folder, lora.name),
        {key: tensor.detach().to("cpu").contiguous() for key, tensor in lora.tensors.items()},
        lora.meta,
    )


def copy_renamed(source: Path, target: Path, name: str, meta: dict[str, str] | None = None) -> Path:
    """A LoRA file written again at `target` with its bundled word named `name` (a run folder's step copy made the
    LoRA users call, or the other way round); `meta` changes its metadata (None values remove keys)."""
    from dataclasses import replace

    lora = read_lora(source)
    words = [replace(word, name=name) for word in lora.words.values()]
    info = {**lora.meta, "name": name, "word": name, "ss_output_name": name, "modelspec.title": name}
    for key, value in (meta or {}).items():
        if value is None:
            info.pop(key, None)
        else:
            info[key] = value
    return write_lora(target, lora.tensors, words, info)


def describe_lora(lora: LoraFile) -> dict[str, Any]:
    """What `inspect` says of a LoRA file: its layers, rank and alpha, what it changes, its bundled words."""
    layers = lora.layers()
    alphas = sorted({alpha for _, _, alpha in layers.values()})
    parts = sorted({name.split("_")[1] for name in layers})  # unet, te, te1, te2
    info: dict[str, Any] = {
        "name": lora.name,
        "format": "LoRA (kohya layout)" + (" with bundled words" if lora.words else ""),
        "layers": len(layers),
        "rank": lora.rank,
        "alpha": ", ".join(f"{alpha:g}" for alpha in alphas),
        "changes": ", ".join({"unet": "UNet", "te": "text encoder"}.get(p, f"text encoder {p[2:]}") for p in parts),
        "words": ", ".join(
            f"{word} ({embedding.count} vectors, {', '.join(embedding.vectors)})"
            for word, embedding in lora.words.items()
        )
        or "none",
    }
    for key in ("step", "lora_targets", "best_step", "last_step", "sd_checkpoint_name", "tistudio_version"):
        if key in lora.meta:
            info[key] = lora.meta[key]
    if lora.path is not None:
        info["hash"] = lora_hash(lora.path)
    return info
