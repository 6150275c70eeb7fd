"""Test oracles: the rules by which other tools read embedding files and texts, written for the tests from their
documented behaviour and their code's rules, never copied from them: AUTOMATIC1111 (modules/safe.py,
modules/infotext_utils.py, modules/textual_inversion), ComfyUI (comfy/sd1_clip.py), kohya's sd-scripts
(gen_img.py, sdxl_gen_img.py, train_textual_inversion.py) and OneTrainer (EmbeddingLoaderMixin, the SD and SDXL
model setups)."""

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

    ALLOWED = frozenset(
        {
            ("collections", "OrderedDict"),
            ("torch._utils", "_rebuild_tensor_v2"),
            ("torch._utils", "_rebuild_parameter"),
            ("torch._utils", "_rebuild_device_tensor_from_numpy"),
            *(
                ("torch", n)
                for n in (
                    "FloatStorage",
                    "HalfStorage",
                    "IntStorage",
                    "LongStorage",
                    "DoubleStorage",
                    "ByteStorage",
                    "float32",
                    "BFloat16Storage",
                )
            ),
            ("torch.nn.modules.container", "ParameterDict"),
            ("_codecs", "encode"),
            ("__builtin__", "set"),
        }
    )

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
            in_negative, line = True, line[len("Negative prompt:") :].strip()
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
        text = image.text.get("sd-ti-embedding")  # A1111 reads the text chunk first
        if text is not None:
            data = json.loads(base64.b64decode(text), object_hook=decode)
        else:
            data = json.loads(a1111_extract_image_data(image), object_hook=decode)
    return a1111_embedding_from_data(data, data.get("name", path.stem))


def a1111_lcg_nibbles(count: int) -> Any:
    """A1111's xor_block noise: its LCG (a=1664525, c=1013904223, m=2**32, seed 0), each value mod 255, & 0x0F."""
    import numpy as np

    values, seed = [], 0
    for _ in range(count):
        seed = (1664525 * seed + 1013904223) % 2**32
        values.append((seed % 255) & 0x0F)
    return np.array(values, dtype=np.uint8)


def a1111_extract_image_data(image: Any) -> bytes:
    """A1111's extract_image_data_embed: crop rows and columns at the borders with no pixel whose every channel is
    above 0, keep the low nibbles, find the columns whose low nibbles are all 0; the block left of the first is the
    low nibbles, right of the last the high ones, each XORed with the LCG noise; zlib-decompress the bytes."""
    import zlib

    import numpy as np

    pixels = np.array(image.convert("RGB"), dtype=np.uint8)
    lit = (pixels > 0).all(axis=2)
    any_col, any_row = lit.any(axis=0), lit.any(axis=1)
    cols = (int(any_col.argmax()), lit.shape[1] - int(any_col[::-1].argmax()))
    rows = (int(any_row.argmax()), lit.shape[0] - int(any_row[::-1].argmax()))
    low = pixels[rows[0] : rows[1], cols[0] : cols[1]] & 0x0F
    black = np.where(low.sum(axis=(0, 2)) == 0)[0]
    if black.shape[0] < 2:
        raise AssertionError("not an embedding, just a preview image")
    lower = low[:, : black.min()].astype(np.uint8)
    upper = low[:, black.max() + 1 :].astype(np.uint8)
    lower = lower ^ a1111_lcg_nibbles(lower.size).reshape(lower.shape)
    upper = upper ^ a1111_lcg_nibbles(upper.size).reshape(upper.shape)
    return zlib.decompress(((upper << 4) | lower).flatten().tobytes())


def kohya_gen_img_embeddings(path: Path, tokenizers: list[Any], widths: list[int]) -> list[Any]:
    """kohya's gen_img.py / sdxl_gen_img.py --textual_inversion_embeddings: load_file for a .safetensors
    extension, else torch.load (weights_only, as torch >= 2.6 loads by default); string_to_param's dict if there;
    clip_l and clip_g for SDXL (two tokenizers), else the first tensor. The word is the file's stem; its vectors
    become tokens WORD, WORD1, WORD2, ... that each tokenizer must add new, in order at its end; each vector is then
    written into the resized token table. Returns each encoder's rows for those tokens."""
    import os

    if os.path.splitext(str(path))[1].lower() == ".safetensors":
        from safetensors.torch import load_file

        data = load_file(str(path))
    else:
        data = torch.load(path, map_location="cpu", weights_only=True)
    if "string_to_param" in data:
        data = data["string_to_param"]
    embeds = [data["clip_l"], data["clip_g"]] if len(tokenizers) == 2 else [next(iter(data.values()))]
    count = embeds[0].size()[0]
    word = os.path.splitext(os.path.basename(str(path)))[0]
    strings = [word] + [f"{word}{i + 1}" for i in range(count - 1)]
    rows = []
    for tokenizer, embed, width in zip(tokenizers, embeds, widths, strict=True):
        if tokenizer.add_tokens(strings) != count:
            raise AssertionError(f"tokenizer has same word to token string (filename): {path}")
        ids = tokenizer.convert_tokens_to_ids(strings)
        if ids != list(range(ids[0], ids[0] + count)) or ids[-1] != len(tokenizer) - 1:
            raise AssertionError("token ids are not ordered at the end of the tokenizer")
        table = torch.zeros(len(tokenizer), width)
        for token_id, vector in zip(ids, embed, strict=False):
            table[token_id] = vector  # a vector of another width raises here
        rows.append(table[ids[0] : ids[-1] + 1])
    return rows


def kohya_load_weights(path: Path, sdxl: bool) -> list[Any]:
    """kohya's train_textual_inversion.py / sdxl_train_textual_inversion.py load_weights (--weights, to go on
    training from a file): load_file when the extension is exactly .safetensors, else torch.load (weights_only);
    SD: a dict, string_to_param's terms if there, its first value a Tensor, a 1-D one made [1, width]; SDXL:
    clip_l and clip_g (at least one)."""
    import os

    if os.path.splitext(str(path))[1] == ".safetensors":
        from safetensors.torch import load_file

        data = load_file(str(path))
    else:
        data = torch.load(path, map_location="cpu", weights_only=True)
        if not sdxl and not isinstance(data, dict):
            raise AssertionError(f"weight file is not dict: {path}")
        if not sdxl and "string_to_param" in data:
            data = data["string_to_param"]
    if sdxl:
        pair = [data.get("clip_l"), data.get("clip_g")]
        if pair == [None, None]:
            raise AssertionError(f"weight file does not contains weights for text encoder 1 or 2: {path}")
        return pair
    emb = next(iter(data.values()))
    if not isinstance(emb, torch.Tensor):
        raise AssertionError(f"weight file does not contains Tensor: {path}")
    return [emb.unsqueeze(0) if emb.dim() == 1 else emb]


def onetrainer_load_embedding(path: Path, sdxl: bool) -> list[Any]:
    """OneTrainer's embedding loading: torch.load(weights_only=True), else safetensors' load_file, else "could not
    load embedding"; then the SD setup takes emp_params_out or emp_params (OneTrainer's own key, sic), the SDXL one
    clip_l_out or clip_l and clip_g_out or clip_g, and casts each with .to(dtype) - a missing key fails there."""
    from safetensors.torch import load_file

    try:
        data = torch.load(path, weights_only=True)
    except Exception:  # OneTrainer suppresses every error here and tries the next reader
        try:
            data = load_file(str(path))
        except Exception as exc:
            raise AssertionError(f"could not load embedding: {path}") from exc
    keys = [("clip_l_out", "clip_l"), ("clip_g_out", "clip_g")] if sdxl else [("emp_params_out", "emp_params")]
    out = []
    for output_key, key in keys:
        state = data.get(output_key, data.get(key))
        if state is None:
            raise AssertionError(f"'NoneType' object has no attribute 'to': {path} has no {key}")
        out.append(state.to(dtype=torch.float32))
    return out


def comfyui_load_embed(folder: Path, name: str, size: int, key: str | None) -> Any:
    """ComfyUI's load_embed (comfy/sd1_clip.py) as an oracle, for the word `embedding:NAME`: the file NAME, else
    NAME.safetensors, .pt or .bin; safetensors' load_file, else torch.load with weights_only=True; then the first
    string_to_param term, the tokenizer's key (clip_l for CLIP-L, clip_g for CLIP-G) if the file has it, else the
    file's first tensor. The tokenizer then uses it only if its last dimension is the encoder's width."""
    path = folder / name
    if not path.is_file():
        path = next(
            (folder / f"{name}{ext}" for ext in (".safetensors", ".pt", ".bin") if (folder / f"{name}{ext}").is_file()),
            None,
        )
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


def a1111_compvis_layers(ldm_state: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """A1111's network_layer_mapping for a checkpoint's UNet (assign_network_names_to_compvis_modules: each module of
    sd_model.model by its dotted name with '_' for '.'), from the checkpoint's keys: name -> the weight's shape."""
    return {
        key[len("model.") : -len(".weight")].replace(".", "_"): tuple(value.shape)
        for key, value in ldm_state.items()
        if key.startswith("model.diffusion_model.") and key.endswith(".weight")
    }


def a1111_convert_diffusers_name_to_compvis(key: str) -> str:
    """networks.py's convert_diffusers_name_to_compvis, for the UNet's names (its regexes, in its order)."""
    resnet = {
        "conv1": "in_layers_2",
        "conv2": "out_layers_3",
        "norm1": "in_layers_0",
        "norm2": "out_layers_0",
        "time_emb_proj": "emb_layers_1",
        "conv_shortcut": "skip_connection",
    }
    rules = [
        (r"lora_unet_conv_in(.*)", lambda m: f"diffusion_model_input_blocks_0_0{m[0]}"),
        (r"lora_unet_conv_out(.*)", lambda m: f"diffusion_model_out_2{m[0]}"),
        (r"lora_unet_time_embedding_linear_(\d+)(.*)", lambda m: f"diffusion_model_time_embed_{m[0] * 2 - 2}{m[1]}"),
        (
            r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
            lambda m: (
                f"diffusion_model_input_blocks_{1 + m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_"
                + (resnet.get(m[3], m[3]) if m[1] == "resnets" else m[3])
            ),
        ),
        (
            r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
            lambda m: (
                f"diffusion_model_middle_block_{1 if m[0] == 'attentions' else m[1] * 2}_"
                + (resnet.get(m[2], m[2]) if m[0] == "resnets" else m[2])
            ),
        ),
        (
            r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
            lambda m: (
                f"diffusion_model_output_blocks_{m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_"
                + (resnet.get(m[3], m[3]) if m[1] == "resnets" else m[3])
            ),
        ),
    ]
    for pattern, build in rules:
        match = re.match(pattern, key)
        if match:
            return build([int(x) if re.match(r"\d+", x) else x for x in match.groups()])
    return key


def a1111_load_network(path: Path, layers: dict[str, tuple[int, ...]]) -> tuple[dict[str, Any], list[str], dict]:
    """networks.py's load_network as an oracle: (matched modules {compvis name: {network part: tensor}}, keys that
    matched no module, bundled embeddings {name: (name, vectors, step)} made by create_embedding_from_data). A module
    is a LoRA module only with both lora_up.weight and lora_down.weight (network_lora.ModuleTypeLora), or the load
    fails."""
    from safetensors.torch import load_file

    matched: dict[str, dict[str, Any]] = {}
    failed: list[str] = []
    bundle: dict[str, dict[str, Any]] = {}
    for key_network, weight in load_file(path).items():
        without_parts, _, network_part = key_network.partition(".")
        if without_parts == "bundle_emb":
            emb_name, vec_name = network_part.split(".", 1)
            emb = bundle.get(emb_name, {})
            if vec_name.split(".")[0] == "string_to_param":
                _, k2 = vec_name.split(".", 1)
                emb["string_to_param"] = {k2: weight}
            else:
                emb[vec_name] = weight
            bundle[emb_name] = emb
        key = a1111_convert_diffusers_name_to_compvis(without_parts)
        if key not in layers and "lora_unet" in without_parts:  # "SDXL loras seem to already have correct compvis keys"
            key = without_parts.replace("lora_unet", "diffusion_model")
        if key not in layers:
            failed.append(key_network)
            continue
        matched.setdefault(key, {})[network_part] = weight
    for parts in matched.values():
        if not ("lora_up.weight" in parts and "lora_down.weight" in parts):
            raise AssertionError(f"Could not find a module type that would accept those keys: {', '.join(parts)}")
    return matched, failed, {name: a1111_embedding_from_data(data, name) for name, data in bundle.items()}


def comfyui_lora_unet_names(diffusers_unet_keys: list[str]) -> set[str]:
    """comfy/lora.py's model_lora_keys_unet, its kohya-diffusers part: for every diffusers UNet weight key that
    unet_to_diffusers maps (all of them), 'lora_unet_' + the key without '.weight', dots made '_'."""
    return {
        "lora_unet_" + key[: -len(".weight")].replace(".", "_")
        for key in diffusers_unet_keys
        if key.endswith(".weight")
    }
