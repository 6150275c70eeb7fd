"""Test oracles: AUTOMATIC1111's rules for the files and texts it reads, written for the tests from its documented
behaviour and its code's rules (modules/safe.py, modules/infotext_utils.py), never copied from it."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

import torch


class A1111Unpickler(pickle.Unpickler):
    """A1111's modules/safe.py rules as a strict oracle (written from its documented behaviour): only these globals,
    and storages only as persistent ids."""

    ALLOWED = frozenset({("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"),
               ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_device_tensor_from_numpy"),
               *(("torch", n) for n in ("FloatStorage", "HalfStorage", "IntStorage", "LongStorage", "DoubleStorage",
                                        "ByteStorage", "float32", "BFloat16Storage")),
               ("torch.nn.modules.container", "ParameterDict"), ("_codecs", "encode"), ("__builtin__", "set")})

    def persistent_load(self, saved_id):
        if saved_id[0] != "storage":
            raise pickle.UnpicklingError(f"persistent id {saved_id[0]!r}")
        return torch.storage.TypedStorage(_internal=True)  # an empty stand-in, as A1111's check uses

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global '{module}/{name}' is forbidden")
        return super().find_class(module, name)


def a1111_check_pt(path: Path) -> None:
    """A1111's check_pt: a zip may hold only data.pkl, version and data/N (v1.10 adds byteorder and
    .data/serialization_id; the stricter older rule is used here), its data.pkl must unpickle; a legacy file's
    five pickles must."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if not re.match(r"^([^/]+)/((data/\d+)|version|(data\.pkl))$", name):
                    raise AssertionError(f"bad file inside {path}: {name}")
            with archive.open(next(n for n in archive.namelist() if n.endswith("/data.pkl"))) as handle:
                A1111Unpickler(handle).load()
    except zipfile.BadZipFile:
        with open(path, "rb") as handle:
            unpickler = A1111Unpickler(handle)
            for _ in range(5):
                unpickler.load()


# A1111's settings-line field: `Key: value,` with an optional JSON-quoted value
PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_generation_parameters(text: str) -> dict[str, Any]:
    """What A1111's PNG Info reads from a `parameters` text: only the last line is settings, and only if it holds at
    least three fields; the lines before are the prompt, up to a line starting "Negative prompt:"."""
    *lines, last = text.strip().split("\n")
    if len(PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    result: dict[str, Any] = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in PARAM.findall(last):
        if len(value) > 1 and value[0] == '"' and value[-1] == '"':
            value = json.loads(value)
        result[key.strip()] = value
    return result


def a1111_embedding_from_data(data: Any, name: str) -> tuple[str, Any, int | None]:
    """A1111's create_embedding_from_data as an oracle: (name, vectors, step). One string_to_param term; an SDXL
    dict (clip_g and clip_l) whose every value becomes a tensor (so nothing else may be in it); else a single
    tensor ("diffuser concept")."""
    if "string_to_param" in data:
        params = data["string_to_param"]
        if len(params) != 1:
            raise AssertionError("embedding file has multiple terms in it")
        vectors = next(iter(params.values())).detach().to(torch.float32)
    elif isinstance(data, dict) and "clip_g" in data and "clip_l" in data:
        vectors = {key: value.detach().to(torch.float32) for key, value in data.items()}  # a str here raises
    elif isinstance(data, dict) and isinstance(next(iter(data.values())), torch.Tensor):
        if len(data) != 1:
            raise AssertionError("embedding file has multiple terms in it")
        vectors = next(iter(data.values())).detach().to(torch.float32)
    else:
        raise AssertionError(f"Couldn't identify {name} as neither textual inversion embedding nor diffuser concept")
    return name, vectors, data.get("step", None)


def a1111_load_png_embedding(path: Path) -> tuple[str, Any, int | None]:
    """How A1111 loads an embedding from a PNG in its embeddings folder: the `sd-ti-embedding` text (base64 JSON,
    tensors as {"TORCHTENSOR": lists} made into numpy arrays), named by its data's name, else the file stem."""
    import base64

    import numpy as np
    from PIL import Image

    def decode(obj: dict[str, Any]) -> Any:
        if "TORCHTENSOR" in obj:
            return torch.from_numpy(np.array(obj["TORCHTENSOR"]))
        return obj

    if path.name.endswith(".preview.png"):
        raise AssertionError("A1111 skips *.preview.png")
    with Image.open(path) as image:
        text = image.text["sd-ti-embedding"]  # A1111 reads the text chunk first
    data = json.loads(base64.b64decode(text), object_hook=decode)
    return a1111_embedding_from_data(data, data.get("name", path.stem))


def comfyui_load_embed(folder: Path, name: str, size: int, key: str | None) -> Any:
    """ComfyUI's load_embed (comfy/sd1_clip.py) as an oracle, for the word `embedding:NAME`: the file NAME, else
    NAME.safetensors, .pt or .bin; safetensors' load_file, else torch.load with weights_only=True; then the first
    string_to_param term, the tokenizer's key (clip_l for CLIP-L, clip_g for CLIP-G) if the file has it, else the
    file's first tensor. The tokenizer then uses it only if its last dimension is the encoder's width."""
    path = folder / name
    if not path.is_file():
        path = next((folder / f"{name}{ext}" for ext in (".safetensors", ".pt", ".bin")
                     if (folder / f"{name}{ext}").is_file()), None)
    if path is None:
        raise AssertionError(f"embedding:{name} does not exist, ignoring")
    if path.name.lower().endswith(".safetensors"):
        from safetensors.torch import load_file

        embed = load_file(str(path), device="cpu")
    else:
        embed = torch.load(path, weights_only=True, map_location="cpu")
    if "string_to_param" in embed:
        out = next(iter(embed["string_to_param"].values()))
    elif key is not None and key in embed:
        out = embed[key]
    else:
        out = next(iter(embed.values()))
    if out.shape[-1] != size:
        raise AssertionError(f"embedding:{name} is {out.shape[-1]} wide; this encoder takes {size}")
    return out
