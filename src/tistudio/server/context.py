"""What every route shares: the server's configuration and state (one `Server` per app, reached through
`request.app.state`, never a global), the errors that become 404 and 413, and the small helpers that turn a
client's JSON into options and files into responses."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request, UploadFile
from fastapi.responses import FileResponse

from tistudio.config import ModelOptions, check_fields, check_name, from_dict
from tistudio.errors import OptionError, TistudioError
from tistudio.server.a1111 import Settings
from tistudio.server.jobs import Job, JobStore, Workers
from tistudio.server.workspace import Limits, Workspace
from tistudio.storage import size_text

# Fields the server decides; clients never send paths or pick the model.
SERVER_FIELDS = {
    "model",
    "device",
    "precision",
    "prediction_type",
    "embeddings_dir",
    "loras_dir",
    "run_dir",
    "out_dir",
    "photos",
    "out",
    "dataset",
}
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}


@dataclass
class ServerConfig:
    workspace: Path
    model: ModelOptions
    cache_dir: Path
    auth: list[tuple[str, str]] = field(default_factory=list)
    listening: bool = False
    limits: Limits = field(default_factory=Limits)
    devices: tuple[str, ...] = ("",)  # one worker per device; "" is the model options' own device
    # Addresses of reverse proxies whose X-Forwarded-For is believed (comma-separated); "": none, the connection's
    # own address is the client's (what the password lockout counts)
    trusted_proxies: str = ""


@dataclass
class Server:
    """One running server: its configuration, workspace, job store and the workers (one per device, each owning
    its model)."""

    config: ServerConfig
    workspace: Workspace
    store: JobStore
    workers: Workers
    a1111: Settings = field(default_factory=Settings)  # what A1111 clients set through /sdapi/v1/options
    read_width: list[int | None] = field(default_factory=list)  # the served model's width, once read (empty: not yet)

    def model_width(self) -> int | None:
        """The width embeddings must have for the served model: the loaded model's, or - before the first job
        loads it - read from its configs or header (models/loading.py: model_width), once."""
        if self.workers.model is not None:
            return int(self.workers.model.width)
        if not self.read_width:
            from tistudio.models.loading import model_width

            self.read_width.append(model_width(self.config.model, self.config.cache_dir))
        return self.read_width[0]

    @property
    def limits(self) -> Limits:
        return self.config.limits

    def native_size(self) -> int | None:
        """The served model's native picture size where it is known without loading a checkpoint: the loaded
        model's, or a built-in demo's (64 px). Preparing photos defaults to it (the demo's photos are 64 px, and
        preparing them at 512 refused all of them as too small)."""
        if self.workers.model is not None:
            return int(self.workers.model.native_size)
        from tistudio.models.loading import DEMOS

        return 64 if self.config.model.model in DEMOS else None

    def close(self) -> None:
        """Begin shutting down: the running job stops at its next step (training saves), and event streams and
        waiting requests end, so that no watching page holds the server open."""
        self.workers.shutdown()
        self.store.close()


def get_server(request: Request) -> Server:
    return request.app.state.server


ServerDep = Annotated[Server, Depends(get_server)]


class NotFound(TistudioError):
    """Answered with 404."""


class TooLarge(TistudioError):
    """Answered with 413."""


def not_found(what: str) -> NotFound:
    return NotFound(f"{what} does not exist")


def schema(cls: type, hidden: set[str] = SERVER_FIELDS) -> list[dict[str, Any]]:
    """The form of an options class, from its fields' metadata: what the web page renders."""
    out = []
    for f in dataclasses.fields(cls):
        if f.name in hidden:
            continue
        kind = {bool: "bool", int: "int", float: "float"}.get(type(f.default), "str")
        meta = f.metadata
        # a server takes no paths, so a field's suggestions are its only choices here
        choices = meta.get("choices") or meta.get("suggestions")
        out.append(
            {
                "name": f.name,
                "type": kind,
                "default": f.default,
                "label": meta.get("label") or f.name.replace("_", " ").capitalize(),
                "help": meta.get("page_help") or meta.get("help", ""),
                "choices": list(choices) if choices else None,
                "minimum": meta.get("minimum"),
                "maximum": meta.get("maximum"),
                "required": bool(meta.get("required")),
                "advanced": bool(meta.get("advanced")),
                "widget": meta.get("widget", ""),
            }
        )
    return out


def options_from_body(cls: type, body: Any, **server: Any) -> Any:
    """Options from a client's JSON: unknown keys and server-only keys are refused, then every field is checked
    (a field with suggestions takes only those here)."""
    if not isinstance(body, dict):
        raise OptionError("body", type(body).__name__, "send a JSON object")
    named = sorted(set(body) & SERVER_FIELDS)
    if named:
        raise OptionError(named[0], body[named[0]], "is decided by the server and cannot be sent")
    options = from_dict(cls, {**body, **server})
    check_fields(options)
    for f in dataclasses.fields(cls):
        suggested = f.metadata.get("suggestions")
        if suggested and getattr(options, f.name) not in suggested:
            raise OptionError(f.name, getattr(options, f.name), f"choose one of: {', '.join(suggested)}")
    return options


def public(options: Any) -> dict[str, Any]:
    """The options a client chose (what a job records and a resume repeats); paths and the model are left out."""
    return {k: v for k, v in dataclasses.asdict(options).items() if k not in SERVER_FIELDS}


def image_response(path: Path) -> FileResponse:
    if not path.is_file():
        raise not_found(path.name)
    return FileResponse(
        path,
        media_type=IMAGE_TYPES.get(path.suffix.lower(), "application/octet-stream"),
        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
    )


async def read_capped(upload: UploadFile, limit: int) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(f"{upload.filename}: larger than {size_text(limit)}, the most this server accepts")
    return data


def embedding_path(workspace: Workspace, name: str) -> Path:
    path = workspace.embeddings / f"{check_name(name, 'embedding')}.safetensors"
    workspace.inside(path)
    if not path.is_file():
        raise not_found(f"embedding {name}")
    return path


def job_or_404(store: JobStore, job_id: str) -> Job:
    found = store.get(job_id)
    if found is None:
        raise not_found(f"job {job_id}")
    return found
