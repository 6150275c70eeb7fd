"""Embedding files: one data type, every format people bring, and the formats other tools read.

An :class:`Embedding` is pure data: a name, its vectors and a little metadata. It never touches a model.

Written:
  * ``.safetensors`` (the default): ``{"emb_params": float32[n, width]}`` - the layout A1111, ComfyUI, kohya
    and invoke read - with name, step, vector count, width and the model's hash in the header metadata.
    diffusers reads it with ``pipe.load_textual_inversion(path, token=NAME)``.
  * ``.pt`` for A1111 (``tistudio convert --to a1111``): the plain six-key dict A1111 writes.
  * diffusers ``{NAME: float32[n, width]}`` safetensors (``--to diffusers``), loadable without ``token=``.
  * OneTrainer's ``{"emp_params": ...}`` (``--to onetrainer``; SDXL files are already its clip_l/clip_g layout).
  * A1111's embedding PNG (``--to png``): the ``sd-ti-embedding`` text chunk and the same data in the picture's
    side strips, which A1111 reads when a site has stripped the text.

Read (by content, never by extension): all of the above; A1111 ``.pt`` (also the old ``ParameterDict``
kind), diffusers ``learned_embeds.bin``/``.safetensors``, kohya ``emb_params``, OneTrainer ``emp_params``,
A1111's embeddings hidden in a PNG text chunk, and SDXL ``clip_l``/``clip_g`` files (listed and inspected).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
import re
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from tistudio import safeload
from tistudio.config import NAME_PATTERN
from tistudio.embeddings.pngdata import MAX_PAYLOAD
from tistudio.errors import EmbeddingError, OptionError, UnsafeFileError
from tistudio.storage import atomic_write, file_sha256, write_safetensors

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_VECTORS = 75
MAX_WIDTH = 4096
SUFFIXES = (".safetensors", ".pt", ".bin", ".png")
SINGLE = "clip"
SDXL_KEYS = ("clip_l", "clip_g")
ONETRAINER_KEY = "emp_params"  # OneTrainer's SD 1.x/2.x embeddings keep their tensor under this (sic) name
FAMILY_WIDTHS = {768: "SD 1.x (CLIP ViT-L, 768)", 1024: "SD 2.x (OpenCLIP ViT-H, 1024)"}


@dataclass(frozen=True)
class Embedding:
    """A learned word: vectors per text encoder (``{"clip": [n, w]}``, or ``clip_l``/``clip_g`` for SDXL)."""

    name: str
    vectors: dict[str, torch.Tensor]
    step: int = 0
    model_hash: str | None = None  # A1111's sd_checkpoint: first 10 hex digits of the checkpoint's sha256
    model_name: str | None = None
    meta: dict[str, str] = field(default_factory=dict)
    source_format: str = "new"

    @property
    def is_sdxl(self) -> bool:
        return set(self.vectors) == set(SDXL_KEYS)

    def meta_count(self, key: str) -> int | None:
        """A step count from the file's metadata (last_step, best_step), or None where it is absent or not a
        plain whole number (a file's metadata is untrusted: "abc", "1.5" or 5,000 digits are not steps)."""
        return whole_number(self.meta.get(key))

    @property
    def count(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    @property
    def width(self) -> int:
        return sum(t.shape[1] for t in self.vectors.values())

    @property
    def tensor(self) -> torch.Tensor:
        """The [n, width] vectors of an SD1/SD2 embedding."""
        if self.is_sdxl:
            raise EmbeddingError(
                f"embedding {self.name!r} is an SDXL embedding (clip_l + clip_g), with a vector set "
                "per text encoder; it has no single SD 1.x/2.x tensor"
            )
        return self.vectors[SINGLE]

    def fits(self) -> str:
        """Which model families this embedding fits, in words."""
        if self.is_sdxl:
            return "SDXL (CLIP-L 768 + OpenCLIP-bigG 1280)"
        return FAMILY_WIDTHS.get(self.width, f"models whose text encoder is {self.width} wide")

    def with_vectors(self, vectors: torch.Tensor, step: int) -> Embedding:
        return replace(self, vectors={SINGLE: vectors.detach().to("cpu", torch.float32).clone()}, step=step)


def _check_tensor(path: Path, key: str, value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise EmbeddingError(f"{path}: {key!r} is a {type(value).__name__}, not a tensor of vectors")
    if not (value.is_floating_point()):
        raise EmbeddingError(f"{path}: {key!r} has dtype {value.dtype}; embedding vectors are floating point")
    tensor = value.detach().to("cpu")
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 2:
        raise EmbeddingError(f"{path}: {key!r} has shape {tuple(value.shape)}; expected [vectors, width]")
    count, width = tensor.shape
    if not 1 <= count <= MAX_VECTORS:
        raise EmbeddingError(f"{path}: {key!r} has {count} vectors; an embedding has 1 to {MAX_VECTORS}")
    if not 1 <= width <= MAX_WIDTH:
        raise EmbeddingError(f"{path}: {key!r} is {width} wide; text encoders are at most {MAX_WIDTH} wide")
    tensor = tensor.to(torch.float32)
    if not torch.isfinite(tensor).all():
        raise EmbeddingError(f"{path}: {key!r} contains NaN or infinite values; the file is broken")
    return tensor.contiguous()


MAX_STEP = 10**12  # no training runs this long; a larger "step" in a file is noise, not a count


def whole_number(value: Any) -> int | None:
    """A non-negative whole number up to MAX_STEP from untrusted file data (an int, or a string of ASCII digits),
    else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value <= MAX_STEP else None
    if isinstance(value, str) and re.fullmatch(r"[0-9]{1,13}", value.strip()):
        number = int(value.strip())
        return number if number <= MAX_STEP else None
    return None


def _int_or_zero(value: Any) -> int:
    return whole_number(value) or 0


def _text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def from_data(path: Path, data: Any, meta: dict[str, str], kind: str) -> Embedding:
    """Dispatch on the content of a loaded file (A1111's order: string_to_param, SDXL, single tensor)."""
    name = path.stem
    if not isinstance(data, dict):
        raise EmbeddingError(f"{path}: holds a {type(data).__name__}; an embedding file holds a dict of vectors")
    if "string_to_param" in data:
        params = data["string_to_param"]
        if isinstance(params, safeload.InertObject):  # an old nn.ParameterDict: its tensors are in _parameters
            params = (params.state or {}).get("_parameters", {}) if isinstance(params.state, dict) else {}
        if not isinstance(params, dict) or len(params) != 1:
            count = len(params) if isinstance(params, dict) else 0
            raise EmbeddingError(f"{path}: an A1111 embedding holds exactly one term; this one holds {count}")
        vectors = _check_tensor(path, "string_to_param", next(iter(params.values())))
        return Embedding(
            name=name,
            vectors={SINGLE: vectors},
            step=_int_or_zero(data.get("step")),
            model_hash=_text_or_none(data.get("sd_checkpoint")),
            model_name=_text_or_none(data.get("sd_checkpoint_name")),
            meta={"internal_name": str(data.get("name", ""))[:200]},
            source_format=f"a1111 ({kind})",
        )
    if all(key in data for key in SDXL_KEYS):
        vectors = {key: _check_tensor(path, key, data[key]) for key in SDXL_KEYS}
        if vectors["clip_l"].shape[0] != vectors["clip_g"].shape[0]:
            raise EmbeddingError(f"{path}: clip_l and clip_g have different vector counts")
        return Embedding(
            name=name, vectors=vectors, meta=meta, source_format=f"sdxl ({kind})", step=_int_or_zero(meta.get("step"))
        )
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    for key in ("emb_params", "emp_params"):
        if key in tensors:
            unused = sorted(str(other)[:40] for other in tensors if other != key)
            if unused:  # e.g. OneTrainer's emp_params_out: vectors for the text encoder's output, which A1111,
                # ComfyUI and tistudio have no place for
                log.warning("%s: uses %s; %s not used (no tool but OneTrainer reads it)", path.name, key, unused)
            return Embedding(
                name=name,
                vectors={SINGLE: _check_tensor(path, key, tensors[key])},
                step=_int_or_zero(meta.get("step")),
                model_hash=_text_or_none(meta.get("sd_checkpoint")),
                model_name=_text_or_none(meta.get("sd_checkpoint_name")),
                meta={**meta, "unused_tensors": ", ".join(unused)} if unused else meta,
                source_format=("tistudio" if "tistudio_version" in meta else key) + f" ({kind})",
            )
    if len(data) == 1 and len(tensors) == 1:
        token, value = next(iter(tensors.items()))
        return Embedding(
            name=name,
            vectors={SINGLE: _check_tensor(path, repr(token), value)},
            step=_int_or_zero(meta.get("step")),
            meta={**meta, "token": str(token)[:200]},
            source_format=f"diffusers ({kind})",
        )
    keys = ", ".join(repr(k)[:40] for k in list(data)[:8])
    raise EmbeddingError(
        f"{path}: not a textual-inversion embedding (keys: {keys}); expected A1111's "
        "string_to_param, emb_params, clip_l/clip_g or a single {token: vectors} entry"
    )


PNG_TEXT_BYTES = 4 * (MAX_PAYLOAD // 3 + 1)  # the most an embedding's text chunk may hold: its JSON in base64


def png_text_chunk(path: Path, key: str) -> str | None:
    """The text of a PNG's tEXt, zTXt or iTXt chunk named `key`, read chunk by chunk without decoding the pixels
    (PIL's Image.text decodes the whole image first: a 13000x13000 PNG of 646 KB took 805 MB to read)."""
    import zlib

    def unpack(data: bytes) -> bytes:
        inflater = zlib.decompressobj()
        out = inflater.decompress(data, PNG_TEXT_BYTES)
        if inflater.unconsumed_tail:
            raise EmbeddingError(
                f"{path}: its embedding text chunk unpacks to more than an embedding can be "
                f"({PNG_TEXT_BYTES // 2**20} MB); it was not decoded"
            )
        return out

    wanted = key.encode("latin-1")
    try:
        with open(path, "rb") as handle:
            if handle.read(8) != b"\x89PNG\r\n\x1a\n":
                raise EmbeddingError(f"{path}: not a PNG")
            while True:
                head = handle.read(8)
                if len(head) < 8:
                    return None
                length, kind = struct.unpack(">I4s", head)
                if kind == b"IEND":
                    return None
                if kind not in (b"tEXt", b"zTXt", b"iTXt"):
                    handle.seek(length + 4, 1)
                    continue
                if length > PNG_TEXT_BYTES + 80:  # its name and flags, then at most PNG_TEXT_BYTES
                    if handle.read(len(wanted) + 1) == wanted + b"\0":
                        raise EmbeddingError(
                            f"{path}: its embedding text chunk holds {length:,} bytes, more than an embedding "
                            "can be; it was not read"
                        )
                    handle.seek(length + 4 - len(wanted) - 1, 1)
                    continue
                data = handle.read(length)
                handle.seek(4, 1)  # the CRC
                name, _, rest = data.partition(b"\0")
                if name != wanted:
                    continue
                if kind == b"tEXt":
                    return rest.decode("latin-1")
                if kind == b"zTXt":
                    return unpack(rest[1:]).decode("latin-1")
                compressed, rest = rest[:1] == b"\1", rest[2:]
                rest = rest.split(b"\0", 2)[-1]  # after the language tag and the translated keyword
                return (unpack(rest) if compressed else rest).decode("utf-8", errors="replace")
    except (OSError, zlib.error, struct.error) as exc:
        raise EmbeddingError(f"{path}: cannot read this PNG ({exc})") from None


def _png_embedding(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """A1111's embedding in a PNG: its text chunk (base64 JSON, tensors as nested lists), else its pixels."""
    from tistudio.embeddings import pngdata

    text = png_text_chunk(path, "sd-ti-embedding")
    if text:
        try:
            raw = base64.b64decode(text, validate=False)
        except ValueError as exc:  # binascii.Error too; non-ASCII text is a ValueError
            raise EmbeddingError(f"{path}: its 'sd-ti-embedding' text chunk is not base64 ({str(exc)[:100]})") from None
        if len(raw) > MAX_PAYLOAD:
            raise EmbeddingError(f"{path}: its embedding text is larger than an embedding can be; it was not decoded")
    else:
        try:
            raw = pngdata.find(path)
        except (OSError, ValueError, SyntaxError, struct.error) as exc:  # PIL says "broken PNG" as a SyntaxError
            raise EmbeddingError(f"{path}: cannot read this PNG ({str(exc)[:200]})") from None
        if raw is None:
            raise EmbeddingError(
                f"{path}: a PNG with no embedding in it: neither an 'sd-ti-embedding' text chunk "
                f"nor data in its pixels (pictures over {pngdata.MAX_PIXELS // 10**6} MP are not "
                "searched)"
            )

    def tensors(obj: dict[str, Any]) -> Any:
        if "TORCHTENSOR" in obj:
            try:
                return torch.tensor(obj["TORCHTENSOR"], dtype=torch.float32)
            except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
                raise EmbeddingError(f"{path}: malformed tensor in the PNG embedding ({str(exc)[:200]})") from None
        return obj

    try:
        data = json.loads(raw, object_hook=tensors)
    except (ValueError, RecursionError) as exc:
        raise EmbeddingError(
            f"{path}: the PNG's embedding chunk is not valid ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None
    return data, {}


def read_embedding(path: str | Path) -> Embedding:
    """Read an embedding file of any supported format; the name is the file stem, as in A1111."""
    path = Path(path)
    if not path.is_file():
        raise EmbeddingError(f"{path}: no such embedding file")
    try:
        safeload.check_size(path, MAX_FILE_BYTES, "an embedding file")
        kind = safeload.sniff(path)
        if kind == safeload.SAFETENSORS:
            data, meta = safeload.load_safetensors(
                path, MAX_FILE_BYTES, max_tensors=16, max_elements=4 * MAX_VECTORS * MAX_WIDTH
            )
        elif kind in (safeload.TORCH_ZIP, safeload.TORCH_LEGACY):
            data, meta = safeload.load_torch_pickle(path, MAX_FILE_BYTES), {}
        elif kind == safeload.PNG:
            data, meta = _png_embedding(path)
        else:
            raise EmbeddingError(
                f"{path}: not an embedding file: its content is neither safetensors, a PyTorch "
                "file nor a PNG, whatever its extension says"
            )
    except UnsafeFileError as exc:
        raise EmbeddingError(str(exc)) from None
    embedding = from_data(path, data, meta, kind)
    inner = embedding.meta.get("internal_name", "")
    if kind == safeload.PNG and inner != embedding.name and NAME_PATTERN.match(inner):
        embedding = replace(embedding, name=inner)  # A1111 registers a picture's embedding by the name inside it
    partner = diffusers_partner(path)
    if embedding.source_format.startswith("diffusers") and partner.is_file():
        return _with_partner(embedding, path, partner)
    return embedding


def diffusers_partner(path: Path) -> Path:
    """Where diffusers' SDXL layout keeps the second encoder's vectors: learned_embeds_2.safetensors beside
    learned_embeds.safetensors."""
    return path.with_name(f"{path.stem}_2{path.suffix}")


def _with_partner(first: Embedding, path: Path, partner: Path) -> Embedding:
    """An SDXL embedding from diffusers' two files ({token: [n, 768]} and {token: [n, 1280]})."""
    second = read_embedding(partner)
    l_vectors, g_vectors = first.vectors[SINGLE], second.vectors.get(SINGLE)
    # a pair names the same token at two widths; anything else beside the file is an embedding of its own
    if (
        not second.source_format.startswith("diffusers")
        or second.meta.get("token") != first.meta.get("token")
        or g_vectors is None
        or g_vectors.shape[1] == l_vectors.shape[1]
    ):
        return first
    if l_vectors.shape[0] != g_vectors.shape[0]:
        raise EmbeddingError(
            f"{path} and {partner.name}: diffusers' SDXL pair holds different vector counts "
            f"({l_vectors.shape[0]} and {g_vectors.shape[0]})"
        )
    return replace(
        first,
        vectors={"clip_l": l_vectors, "clip_g": g_vectors},
        source_format=f"diffusers sdxl pair ({first.source_format.split('(')[-1]}",
    )


def header_info(path: Path) -> tuple[int, int] | None:
    """(vectors, width) from a safetensors header without reading tensors; None for other formats."""
    try:
        if safeload.sniff(path) != safeload.SAFETENSORS:
            return None
        header, _ = safeload.safetensors_header(path, 16, 4 * MAX_VECTORS * MAX_WIDTH)
    except (OSError, UnsafeFileError):
        return None
    shapes = [entry["shape"] for entry in header.values()]
    if len(shapes) == 1 and len(shapes[0]) in (1, 2):
        shape = shapes[0]
        return (1, shape[0]) if len(shape) == 1 else (shape[0], shape[1])
    return None


def metadata(embedding: Embedding, **extra: str) -> dict[str, str]:
    from tistudio import __version__

    meta = {k: v for k, v in embedding.meta.items() if k not in ("token", "internal_name")}
    meta.update(
        {
            "name": embedding.name,
            "step": str(embedding.step),
            "vectors": str(embedding.count),
            "width": str(embedding.width),
            "tistudio_version": __version__,
            "format": "pt",
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.title": embedding.name,
        }
    )
    if embedding.model_hash:
        meta["sd_checkpoint"] = embedding.model_hash
    if embedding.model_name:
        meta["sd_checkpoint_name"] = embedding.model_name
    meta.update(extra)
    return meta


def _finite(embedding: Embedding) -> None:
    for key, tensor in embedding.vectors.items():
        if not torch.isfinite(tensor).all():
            raise EmbeddingError(
                f"refusing to write embedding {embedding.name!r}: its {key} vectors contain NaN or infinite values"
            )


def write_embedding(embedding: Embedding, path: str | Path, single_key: str = "emb_params", **extra_meta: str) -> Path:
    """Write the default format, atomically: safetensors with ``emb_params`` (one text encoder) or a tensor per
    encoder key (SDXL: clip_l, clip_g), and metadata. `single_key` names the one encoder's tensor: OneTrainer
    reads only its own ``emp_params`` (:data:`ONETRAINER_KEY`)."""
    _finite(embedding)
    keys = {SINGLE: single_key} if set(embedding.vectors) == {SINGLE} else {}  # one encoder: A1111's name
    tensors = {keys.get(k, k): v.detach().to("cpu", torch.float32).contiguous() for k, v in embedding.vectors.items()}
    return write_safetensors(Path(path), tensors, metadata(embedding, **extra_meta))


def import_embedding(source: str | Path, folder: str | Path, name: str) -> Path:
    """Bring in an embedding from any tool as folder/NAME.safetensors: read by content (a pickle only through the
    restricted reader), renamed, written in tistudio's format. An existing embedding is never replaced."""
    if taken_name(folder, name) is not None:
        raise OptionError("name", name, "an embedding with this name exists; delete it first or pick another name")
    embedding = read_embedding(source)
    return write_embedding(replace(embedding, name=name), Path(folder) / f"{name}.safetensors")


def a1111_data(embedding: Embedding) -> dict[str, Any]:
    """What A1111 keeps of an embedding: its .pt's six keys for SD1/SD2, only clip_l and clip_g for SDXL (A1111's
    loader turns every value of an SDXL dict into a tensor, so a name or step there would break it)."""
    _finite(embedding)
    if embedding.is_sdxl:
        return {key: embedding.vectors[key].detach().to("cpu", torch.float32).clone() for key in ("clip_l", "clip_g")}
    return {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": embedding.tensor.detach().to("cpu", torch.float32).clone().requires_grad_(False)},
        "name": embedding.name,
        "step": embedding.step,
        "sd_checkpoint": embedding.model_hash,
        "sd_checkpoint_name": embedding.model_name,
    }


def write_a1111_pt(embedding: Embedding, path: str | Path) -> Path:
    """A1111's native .pt: a plain dict of six keys that its allowlist unpickler accepts."""
    if embedding.is_sdxl:
        raise EmbeddingError(
            f"embedding {embedding.name!r} is an SDXL embedding: A1111 reads those from a "
            ".safetensors file with clip_l and clip_g, which is tistudio's own file (convert --to "
            "safetensors); its .pt format holds one tensor"
        )
    data = a1111_data(embedding)
    # PyTorch's legacy (non-zip) format: A1111's restricted loader refuses zip members it does not list, and
    # torch >= 2 adds .format_version and .storage_alignment to every zip it writes
    return atomic_write(Path(path), lambda temp: torch.save(data, temp, _use_new_zipfile_serialization=False))


def a1111_json(embedding: Embedding) -> str:
    """The JSON A1111 keeps of an embedding in a PNG: its data, each tensor as {"TORCHTENSOR": lists}."""

    def plain(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return {"TORCHTENSOR": value.tolist()}
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        return value

    return json.dumps(plain(a1111_data(embedding)))


def png_embedding_text(embedding: Embedding) -> str:
    """A1111's `sd-ti-embedding` PNG text: base64 of :func:`a1111_json`."""
    return base64.b64encode(a1111_json(embedding).encode("utf-8")).decode("ascii")


def card(embedding: Embedding, size: int = 512) -> Any:
    """A plain picture for an embedding saved as a PNG without a preview: its name, vectors and step."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (32, 36, 48))
    draw = ImageDraw.Draw(image)
    lines = [embedding.name, f"{embedding.count} vectors, step {embedding.step}", "textual inversion (tistudio)"]
    for row, line in enumerate(lines):
        draw.text(
            (24, 24 + 28 * row),
            line,
            fill=(230, 230, 230) if row == 0 else (160, 170, 190),
            font_size=24 if row == 0 else 16,
        )
    return image


def write_png_embedding(
    embedding: Embedding, path: str | Path, image: Any = None, parameters: str = "", pixels: bool = True
) -> Path:
    """An embedding inside a PNG, as A1111 saves one: its `sd-ti-embedding` text chunk and, with `pixels`, the
    same data in two strips beside the picture (:mod:`pngdata`), which A1111 reads when a site has stripped the
    text. The picture (a preview, or a card naming the embedding) is the file people share."""
    from PIL.PngImagePlugin import PngInfo

    from tistudio.embeddings import pngdata

    data = a1111_json(embedding).encode("utf-8")
    info = PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    info.add_text("sd-ti-embedding", base64.b64encode(data).decode("ascii"))  # png_embedding_text's form
    picture = image if image is not None else card(embedding)
    if pixels:
        picture = pngdata.hide(picture, data)
    return atomic_write(Path(path), lambda temp: picture.save(temp, format="PNG", pnginfo=info))


def write_diffusers(embedding: Embedding, path: str | Path, token: str | None = None) -> Path:
    """diffusers' learned_embeds layout ``{token: [n, width]}``; loads with ``load_textual_inversion(path)``. An
    SDXL embedding is two such files, as diffusers' SDXL example writes them: `path` (clip_l) and PATH_2 (clip_g,
    loaded with ``text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2``)."""
    _finite(embedding)
    path = Path(path)
    parts = [(path, "clip_l"), (diffusers_partner(path), "clip_g")] if embedding.is_sdxl else [(path, SINGLE)]
    for target, key in parts:
        tensor = embedding.vectors[key].detach().to("cpu", torch.float32).contiguous()
        write_safetensors(target, {token or embedding.name: tensor}, {"format": "pt"})
    return path


def short_hash(path: Path) -> str:
    """A1111's TI hash: the first 12 hex digits of the file's sha256."""
    return file_sha256(path)[:12]


def find_embedding_file(spec: str, embeddings_dir: str | Path) -> Path:
    """An embedding given as a path, or as a name looked up in the embeddings folder."""
    path = Path(spec)
    if path.is_file():
        return path
    folder = Path(embeddings_dir)
    for suffix in SUFFIXES:
        candidate = folder / f"{spec}{suffix}"
        if candidate.is_file():
            return candidate
    raise EmbeddingError(
        f"embedding {spec!r}: no such file, and no {spec}.safetensors/.pt/.bin in {folder}; "
        f"create it first: tistudio create {spec} --init-text '...' --model ..."
    )


def files_by_stem(folder: str | Path, suffixes: tuple[str, ...], skip_ending: str = "") -> dict[str, Path]:
    """The files of a folder and its sub-folders with these suffixes, by file stem, shallowest first (A1111's way of
    listing its embeddings and LoRAs). Skipped: hidden files, zero-byte files, names ending in `skip_ending`."""
    folder = Path(folder)
    found: dict[str, Path] = {}
    if not folder.is_dir():
        return found
    for path in sorted(folder.rglob("*"), key=lambda p: (len(p.parts), str(p))):
        if (
            path.suffix.lower() not in suffixes
            or path.name.startswith(".")
            or (skip_ending and path.name.endswith(skip_ending))
            or not path.is_file()
            or path.stat().st_size == 0
        ):
            continue
        found.setdefault(path.stem, path)
    return found


def list_embedding_files(folder: str | Path) -> dict[str, Path]:
    """Embedding files in a folder and its sub-folders, by file stem (A1111: the stem is the prompt word).

    Skipped: hidden files, zero-byte files, ``*.preview.png``, and files of other extensions.
    """
    return files_by_stem(folder, SUFFIXES, ".preview.png")


def prompt_words(folder: str | Path) -> dict[str, Path]:
    """The embedding files of a folder by the word a prompt calls each with, as A1111 registers them: the file
    stem, or for a PNG with an embedding text chunk the name inside it (`a1111_png_text.png` holding `a1111_png`
    is `a1111_png`). A PNG whose embedding is only in its pixels keeps its stem (finding it there decodes the
    picture, which a listing does not do)."""
    words: dict[str, Path] = {}
    for stem, path in list_embedding_files(folder).items():
        word = stem
        if path.suffix.lower() == ".png":
            with contextlib.suppress(EmbeddingError, ValueError, AttributeError, RecursionError):
                text = png_text_chunk(path, "sd-ti-embedding")
                inner = json.loads(base64.b64decode(text or "", validate=False)).get("name") if text else None
                word = inner if isinstance(inner, str) and NAME_PATTERN.match(inner) else stem
        words.setdefault(word, path)
    return words


def taken_name(folder: str | Path, name: str) -> Path | None:
    """The embedding file in `folder` named `name`, compared without regard to case (prompts are lowercased, so
    'Tom' and 'tom' are one word), or None."""
    lowered = {stem.lower(): path for stem, path in list_embedding_files(folder).items()}
    return lowered.get(name.lower())


def describe(embedding: Embedding, path: Path | None = None) -> dict[str, Any]:
    """What `tistudio inspect` shows."""
    norms = [float(t.norm(dim=1).mean()) for t in embedding.vectors.values()]
    info: dict[str, Any] = {
        "name": embedding.name,
        "format": embedding.source_format,
        "vectors": embedding.count,
        "width": embedding.width,
        "step": embedding.step,
        "model_hash": embedding.model_hash,
        "model_name": embedding.model_name,
        "fits": embedding.fits(),
        "mean_vector_norm": round(sum(norms) / len(norms), 4) if all(math.isfinite(n) for n in norms) else None,
    }
    if path is not None:
        info["file"] = str(path)
        info["ti_hash"] = short_hash(path)
    for key in ("init_text", "model_family", "token", "internal_name", "unused_tensors", "lora", "lora_rank"):
        if embedding.meta.get(key):
            info[key] = embedding.meta[key]
    return info
