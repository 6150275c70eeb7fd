"""Photo sets (uploaded photos, as the client sent them) and the prepared sets made from them."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, File, UploadFile
from fastapi.responses import Response

from tistudio.config import PrepareOptions, validate_prepare
from tistudio.errors import OptionError, TistudioError
from tistudio.prepare.dataset import (
    CAPTION_SUFFIXES,
    caption_file,
    image_format,
    is_mask_file,
    mask_file,
    sidecar_caption,
)
from tistudio.server.context import ServerDep, image_response, not_found, options_from_body, public, read_capped
from tistudio.storage import write_bytes

router = APIRouter()
REPORTED = (
    "source",
    "status",
    "reason",
    "caption",
    "faces",
    "yaw",
    "face_fraction",
    "sharpness",
    "upscale",
    "notes",
    "framing",
    "bucket",
)


def is_photo(path: Path) -> bool:
    """A set's photos are its files other than caption sidecars (photo.txt beside photo.jpg) and masks
    (photo.mask.png, OneTrainer's photo-masklabel.png: where the subject is; prepare and training read them)."""
    return (
        not path.name.startswith(".")  # hidden files, and the temporaries of writes in progress or killed
        and path.is_file()
        and path.suffix.lower() not in CAPTION_SUFFIXES
        and not is_mask_file(path.name)
    )


def caption_of(photo: Path) -> str | None:
    """The photo's caption as prepare and training read it (dataset.sidecar_caption), on one line; None if none."""
    text = sidecar_caption(photo)
    return " ".join(text.split()) if text is not None else None


@router.get("/api/photosets")
def photo_sets(server: ServerDep) -> list[dict[str, Any]]:
    workspace = server.workspace
    out = []
    for name in workspace.sets():
        folder = workspace.photo_set(name)
        out.append(
            {
                "name": name,
                "photos": sum(1 for p in folder.iterdir() if is_photo(p)),
                "prepared": (workspace.dataset(name) / "manifest.json").is_file(),
            }
        )
    return out


def set_folder(server: Any, name: str) -> Path:
    """The photo set `name`, made if it is new; refused where it differs from an existing set only in case
    ('TomTut' beside 'tomtut': one word in a prompt, and embeddings refuse such twins too)."""
    folder = server.workspace.photo_set(name)
    if not folder.is_dir():
        twin = next((other for other in server.workspace.sets() if other.lower() == name.lower()), None)
        if twin is not None:
            raise OptionError("set", name, f"differs from the set {twin!r} only in case; use {twin!r}")
        folder.mkdir(exist_ok=True)
    return folder


@router.post("/api/photosets/{name}")
def new_set(name: str, server: ServerDep) -> dict[str, Any]:
    set_folder(server, name)
    return {"name": name, "photos": 0, "prepared": False}


@router.get("/api/photosets/{name}")
def photo_set(name: str, server: ServerDep) -> dict[str, Any]:
    folder = server.workspace.photo_set(name)
    if not folder.is_dir():
        raise not_found(f"photo set {name}")
    files = sorted(p for p in folder.iterdir() if is_photo(p))
    masks = {p: mask_file(p) for p in files}
    return {
        "name": name,
        "photos": [
            {
                "file": p.name,
                "bytes": p.stat().st_size,
                "url": f"/api/photosets/{name}/photos/{p.name}",
                "mask": masks[p].name if masks[p] else None,
                "caption": caption_of(p),
            }
            for p in files
        ],
    }


@router.post("/api/photosets/{name}/photos")
async def upload_photos(name: str, files: Annotated[list[UploadFile], File()], server: ServerDep) -> dict[str, Any]:
    """Each file is kept or refused on its own: photos by content (any name, accents and all, made safe), caption
    sidecars (.txt) as text; refused files are named with the reason. Nothing kept: the refusal is the answer."""
    workspace, limits = server.workspace, server.limits
    folder = set_folder(server, name)
    existing = sum(1 for p in folder.iterdir() if is_photo(p))
    if existing + len(files) > limits.photos_per_set:
        raise OptionError(
            "files",
            len(files),
            f"a photo set holds at most {limits.photos_per_set} photos; {name} holds {existing}, so at most "
            f"{max(0, limits.photos_per_set - existing)} more can be added",
        )
    saved, refused, first_error = [], [], None
    for upload in files:
        try:
            saved.append(await _keep_upload(workspace, folder, upload, limits))
        except TistudioError as exc:  # the reason alone: the answer names the file beside it
            first_error = first_error or exc
            reason = exc.fix if isinstance(exc, OptionError) and exc.field == "files" else str(exc)
            refused.append({"file": upload.filename or "", "reason": " ".join(reason.split())})
    if not saved and first_error is not None:
        if len(refused) > 1:
            raise OptionError("files", len(refused), "; ".join(f"{r['file']}: {r['reason']}" for r in refused)[:900])
        raise first_error
    photos = [file for file in saved if Path(file).suffix.lower() not in CAPTION_SUFFIXES]
    return {"saved": saved, "photos": len(photos), "captions": len(saved) - len(photos), "refused": refused}


async def _keep_upload(workspace: Any, folder: Path, upload: UploadFile, limits: Any) -> str:

    target = workspace.file_in(folder, upload.filename or "")
    data = await read_capped(upload, limits.upload_bytes)
    await asyncio.to_thread(workspace.make_room, len(data), limits)
    if target.suffix.lower() in CAPTION_SUFFIXES:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            raise OptionError("files", upload.filename, "a caption file must be UTF-8 text") from None
    elif image_format(data[:32]) is None:
        raise OptionError(
            "files", upload.filename, "not a photo: its content is not JPEG, PNG, WebP, GIF, BMP, TIFF or HEIC"
        )
    if target.exists() and target.read_bytes() != data:  # another photo that cleans to the same name
        stem, suffix, number = target.stem, target.suffix, 2
        while target.exists():
            target = target.with_name(f"{stem}-{number}{suffix}")
            number += 1
    write_bytes(target, data)
    return target.name


@router.get("/api/photosets/{name}/photos/{file}")
def photo(name: str, file: str, server: ServerDep, thumb: int = 0) -> Response:
    path = server.workspace.file_in(server.workspace.photo_set(name), file)
    if not path.is_file():
        raise not_found(file)
    if thumb:
        return Response(
            thumbnail(path, min(max(thumb, 32), 512)), media_type="image/jpeg", headers={"Cache-Control": "no-cache"}
        )
    return image_response(path)


@router.delete("/api/photosets/{name}/photos/{file}")
def delete_photo(name: str, file: str, server: ServerDep) -> dict[str, Any]:
    path = server.workspace.file_in(server.workspace.photo_set(name), file)
    if not path.is_file():
        raise not_found(file)
    beside = mask_file(path) if is_photo(path) else None
    path.unlink()
    if beside is not None:  # a mask left behind would silently apply to the next photo of that name
        beside.unlink(missing_ok=True)
    return {"deleted": path.name, **({"mask": beside.name} if beside is not None else {})}


@router.post("/api/photosets/{name}/prepare")
def prepare_set(name: str, server: ServerDep, body: dict[str, Any] | None = None) -> dict[str, Any]:
    workspace = server.workspace
    folder = workspace.photo_set(name)
    if not folder.is_dir():
        raise not_found(f"photo set {name}")
    body, native = dict(body or {}), server.native_size()
    if "size" not in body and native:
        body["size"] = native  # the served model's size, as the page's form says
    options = options_from_body(PrepareOptions, body, photos=str(folder), out=str(workspace.dataset(name)))
    validate_prepare(options)
    workspace.without_links(folder, f"photo set {name}")  # and again when the job runs
    return server.workers.submit("prepare", {"set": name, **public(options)}).public()


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
        pictures = [o for o in item.get("outputs", []) if o.endswith(".png")]
        items.append(
            {
                **{k: item.get(k) for k in REPORTED},
                "images": [f"/api/datasets/{name}/files/{o}" for o in pictures if not is_mask_file(o)],
                "masks": [f"/api/datasets/{name}/files/{o}" for o in pictures if is_mask_file(o)],
            }
        )
    return {"name": name, "verdict": data.get("verdict", []), "options": data.get("options", {}), "items": items}


@router.get("/api/datasets/{name}/files/{file}")
def dataset_file(name: str, file: str, server: ServerDep) -> Response:
    return image_response(server.workspace.file_in(server.workspace.dataset(name), file))


def thumbnail(path: Path, side: int) -> bytes:
    from tistudio.errors import DatasetError
    from tistudio.prepare.dataset import read_image

    try:
        image, _ = read_image(path, box=side)
    except DatasetError as exc:
        raise OptionError("file", path.name, f"cannot be shown: {exc}") from None
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


# -- a set's captions, and the set itself -------------------------------------------------------------------------

MAX_CAPTION = 2000  # characters: a caption is a line of tags or a sentence


def set_in_use(server: Any, name: str) -> None:
    """Refuse to change a set a job running or waiting reads."""
    for job in server.store.all():
        if job.status in ("running", "queued") and f"set:{name}" in job.resources():
            raise OptionError(
                "set", name, f"{job.kind} job {job.id} uses this set ({job.status}); stop or cancel it first"
            )


def existing_set(server: Any, name: str) -> Path:
    folder = server.workspace.photo_set(name)
    if not folder.is_dir():
        raise not_found(f"photo set {name}")
    return folder


@router.put("/api/photosets/{name}/photos/{file}/caption")
def set_caption(name: str, file: str, body: dict[str, Any], server: ServerDep) -> dict[str, Any]:
    """Write a photo's caption (PHOTO.txt beside it, which prepare's caption_action and [filewords] read); an empty
    text removes it."""
    photo = server.workspace.file_in(existing_set(server, name), file)
    if not (photo.is_file() and is_photo(photo)):
        raise not_found(file)
    text = body.get("text") if isinstance(body, dict) else None
    if not isinstance(text, str) or "\x00" in text:
        raise OptionError("text", text, 'send the caption as text: {"text": "smiling, on a beach"}')
    text = " ".join(text.split())  # one line, as captions are read
    if len(text) > MAX_CAPTION:
        raise OptionError("text", f"{len(text)} characters", f"a caption has at most {MAX_CAPTION} characters")
    set_in_use(server, name)
    sidecar = caption_file(photo) or photo.with_suffix(".txt")  # the file the caption is read from
    if text:
        write_bytes(sidecar, (text + "\n").encode("utf-8"))
    else:
        sidecar.unlink(missing_ok=True)
    return {"file": photo.name, "caption": text}


@router.delete("/api/photosets/{name}")
def delete_set(name: str, server: ServerDep) -> dict[str, Any]:
    """Delete a photo set and the prepared set made from it (embeddings and runs trained on it stay)."""
    import shutil

    folder = existing_set(server, name)
    set_in_use(server, name)
    for path in (folder, server.workspace.dataset(name)):
        if path.is_symlink():  # a link planted in place of the folder: take the link away, not what it leads to
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)  # links inside are removed, never followed
    return {"deleted": name}


@router.post("/api/photosets/{name}/rename")
def rename_set(name: str, body: dict[str, Any], server: ServerDep) -> dict[str, Any]:
    """Rename a photo set and its prepared set."""
    from tistudio.config import check_name

    folder = existing_set(server, name)
    new = check_name(str(body.get("to", "")) if isinstance(body, dict) else "", "to")
    if new == name:
        return {"name": name}
    twin = next((other for other in server.workspace.sets() if other.lower() == new.lower()), None)
    if twin is not None and twin != name:
        raise OptionError("to", new, f"there is a set {twin!r} already; choose another name or delete it first")
    set_in_use(server, name)
    prepared = server.workspace.dataset(name)
    folder.rename(server.workspace.photo_set(new))
    if prepared.is_dir():
        prepared.rename(server.workspace.dataset(new))
    return {"name": new}
