"""Photo sets (uploaded photos, as the client sent them) and the prepared sets made from them."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, File, UploadFile
from fastapi.responses import Response

from ...config import PrepareOptions, validate_prepare
from ...errors import OptionError
from ..context import ServerDep, image_response, not_found, options_from_body, public, read_capped

router = APIRouter()
REPORTED = ("source", "status", "reason", "caption", "faces", "yaw", "face_fraction", "sharpness", "upscale",
            "notes", "framing")


@router.get("/api/photosets")
def photo_sets(server: ServerDep) -> list[dict[str, Any]]:
    workspace = server.workspace
    out = []
    for name in workspace.sets():
        folder = workspace.photo_set(name)
        out.append({"name": name, "photos": sum(1 for p in folder.iterdir() if p.is_file()),
                    "prepared": (workspace.dataset(name) / "manifest.json").is_file()})
    return out


@router.post("/api/photosets/{name}")
def new_set(name: str, server: ServerDep) -> dict[str, Any]:
    server.workspace.photo_set(name).mkdir(exist_ok=True)
    return {"name": name, "photos": 0, "prepared": False}


@router.get("/api/photosets/{name}")
def photo_set(name: str, server: ServerDep) -> dict[str, Any]:
    folder = server.workspace.photo_set(name)
    if not folder.is_dir():
        raise not_found(f"photo set {name}")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    return {"name": name, "photos": [{"file": p.name, "bytes": p.stat().st_size,
                                      "url": f"/api/photosets/{name}/photos/{p.name}"} for p in files]}


@router.post("/api/photosets/{name}/photos")
async def upload_photos(name: str, files: Annotated[list[UploadFile], File()], server: ServerDep) -> dict[str, Any]:
    from ...storage import write_bytes

    workspace, limits = server.workspace, server.limits
    folder = workspace.photo_set(name)
    folder.mkdir(exist_ok=True)
    existing = sum(1 for p in folder.iterdir() if p.is_file())
    if existing + len(files) > limits.photos_per_set:
        raise OptionError("files", len(files), f"a photo set holds at most {limits.photos_per_set} photos")
    saved = []
    for upload in files:
        target = workspace.file_in(folder, upload.filename or "")
        write_bytes(target, await read_capped(upload, limits.upload_bytes))
        saved.append(target.name)
    return {"saved": saved}


@router.get("/api/photosets/{name}/photos/{file}")
def photo(name: str, file: str, server: ServerDep, thumb: int = 0) -> Response:
    path = server.workspace.file_in(server.workspace.photo_set(name), file)
    if not path.is_file():
        raise not_found(file)
    if thumb:
        return Response(thumbnail(path, min(max(thumb, 32), 512)), media_type="image/jpeg",
                        headers={"Cache-Control": "no-cache"})
    return image_response(path)


@router.delete("/api/photosets/{name}/photos/{file}")
def delete_photo(name: str, file: str, server: ServerDep) -> dict[str, Any]:
    path = server.workspace.file_in(server.workspace.photo_set(name), file)
    if not path.is_file():
        raise not_found(file)
    path.unlink()
    return {"deleted": path.name}


@router.post("/api/photosets/{name}/prepare")
def prepare_set(name: str, server: ServerDep, body: dict[str, Any] | None = None) -> dict[str, Any]:
    workspace = server.workspace
    folder = workspace.photo_set(name)
    if not folder.is_dir():
        raise not_found(f"photo set {name}")
    options = options_from_body(PrepareOptions, body or {}, photos=str(folder), out=str(workspace.dataset(name)))
    validate_prepare(options)
    return server.worker.submit("prepare", {"set": name, **public(options)}).public()


@router.get("/api/datasets")
def datasets(server: ServerDep) -> list[str]:
    return server.workspace.prepared()


@router.get("/api/datasets/{name}")
def dataset(name: str, server: ServerDep) -> dict[str, Any]:
    manifest = server.workspace.dataset(name) / "manifest.json"
    if not manifest.is_file():
        raise not_found(f"prepared set {name}")
    data = json.loads(manifest.read_text("utf-8"))
    items = []
    for item in data.get("files", {}).values():
        images = [o for o in item.get("outputs", []) if o.endswith(".png")]
        items.append({**{k: item.get(k) for k in REPORTED},
                      "images": [f"/api/datasets/{name}/files/{o}" for o in images]})
    return {"name": name, "verdict": data.get("verdict", []), "options": data.get("options", {}), "items": items}


@router.get("/api/datasets/{name}/files/{file}")
def dataset_file(name: str, file: str, server: ServerDep) -> Response:
    return image_response(server.workspace.file_in(server.workspace.dataset(name), file))


def thumbnail(path: Path, side: int) -> bytes:
    from ...dataset import read_image
    from ...errors import DatasetError

    try:
        image, _ = read_image(path)
    except DatasetError as exc:
        raise OptionError("file", path.name, f"cannot be shown: {exc}") from None
    image.thumbnail((side, side))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()
