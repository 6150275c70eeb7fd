"""Reading tensor files from strangers without running their code or exhausting memory.

Formats are told apart by their first bytes, never by the file name: safetensors (an 8-byte header length,
then a JSON header), PyTorch zip archives (``PK``) and legacy PyTorch pickles (``0x80``). safetensors headers
are checked (size, dtypes, shapes, offsets) before anything is read. Pickle-based files go through
``torch.load(weights_only=True)``, PyTorch's restricted unpickler, which builds only tensors and plain
containers; the few foreign class names that real checkpoints contain (a PyTorch Lightning callback used as a
dict key, an old ``ParameterDict``) are mapped to an inert stand-in that stores its state and runs nothing.
There is no fallback to an unrestricted load.
"""

from __future__ import annotations

import json
import re
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

from tistudio.errors import UnsafeFileError

SAFETENSORS = "safetensors"
TORCH_ZIP = "torch-zip"
TORCH_LEGACY = "torch-legacy"
PNG = "png"
UNKNOWN = "unknown"

MAX_HEADER_BYTES = 100 * 1024 * 1024
SAFETENSORS_DTYPES = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2"}
TORCH_ZIP_MEMBER = re.compile(
    r"^[^/]+/(data\.pkl|version|byteorder|\.format_version|\.storage_alignment|\.data/version|"
    r"\.data/serialization_id|data/\d+)$"
)


# What a damaged zip archive can raise from the standard library.
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    OSError,
    ValueError,
    NotImplementedError,
    EOFError,
    struct.error,
    zlib.error,
    UnicodeDecodeError,
)


class InertObject:
    """Stand-in for a foreign class found in a checkpoint: keeps the pickled state, runs no code."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _inert_named(qualified_name: str) -> tuple[type, str]:
    stub = type(qualified_name.rsplit(".", 1)[-1], (InertObject,), {})
    return stub, qualified_name


# Class names real SD checkpoints and old A1111 embeddings carry, mapped to inert stand-ins.
_FOREIGN_NAMES = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
    "torch.nn.modules.container.ParameterDict",
)


def sniff(path: Path) -> str:
    """The file's format, from its first bytes."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    if head.startswith(b"PK\x03\x04"):
        return TORCH_ZIP
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return PNG
    if len(head) >= 9:
        (length,) = struct.unpack("<Q", head[:8])
        if 2 <= length <= MAX_HEADER_BYTES and head[8:9] == b"{":
            return SAFETENSORS
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return TORCH_LEGACY
    return UNKNOWN


def check_size(path: Path, max_bytes: int, what: str) -> int:
    size = path.stat().st_size
    if size == 0:
        raise UnsafeFileError(f"{path}: the file is empty (0 bytes); it is not {what}")
    if size > max_bytes:
        raise UnsafeFileError(
            f"{path}: {size:,} bytes is larger than {what} can be ({max_bytes:,} bytes at most); refusing to read it"
        )
    return size


def safetensors_header(path: Path, max_tensors: int, max_elements: int) -> tuple[dict[str, Any], dict[str, str]]:
    """Validated safetensors header: ({name: {dtype, shape, data_offsets}}, metadata)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw_length = handle.read(8)
        if len(raw_length) < 8:
            raise UnsafeFileError(f"{path}: truncated safetensors file (no header)")
        (length,) = struct.unpack("<Q", raw_length)
        if length > MAX_HEADER_BYTES or length + 8 > size:
            raise UnsafeFileError(
                f"{path}: safetensors header of {length:,} bytes does not fit the file "
                f"({size:,} bytes); the file is truncated or corrupt"
            )
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise UnsafeFileError(
            f"{path}: the safetensors header is not valid JSON ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None
    if not isinstance(header, dict):
        raise UnsafeFileError(f"{path}: the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UnsafeFileError(f"{path}: safetensors metadata must map names to text")
    if len(header) > max_tensors:
        raise UnsafeFileError(
            f"{path}: {len(header):,} tensors is more than this kind of file holds ({max_tensors:,} at most)"
        )
    data_size = size - 8 - length
    total = 0
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise UnsafeFileError(f"{path}: tensor {name!r} has a malformed header entry")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPES:
            raise UnsafeFileError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        if (
            not isinstance(shape, list)
            or len(shape) > 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape)
        ):
            raise UnsafeFileError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_size
        ):
            raise UnsafeFileError(f"{path}: tensor {name!r} points outside the file (truncated or corrupt)")
        elements = 1
        for d in shape:
            elements *= d
        total += elements
        if total > max_elements:
            raise UnsafeFileError(
                f"{path}: the tensors hold more than {max_elements:,} numbers, far more than this kind of file holds"
            )
    return header, metadata


def load_safetensors(
    path: Path, max_bytes: int, max_tensors: int, max_elements: int, keys: list[str] | None = None
) -> tuple[dict[str, Any], dict[str, str]]:
    """Tensors (all, or only `keys`) and metadata of a safetensors file, after checking its header."""
    from safetensors import SafetensorError, safe_open

    check_size(path, max_bytes, "a safetensors file")
    header, metadata = safetensors_header(path, max_tensors, max_elements)
    wanted = list(header) if keys is None else [k for k in keys if k in header]
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            tensors = {key: handle.get_tensor(key) for key in wanted}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UnsafeFileError(f"{path}: cannot read the safetensors data ({exc})") from None
    return tensors, metadata


def _check_torch_zip(path: Path, max_bytes: int) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except _ZIP_ERRORS as exc:
        raise UnsafeFileError(f"{path}: not a readable PyTorch archive ({type(exc).__name__}: {exc})") from None
    if len(members) > 200_000:
        raise UnsafeFileError(f"{path}: {len(members):,} archive members; not a PyTorch file")
    pickles = [m for m in members if m.filename.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise UnsafeFileError(f"{path}: a PyTorch archive has exactly one data.pkl; this one has {len(pickles)}")
    total = 0
    for member in members:
        if not TORCH_ZIP_MEMBER.match(member.filename):
            raise UnsafeFileError(f"{path}: unexpected archive member {member.filename!r}; not a PyTorch file")
        if member.compress_type != zipfile.ZIP_STORED and member.file_size > 100 * max(member.compress_size, 1):
            raise UnsafeFileError(
                f"{path}: archive member {member.filename!r} expands "
                f"{member.file_size // max(member.compress_size, 1):,}x (a zip bomb)"
            )
        total += member.file_size
    if total > max_bytes:
        raise UnsafeFileError(f"{path}: the archive expands to {total:,} bytes, more than {max_bytes:,}")


def load_torch_pickle(path: Path, max_bytes: int) -> Any:
    """A .pt/.ckpt/.bin file's contents through PyTorch's restricted unpickler; nothing in it is executed."""
    import pickle

    import torch

    check_size(path, max_bytes, "a PyTorch file")
    kind = sniff(path)
    if kind == TORCH_ZIP:
        _check_torch_zip(path, max_bytes)
    elif kind != TORCH_LEGACY:
        raise UnsafeFileError(f"{path}: not a PyTorch file (its first bytes say {kind})")
    stubs = [_inert_named(name) for name in _FOREIGN_NAMES]
    try:
        # A file object, not the path: torch.load must not pick a loader from the file name either.
        with torch.serialization.safe_globals(stubs), open(path, "rb") as handle:
            return torch.load(handle, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsafeFileError(
            f"{path}: refused: the file contains objects other than tensors and plain data, "
            f"which could run code when loaded ({first[:300]})"
        ) from None
    except (
        *_ZIP_ERRORS,
        RuntimeError,
        KeyError,
        TypeError,
        AttributeError,
        IndexError,
        MemoryError,
        OverflowError,
        RecursionError,
    ) as exc:
        raise UnsafeFileError(
            f"{path}: cannot read this PyTorch file; it is truncated or corrupt "
            f"({type(exc).__name__}: {str(exc)[:300]})"
        ) from None
