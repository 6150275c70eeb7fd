"""LoRAs in generation, as A1111 uses them: ``<lora:NAME:weight>`` in a prompt, the LoRA folder, bundled words.

* A prompt's extra-network tags (A1111's ``<kind:args>``) are taken out of the text the text encoder reads; each
  ``<lora:NAME[:te_weight[:unet_weight]]>`` calls NAME from the LoRA folder (weight 1 where not given; the UNet's
  weight is the text encoders' where not given). ``--lora NAME:WEIGHT`` says the same outside the prompt.
* A LoRA file's bundled words (A1111's ``bundle_emb``) become embeddings while it is called - unless the embeddings
  folder has an embedding of that name, which wins, as in A1111.
* An embedding trained with a LoRA (pivotal tuning) names it in its metadata (``lora``); where its word is in the
  prompt and the prompt does not call that LoRA, it is called at weight 1, and the picture's infotext prompt shows
  the call so that A1111 draws the same picture from it.
* The LoRAs are merged into the weights while drawing and taken out after (models/lora.py); the infotext says
  ``Lora hashes`` as A1111 writes it.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tistudio.embeddings.bundle import LoraFile, lora_hash, read_lora
from tistudio.embeddings.files import Embedding
from tistudio.errors import EmbeddingError, OptionError
from tistudio.models.lora import UNET, LoraLayer, layer_of, model_layers

log = logging.getLogger(__name__)

TAG = re.compile(r"<(\w+):([^>]+)>")  # A1111's extra-network syntax (extra_networks.re_extra_net)
MAX_WEIGHT = 100.0


@dataclass(frozen=True)
class LoraCall:
    """One LoRA a prompt calls, and how strongly."""

    name: str
    te_weight: float = 1.0
    unet_weight: float = 1.0
    auto: bool = False  # called because an embedding in the prompt names it

    @property
    def tag(self) -> str:
        weights = (
            f"{self.te_weight:g}" if self.te_weight == self.unet_weight else f"{self.te_weight:g}:{self.unet_weight:g}"
        )
        return f"<lora:{self.name}:{weights}>"


def _weight(text: str, tag: str, field_name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or abs(value) > MAX_WEIGHT:
        raise OptionError(
            field_name, tag, f"a LoRA's weight is a number from -{MAX_WEIGHT:g} to {MAX_WEIGHT:g}: <lora:NAME:0.8>"
        )
    return value


def lora_call(args: str, tag: str, field_name: str = "prompt") -> LoraCall:
    """A1111's <lora:...> arguments: NAME, then the text encoders' weight and the UNet's (positional or te=, unet=)."""
    items = [item.strip() for item in args.split(":")]
    name, rest = items[0], items[1:]
    if not name:
        raise OptionError(field_name, tag, "name the LoRA: <lora:NAME:1>")
    named = {key.strip(): value for key, _, value in (item.partition("=") for item in rest if "=" in item)}
    positional = [item for item in rest if "=" not in item]
    te = _weight(named.get("te", positional[0] if positional else "1"), tag, field_name)
    unet = _weight(named.get("unet", positional[1] if len(positional) > 1 else str(te)), tag, field_name)
    return LoraCall(name, te, unet)


def take_networks(prompt: str, field_name: str = "prompt") -> tuple[str, list[LoraCall]]:
    """The prompt as the text encoder reads it (every <kind:...> tag taken out, as A1111 does) and its LoRA calls."""
    calls: list[LoraCall] = []

    def found(match: re.Match[str]) -> str:
        if match.group(1) == "lora":
            calls.append(lora_call(match.group(2), match.group(0), field_name))
        else:
            log.warning("ignored %s: tistudio uses LoRAs (<lora:...>), not %s networks", match.group(0), match.group(1))
        return ""

    return TAG.sub(found, prompt), calls


def option_calls(text: str) -> list[LoraCall]:
    """--lora: 'NAME' or 'NAME:WEIGHT', comma-separated."""
    return [lora_call(item.strip(), item.strip(), "lora") for item in text.split(",") if item.strip()]


@dataclass
class LoadedLora:
    """A called LoRA read from its file."""

    call: LoraCall
    file: LoraFile
    path: Path

    @property
    def hash(self) -> str:
        return lora_hash(self.path)


def load_called(calls: list[LoraCall], folder: Path, files: dict[str, Path]) -> list[LoadedLora]:
    """The called LoRAs' files from the LoRA folder, listed in `files` (list_lora_files); the last call of a name
    wins, as in A1111."""
    by_name = {call.name: call for call in calls}
    loaded = []
    for name, call in by_name.items():
        path = files.get(name)
        if path is None:
            known = ", ".join(sorted(files)[:20]) or "none"
            raise OptionError(
                "lora" if call.auto else "prompt",
                f"<lora:{name}>",
                f"no LoRA file {name}.safetensors in the LoRA folder {folder.name} (there: {known}); put it there "
                "or fix the name",
            )
        loaded.append(LoadedLora(call, read_lora(path), path))
    return loaded


def bundled_words(loaded: list[LoadedLora], folder_words: set[str]) -> dict[str, Embedding]:
    """The words the called LoRAs bring, except those the embeddings folder has (which win, as in A1111)."""
    words: dict[str, Embedding] = {}
    for lora in loaded:
        for word, embedding in lora.file.words.items():
            if word in folder_words:
                log.info(
                    "%s: its bundled word %s is not used: the embeddings folder has %s", lora.path.name, word, word
                )
            else:
                words.setdefault(word, embedding)
    return words


def auto_calls(
    used: dict[str, tuple[Embedding, Path | None]], calls: list[LoraCall], folder: Path, files: dict[str, Path]
) -> list[LoraCall]:
    """Calls of the LoRAs the prompt's embeddings were trained with, where the prompt does not call them itself
    (`files`: the LoRA folder's, list_lora_files)."""
    called = {call.name for call in calls}
    found = []
    for word, (embedding, _) in used.items():
        name = embedding.meta.get("lora", "")
        if not name or name in called:
            continue
        if name not in files:
            log.warning(
                "%s was trained with a LoRA (%s), which is not in %s: the word is used alone and draws less of its "
                "subject; copy the LoRA there",
                word,
                f"{name}.safetensors",
                folder,
            )
            continue
        found.append(LoraCall(name, auto=True))
        called.add(name)
    return found


def model_networks(model: Any, loaded: list[LoadedLora]) -> list[tuple[dict[str, LoraLayer], float]]:
    """Each LoRA's layers by the model layer they change, with their weights (the UNet's or the text encoders'),
    checked against the model: a file that changes none of its layers, or whose layers do not fit, is refused."""
    layers = model_layers(model)
    networks: list[tuple[dict[str, LoraLayer], float]] = []
    for lora in loaded:
        unet: dict[str, LoraLayer] = {}
        text: dict[str, LoraLayer] = {}
        unmatched = 0
        for name, (down, up, alpha) in lora.file.layers().items():
            target = layer_of(name, layers)
            if target is None:
                unmatched += 1
                continue
            weight_shape = layers[target].weight.shape
            if up.shape[0] != weight_shape[0] or down.shape[1] != weight_shape[1]:
                raise EmbeddingError(
                    f"{lora.path.name}: its layer {name} is {up.shape[0]}x{down.shape[1]} but the model's is "
                    f"{weight_shape[0]}x{weight_shape[1]}: a LoRA for another model; use it with the model it was "
                    "trained on"
                )
            (unet if target.startswith(UNET) else text)[target] = LoraLayer(down, up, alpha)
        if not unet and not text:
            raise EmbeddingError(
                f"{lora.path.name}: none of its {unmatched} layers is a layer of {model.name}: a LoRA for another "
                "kind of model"
            )
        if unmatched:
            log.warning("%s: %d of its layers are not in %s and were left out", lora.path.name, unmatched, model.name)
        networks += [(unet, lora.call.unet_weight), (text, lora.call.te_weight)]
    return networks


def lora_hashes(loaded: list[LoadedLora]) -> str:
    """A1111's "Lora hashes" infotext value: 'NAME: 12hex, ...' (':' and ',' taken out of names, as A1111 does)."""
    return ", ".join(
        f"{lora.call.name.replace(':', '').replace(',', '')}: {lora.hash}" for lora in loaded if lora.call.name
    )
