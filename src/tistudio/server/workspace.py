"""The server's workspace: every file the server reads or writes lives under one folder, and clients only ever
name things (a photo set, an embedding, a file inside a set), never paths.

    WORKSPACE/photos/SET/...        uploaded photos, as the client sent them
    WORKSPACE/datasets/SET/...      `prepare` output: the training set, manifest.json, report.html
    WORKSPACE/embeddings/NAME.safetensors
    WORKSPACE/loras/NAME.safetensors       LoRAs trained beside words (pivotal tuning), with the word bundled
    WORKSPACE/runs/NAME/...         training runs (previews, copies, loss.csv, resume state)
    WORKSPACE/outputs/...           generated images
    WORKSPACE/jobs/ID.json          the job list, kept across restarts
"""

from __future__ import annotations

import contextlib
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from tistudio.config import NAME_PATTERN, WINDOWS_RESERVED, check_name
from tistudio.errors import DatasetError, OptionError, TistudioError
from tistudio.storage import remove_stale_temporaries, size_text


class TooFull(TistudioError):
    """The workspace's cap is reached (answered with 507, Insufficient Storage)."""


FILE_PATTERN = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._ -]{0,119}\Z")


@dataclass(frozen=True)
class Limits:
    """Caps that keep one client from filling the disk or the GPU queue."""

    upload_bytes: int = 50 * 1024 * 1024  # one uploaded file
    request_bytes: int = 512 * 1024 * 1024  # one request (several photos at once)
    json_bytes: int = 16 * 1024 * 1024  # one JSON request (options, prompts): parsing takes several times its size
    photos_per_set: int = 300
    embedding_bytes: int = 64 * 1024 * 1024
    train_steps: int = 100_000
    train_batch: int = 16
    train_size: int = 1536  # training pixels (SDXL's 1024 and then some; 2048 px steps take minutes each)
    train_accumulation: int = 64  # micro-batches per step
    generate_batch: int = 8  # images drawn at once
    generate_images: int = 100  # images of one request (batch x batch count; A1111 allows 8 x 100)
    generate_steps: int = 150
    generate_side: int = 1536
    workspace_bytes: int = 0  # everything in the workspace together (uploads refused past it); 0: no cap
    connections: int = 64  # open connections and requests at once (each watching page holds one); more get a 503
    header_seconds: float = 10.0  # a request's line and headers must arrive within this of the connection (or of
    # the previous response on a kept-alive one); slower connections are closed, so trickled headers hold no slot


def clean_file_name(name: str) -> str:
    """A safe file name from a client's: the last path component, accents dropped ("Été" -> "Ete"), other odd
    characters replaced, starting with a letter or digit ("_DSC0001.JPG" -> "DSC0001.JPG")."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = unicodedata.normalize("NFKD", base).encode("ascii", "ignore").decode("ascii")
    base = re.sub(r"[^A-Za-z0-9._ -]+", "_", base)
    base = re.sub(r"\.{2,}", ".", base).lstrip(" ._-").rstrip(" .")[:120]
    if not base or not FILE_PATTERN.match(base):
        raise OptionError("file", name, "use a plain file name such as photo-1.jpg")
    stem, dot, suffix = base.partition(".")
    if WINDOWS_RESERVED.match(base):
        base = f"{stem}_{dot}{suffix}"  # "CON.jpg" -> "CON_.jpg": Windows keeps CON for a device
    return base


class Workspace:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.photos = self.root / "photos"
        self.datasets = self.root / "datasets"
        self.embeddings = self.root / "embeddings"
        self.loras = self.root / "loras"
        self.runs = self.root / "runs"
        self.outputs = self.root / "outputs"
        self.jobs = self.root / "jobs"
        for folder in (self.photos, self.datasets, self.embeddings, self.loras, self.runs, self.outputs, self.jobs):
            folder.mkdir(parents=True, exist_ok=True)

    def inside(self, path: Path) -> Path:
        """`path`, resolved, if it is inside the workspace (a symlink planted in it that leads out is not); an
        error otherwise, naming the file but not the server's folders."""
        resolved = path.resolve()
        if self.root not in resolved.parents and resolved != self.root:
            raise OptionError("path", path.name, "leads outside the workspace")
        return resolved

    def _named(self, folder: Path, name: str, field: str) -> Path:
        path = folder / check_name(name, field)
        if path.is_symlink():  # one leading out is refused by inside(); a dangling one too, before any mkdir
            raise OptionError(field, name, "is a symbolic link in the workspace; the server keeps its own folders")
        self.inside(path)
        return path

    def photo_set(self, name: str) -> Path:
        return self._named(self.photos, name, "set")

    def dataset(self, name: str) -> Path:
        return self._named(self.datasets, name, "dataset")

    def run(self, name: str) -> Path:
        return self._named(self.runs, name, "embedding")

    def file_in(self, folder: Path, name: str) -> Path:
        """A file directly inside `folder`, by a client-given name."""
        path = folder / clean_file_name(name)
        self.inside(path)
        if path.parent.resolve() != folder.resolve():
            raise OptionError("file", name, "must be a file directly in its folder")
        return path

    def without_links(self, folder: Path, what: str) -> Path:
        """`folder` (a photo set or prepared set a job will read), refused if it holds symbolic links: one planted
        there would have the job read a file outside the workspace (a picture, a caption, a mask) and the API then
        serve what it made of it."""
        links = sorted(p.name for p in folder.iterdir() if p.is_symlink()) if folder.is_dir() else []
        if links:
            shown = ", ".join(links[:3]) + (f" and {len(links) - 3} more" if len(links) > 3 else "")
            raise DatasetError(
                f"{what} holds symbolic links ({shown}); the server reads only files inside its workspace: "
                "remove them and upload the photos instead"
            )
        return folder

    def remove_stale_temporaries(self) -> int:
        """At start: the temporaries that writes killed midway left (a SIGKILL during an upload), in the folders
        whose files are listed - the embeddings, each photo set and prepared set, the outputs."""
        folders = [self.embeddings, self.loras, self.outputs]
        for parent in (self.photos, self.datasets):
            folders += [p for p in parent.iterdir() if p.is_dir() and not p.is_symlink()] if parent.is_dir() else []
        return sum(remove_stale_temporaries(folder) for folder in folders)

    def used_bytes(self) -> int:
        """The bytes the workspace's files take (links not followed)."""
        total = 0
        for folder, _, files in os.walk(self.root):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(folder, name)).st_size
        return total

    def make_room(self, incoming: int, limits: Limits) -> None:
        """Refuse `incoming` more bytes where they would take the workspace past its cap."""
        if not limits.workspace_bytes:
            return
        used = self.used_bytes()
        if used + incoming > limits.workspace_bytes:
            raise TooFull(
                f"the workspace is full: {size_text(used)} of the {size_text(limits.workspace_bytes)} "
                "this server allows are used; delete photo sets, embeddings or images to make room"
            )

    def sets(self) -> list[str]:
        return sorted(
            p.name for p in self.photos.iterdir() if p.is_dir() and not p.is_symlink() and NAME_PATTERN.match(p.name)
        )

    def prepared(self) -> list[str]:
        return sorted(
            p.name
            for p in self.datasets.iterdir()
            if p.is_dir() and not p.is_symlink() and NAME_PATTERN.match(p.name) and (p / "manifest.json").is_file()
        )
