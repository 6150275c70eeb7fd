"""Writing files so that a crash, a full disk or a kill never leaves a half-written file behind.

Every file goes to a temporary name in the same folder, is flushed to disk, then renamed over the target in one
step (``os.replace``): readers see the old file or the new one, never a mix. Write failures become a
``StorageError`` naming the file and the cause; the previous file stays as it was.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tistudio.errors import StorageError

_REASONS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


def _explain(exc: OSError) -> str:
    return _REASONS.get(exc.errno or 0, exc.strerror or str(exc))


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(temp_path)``, then move the temporary file over `path` atomically."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create folder {path.parent}: {_explain(exc)}") from None
    temp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        write(temp)
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except OSError as exc:
        _remove_quietly(temp)
        raise StorageError(f"cannot write {path}: {_explain(exc)}; the previous file, if any, is unchanged") from None
    except BaseException:
        _remove_quietly(temp)
        raise
    _fsync_folder(path.parent)
    return path


def size_text(count: int) -> str:
    """A byte count for people: "50 MB", "512 KB", "0.5 MB" (never "0 MB" for a cap under a megabyte)."""
    if count >= 1024 * 1024:
        return f"{count / (1024 * 1024):.3g} MB"
    return f"{count / 1024:.3g} KB"


def write_bytes(path: Path, data: bytes) -> Path:
    return atomic_write(path, lambda temp: temp.write_bytes(data))


def write_text(path: Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


_SAFETENSORS_DTYPES = {
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "float64": "F64",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}


def safetensors_bytes(tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file whose bytes depend only on its content: the header's keys sorted, the tensors in name
    order (the safetensors library writes its metadata in a random order, so the same embedding got a different
    file, and A1111 TI hash, every time)."""
    import torch

    header: dict[str, Any] = {"__metadata__": dict(sorted((metadata or {}).items()))} if metadata else {}
    blobs, offset = [], 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        dtype = _SAFETENSORS_DTYPES[str(tensor.dtype).replace("torch.", "")]
        blob = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    return len(text).to_bytes(8, "little") + text + b"".join(blobs)


def write_safetensors(path: Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> Path:
    """Write tensors (and string metadata) as a safetensors file, atomically (see safetensors_bytes)."""
    return write_bytes(path, safetensors_bytes(tensors, metadata))


def append_line(path: Path, line: str) -> None:
    """Append one line to a log file (a partial last line is tolerated by its readers)."""
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(line.rstrip("\n") + "\n")
    except OSError as exc:
        raise StorageError(f"cannot append to {path}: {_explain(exc)}") from None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stale_temporary(path: Path) -> bool:
    """Whether `path` is a temporary file of an atomic write (``.NAME.PID-XXXXXXXX.tmp``) whose process no longer
    runs, or an upload's staging file (``.upload-NAME.tmp``, whose server has restarted)."""
    name = path.name
    if not (name.startswith(".") and name.endswith(".tmp")):
        return False
    if name.startswith(".upload-"):
        return True
    pid = name[:-4].rpartition(".")[2].partition("-")[0]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, ValueError):
        return False  # a process of another user's, or no pid at all: not ours to judge
    return False  # its process still runs (this one, or another writing into the same folder)


def remove_stale_temporaries(folder: Path) -> int:
    """Delete the stale temporaries (stale_temporary) directly in `folder`; how many."""
    removed = 0
    for path in folder.glob(".*.tmp") if folder.is_dir() else ():
        if stale_temporary(path) and not path.is_symlink():
            _remove_quietly(path)
            removed += 1
    return removed


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError:
        # The temporary file is left behind; it has a dotted .tmp name and is ignored by every reader.
        pass


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
