"""Embeddings in the workspace: list, create (a job), read, download, delete, upload from another tool."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import FileResponse

from tistudio.config import CreateOptions, check_name, validate_create
from tistudio.embeddings.bundle import describe_lora, list_lora_files, read_lora
from tistudio.embeddings.files import describe, import_embedding, list_embedding_files, read_embedding
from tistudio.errors import EmbeddingError, OptionError, TistudioError
from tistudio.server.context import (
    Server,
    ServerDep,
    embedding_path,
    not_found,
    options_from_body,
    public,
    read_capped,
)
from tistudio.server.workspace import clean_file_name

router = APIRouter()


def shown(path: Path) -> dict[str, Any]:
    """What a client sees of an embedding file: describe() without the server's path."""
    info = describe(read_embedding(path), path)
    info.pop("file", None)
    return info


@router.get("/api/embeddings")
def embeddings(server: ServerDep) -> list[dict[str, Any]]:
    out = []
    for name, path in sorted(list_embedding_files(server.workspace.embeddings).items()):
        try:
            server.workspace.inside(path)  # a symlink planted in the folder that leads out is not read
            info = shown(path)
        except TistudioError as exc:
            info = {"name": name, "error": str(exc)}
        info["run"] = (server.workspace.runs / name / "loss.csv").is_file()
        info["lora"] = lora_of(server, info)
        out.append(info)
    return out


def lora_of(server: Server, info: dict[str, Any]) -> dict[str, Any] | None:
    """The LoRA a word was trained with (pivotal tuning): its rank, file name and whether the file is there."""
    name = info.get("lora")
    if not isinstance(name, str) or not name:
        return None
    present = (server.workspace.loras / f"{name}.safetensors").is_file()
    return {"name": name, "rank": info.get("lora_rank", ""), "file": f"{name}.safetensors", "present": present}


@router.get("/api/loras")
def loras(server: ServerDep) -> list[dict[str, Any]]:
    """The workspace's LoRAs as inspect describes them (no server paths)."""
    out = []
    for name, path in sorted(list_lora_files(server.workspace.loras).items()):
        try:
            server.workspace.inside(path)
            out.append(describe_lora(read_lora(path)))
        except TistudioError as exc:
            out.append({"name": name, "error": str(exc)})
    return out


@router.get("/api/loras/{name}/file")
def download_lora(name: str, server: ServerDep) -> FileResponse:
    path = server.workspace.inside(server.workspace.loras / f"{check_name(name)}.safetensors")
    if not path.is_file():
        raise not_found(f"LoRA {name}")
    return FileResponse(path, media_type="application/octet-stream", filename=path.name)


def create_options(body: Any, server: Server) -> CreateOptions:
    options = options_from_body(
        CreateOptions, body, model=server.config.model.model, embeddings_dir=str(server.workspace.embeddings)
    )
    validate_create(options)
    return options


@router.post("/api/embeddings")
def create(body: dict[str, Any], server: ServerDep) -> dict[str, Any]:
    return server.workers.submit("create", public(create_options(body, server))).public()


@router.get("/api/embeddings/{name}")
def embedding(name: str, server: ServerDep) -> dict[str, Any]:
    return shown(embedding_path(server.workspace, name))


@router.get("/api/embeddings/{name}/file")
def download(name: str, server: ServerDep) -> FileResponse:
    path = embedding_path(server.workspace, name)
    return FileResponse(path, media_type="application/octet-stream", filename=path.name)


@router.delete("/api/embeddings/{name}")
def delete_embedding(name: str, server: ServerDep) -> dict[str, Any]:
    path = embedding_path(server.workspace, name)
    training = [
        job
        for job in server.store.all()
        if job.kind == "train"
        and job.status in ("queued", "running")
        and str(job.request.get("embedding", "")).lower() == name.lower()
    ]
    if training:
        raise OptionError(
            "name",
            name,
            f"is being trained ({training[0].status}); stop that training first, "
            "or its next save would bring the file back",
        )
    path.unlink()
    return {"deleted": name}


@router.post("/api/embeddings/upload")
async def upload_embedding(
    file: Annotated[UploadFile, File()], server: ServerDep, name: Annotated[str, Form()] = ""
) -> dict[str, Any]:
    from tistudio.storage import write_bytes

    folder = server.workspace.embeddings
    name = check_name(name or Path(clean_file_name(file.filename or "")).stem)
    staging = folder / f".upload-{name}.tmp"
    data = await read_capped(file, server.limits.embedding_bytes)
    await asyncio.to_thread(server.workspace.make_room, len(data), server.limits)
    await asyncio.to_thread(write_bytes, staging, data)
    try:  # reading and checking the file is blocking work: off the event loop, so other requests go on
        saved = await asyncio.to_thread(import_embedding, staging, folder, name)
    except EmbeddingError as exc:  # named as the client sent it, not as the staging file it was read from
        raise EmbeddingError(str(exc).replace(str(staging), file.filename or name)) from None
    finally:
        staging.unlink(missing_ok=True)
    return await asyncio.to_thread(shown, saved)
