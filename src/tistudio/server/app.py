"""The HTTP API and the web page (FastAPI). Create it with :func:`create_app`; `tistudio serve` runs it.

Everything long (preparing, training, generating, creating) is a job on one worker thread that owns the model;
the calls return at once with the job, and ``GET /api/jobs/ID/events`` streams its progress (Server-Sent
Events). An A1111-compatible subset (``/sdapi/v1/embeddings``, ``txt2img``, ``progress``, ``interrupt``) lets
existing clients work. Safe by default: see security.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import io
import json
import logging
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse

from .. import __version__
from ..config import (
    CreateOptions,
    GenerateOptions,
    ModelOptions,
    PrepareOptions,
    TrainOptions,
    check_fields,
    check_name,
    from_dict,
    parse_size,
)
from ..errors import OptionError, TistudioError
from ..samplers import SAMPLERS, check_sampler
from .jobs import FINISHED, Job, JobStore, Worker
from .security import SecurityMiddleware
from .workspace import Limits, Workspace, clean_file_name

log = logging.getLogger(__name__)

# Fields the server decides; clients never send paths or pick the model.
SERVER_FIELDS = {"model", "device", "precision", "prediction_type", "embeddings_dir", "run_dir", "out_dir",
                 "photos", "out", "dataset"}
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}


@dataclass
class ServerConfig:
    workspace: Path
    model: ModelOptions
    cache_dir: Path
    auth: list[tuple[str, str]] = field(default_factory=list)
    listening: bool = False
    limits: Limits = field(default_factory=Limits)


def schema(cls: type, hidden: set[str]) -> list[dict[str, Any]]:
    """The form of an options class: what the web page renders."""
    out = []
    for f in dataclasses.fields(cls):
        if f.name in hidden:
            continue
        kind = {bool: "bool", int: "int", float: "float"}.get(type(f.default), "str")
        meta = f.metadata
        # a server takes no paths, so a field's suggestions are its only choices here
        choices = meta.get("choices") or meta.get("suggestions")
        out.append({"name": f.name, "type": kind, "default": f.default, "help": meta.get("help", ""),
                    "choices": list(choices) if choices else None, "minimum": meta.get("minimum"),
                    "maximum": meta.get("maximum"), "required": bool(meta.get("required")),
                    "advanced": bool(meta.get("advanced")), "widget": meta.get("widget", "")})
    return out


def _options(cls: type, body: dict[str, Any], **server: Any) -> Any:
    """Options from a client's JSON: unknown keys and server-only keys are refused, then every field is checked."""
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


def _image_response(path: Path) -> FileResponse:
    if not path.is_file():
        raise _not_found(path.name)
    return FileResponse(path, media_type=IMAGE_TYPES.get(path.suffix.lower(), "application/octet-stream"),
                        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})


class NotFound(TistudioError):
    pass


def _not_found(what: str) -> NotFound:
    return NotFound(f"{what} does not exist")


def create_app(config: ServerConfig) -> FastAPI:
    workspace = Workspace(config.workspace)
    store = JobStore(workspace.jobs)
    limits = config.limits
    model_options = config.model
    handlers = make_handlers(workspace, config)
    worker = Worker(store, handlers)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if not worker.is_alive():
            worker.start()
        yield
        worker.shutdown()

    app = FastAPI(title="tistudio", version=__version__, description="Textual-inversion training and generation.",
                  lifespan=lifespan)
    app.add_middleware(SecurityMiddleware, auth=config.auth, listening=config.listening,
                       max_body=limits.request_bytes)
    app.state.worker = worker
    app.state.store = store
    app.state.workspace = workspace

    @app.exception_handler(TistudioError)
    async def user_error(request: Request, exc: TistudioError) -> JSONResponse:
        status = 404 if isinstance(exc, NotFound) else 413 if isinstance(exc, TooLarge) else 400
        body: dict[str, Any] = {"error": " ".join(str(exc).split())}
        if isinstance(exc, OptionError):
            body["field"] = exc.field
        return JSONResponse(body, status_code=status)

    # -- the page -----------------------------------------------------------------------------------------------
    static = resources.files("tistudio").joinpath("server", "static")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse(static.joinpath("index.html").read_text("utf-8"), headers={"Cache-Control": "no-cache"})

    @app.get("/static/{name}", include_in_schema=False)
    def static_file(name: str) -> Response:
        if name not in ("app.js", "app.css"):
            raise _not_found(name)
        media = "text/javascript" if name.endswith(".js") else "text/css"
        return Response(static.joinpath(name).read_bytes(), media_type=media, headers={"Cache-Control": "no-cache"})

    # -- status and forms ---------------------------------------------------------------------------------------
    @app.get("/api/status")
    def status() -> dict[str, Any]:
        current = worker.current
        return {"version": __version__, "model": model_options.model, "demo": model_options.model == "demo",
                "model_loaded": worker.model.describe() if worker.model is not None else None,
                "busy": current.public() if current else None, "queued": worker.waiting(),
                "limits": dataclasses.asdict(limits)}

    @app.get("/api/schema")
    def forms() -> dict[str, Any]:
        return {"prepare": schema(PrepareOptions, SERVER_FIELDS), "create": schema(CreateOptions, SERVER_FIELDS),
                "train": schema(TrainOptions, SERVER_FIELDS),
                "generate": schema(GenerateOptions, SERVER_FIELDS), "samplers": list(SAMPLERS)}

    # -- photos -------------------------------------------------------------------------------------------------
    @app.get("/api/photosets")
    def photo_sets() -> list[dict[str, Any]]:
        out = []
        for name in workspace.sets():
            folder = workspace.photo_set(name)
            out.append({"name": name, "photos": sum(1 for p in folder.iterdir() if p.is_file()),
                        "prepared": (workspace.dataset(name) / "manifest.json").is_file()})
        return out

    @app.post("/api/photosets/{name}")
    def new_set(name: str) -> dict[str, Any]:
        workspace.photo_set(name).mkdir(exist_ok=True)
        return {"name": name, "photos": 0, "prepared": False}

    @app.get("/api/photosets/{name}")
    def photo_set(name: str) -> dict[str, Any]:
        folder = workspace.photo_set(name)
        if not folder.is_dir():
            raise _not_found(f"photo set {name}")
        files = sorted(p for p in folder.iterdir() if p.is_file())
        return {"name": name, "photos": [{"file": p.name, "bytes": p.stat().st_size,
                                          "url": f"/api/photosets/{name}/photos/{p.name}"} for p in files]}

    @app.post("/api/photosets/{name}/photos")
    async def upload_photos(name: str, files: Annotated[list[UploadFile], File()]) -> dict[str, Any]:
        folder = workspace.photo_set(name)
        folder.mkdir(exist_ok=True)
        existing = sum(1 for p in folder.iterdir() if p.is_file())
        if existing + len(files) > limits.photos_per_set:
            raise OptionError("files", len(files), f"a photo set holds at most {limits.photos_per_set} photos")
        saved = []
        for upload in files:
            target = workspace.file_in(folder, upload.filename or "")
            data = await _read_capped(upload, limits.upload_bytes)
            from ..storage import write_bytes

            write_bytes(target, data)
            saved.append(target.name)
        return {"saved": saved}

    @app.get("/api/photosets/{name}/photos/{file}")
    def photo(name: str, file: str, thumb: int = 0) -> Response:
        path = workspace.file_in(workspace.photo_set(name), file)
        if not path.is_file():
            raise _not_found(file)
        if thumb:
            return Response(_thumbnail(path, min(max(thumb, 32), 512)), media_type="image/jpeg",
                            headers={"Cache-Control": "no-cache"})
        return _image_response(path)

    @app.delete("/api/photosets/{name}/photos/{file}")
    def delete_photo(name: str, file: str) -> dict[str, Any]:
        path = workspace.file_in(workspace.photo_set(name), file)
        if not path.is_file():
            raise _not_found(file)
        path.unlink()
        return {"deleted": path.name}

    @app.post("/api/photosets/{name}/prepare")
    def prepare_set(name: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        folder = workspace.photo_set(name)
        if not folder.is_dir():
            raise _not_found(f"photo set {name}")
        options = _options(PrepareOptions, body or {}, photos=str(folder), out=str(workspace.dataset(name)))
        from ..config import validate_prepare

        validate_prepare(options)
        return worker.submit("prepare", {"set": name, **_public(options)}).public()

    @app.get("/api/datasets")
    def datasets() -> list[str]:
        return workspace.prepared()

    @app.get("/api/datasets/{name}")
    def dataset(name: str) -> dict[str, Any]:
        manifest = workspace.dataset(name) / "manifest.json"
        if not manifest.is_file():
            raise _not_found(f"prepared set {name}")
        data = json.loads(manifest.read_text("utf-8"))
        items = []
        for item in data.get("files", {}).values():
            images = [o for o in item.get("outputs", []) if o.endswith(".png")]
            items.append({**{k: item.get(k) for k in ("source", "status", "reason", "caption", "faces", "yaw",
                                                       "face_fraction", "sharpness", "upscale", "notes", "framing")},
                          "images": [f"/api/datasets/{name}/files/{o}" for o in images]})
        return {"name": name, "verdict": data.get("verdict", []), "options": data.get("options", {}), "items": items}

    @app.get("/api/datasets/{name}/files/{file}")
    def dataset_file(name: str, file: str) -> Response:
        return _image_response(workspace.file_in(workspace.dataset(name), file))

    # -- embeddings -----------------------------------------------------------------------------------------------
    @app.get("/api/embeddings")
    def embeddings() -> list[dict[str, Any]]:
        from ..embedding import describe, list_embedding_files, read_embedding

        out = []
        for name, path in sorted(list_embedding_files(workspace.embeddings).items()):
            try:
                info = describe(read_embedding(path), path)
            except TistudioError as exc:
                info = {"name": name, "error": str(exc)}
            info.pop("file", None)
            info["run"] = (workspace.runs / name / "loss.csv").is_file()
            out.append(info)
        return out

    @app.post("/api/embeddings")
    def create(body: dict[str, Any]) -> dict[str, Any]:
        options = _options(CreateOptions, body, model=model_options.model,
                           embeddings_dir=str(workspace.embeddings))
        from ..config import validate_create

        validate_create(options)
        return worker.submit("create", _public(options)).public()

    @app.get("/api/embeddings/{name}")
    def embedding(name: str) -> dict[str, Any]:
        from ..embedding import describe, read_embedding

        path = _embedding_path(workspace, name)
        info = describe(read_embedding(path), path)
        info.pop("file", None)
        return info

    @app.get("/api/embeddings/{name}/file")
    def download(name: str) -> FileResponse:
        path = _embedding_path(workspace, name)
        return FileResponse(path, media_type="application/octet-stream", filename=path.name)

    @app.delete("/api/embeddings/{name}")
    def delete_embedding(name: str) -> dict[str, Any]:
        path = _embedding_path(workspace, name)
        path.unlink()
        return {"deleted": name}

    @app.post("/api/embeddings/upload")
    async def upload_embedding(file: Annotated[UploadFile, File()],
                               name: Annotated[str, Form()] = "") -> dict[str, Any]:
        from ..embedding import describe, read_embedding, write_embedding
        from ..storage import write_bytes

        stem = Path(clean_file_name(file.filename or "")).stem
        name = check_name(name or stem)
        target = workspace.embeddings / f"{name}.safetensors"
        if target.exists():
            raise OptionError("name", name, "an embedding with this name exists; delete it first or pick another name")
        data = await _read_capped(file, limits.embedding_bytes)
        staging = workspace.embeddings / f".upload-{name}.tmp"
        write_bytes(staging, data)
        try:
            embedding = read_embedding(staging)  # by content; pickles only through the restricted unpickler
        finally:
            staging.unlink(missing_ok=True)
        saved = write_embedding(dataclasses.replace(embedding, name=name), target)
        info = describe(read_embedding(saved), saved)
        info.pop("file", None)
        return info

    # -- training -------------------------------------------------------------------------------------------------
    @app.post("/api/train")
    def start_training(body: dict[str, Any]) -> dict[str, Any]:
        body = dict(body or {})
        set_name = check_name(str(body.pop("set", "")), "set")
        folder = workspace.dataset(set_name)
        if not (folder / "manifest.json").is_file():
            folder = workspace.photo_set(set_name)
            if not folder.is_dir():
                raise OptionError("set", set_name, "no photo set or prepared set of this name")
        name = check_name(str(body.get("embedding", "")), "embedding")
        options = _options(TrainOptions, body, model=model_options.model, dataset=str(folder),
                           embeddings_dir=str(workspace.embeddings), run_dir=str(workspace.run(name)))
        if options.max_steps > limits.train_steps:
            raise OptionError("max_steps", options.max_steps, f"this server allows at most {limits.train_steps}")
        if options.batch_size > limits.train_batch:
            raise OptionError("batch_size", options.batch_size, f"this server allows at most {limits.train_batch}")
        from ..config import validate_train

        validate_train(options)
        _embedding_path(workspace, name)
        return worker.submit("train", {"set": set_name, **_public(options)}).public()

    @app.get("/api/runs/{name}")
    def run(name: str) -> dict[str, Any]:
        from ..runfolder import read_loss_log

        folder = workspace.run(name)
        if not folder.is_dir():
            raise _not_found(f"training run {name}")
        previews = _steps(folder / "previews", name, ".png")
        copies = _steps(folder / "embeddings", name, ".safetensors")
        options = json.loads((folder / "options.json").read_text("utf-8")) if (folder / "options.json").is_file() \
            else {}
        return {"name": name, "loss": read_loss_log(folder / "loss.csv"),
                "previews": [{"step": s, "url": f"/api/runs/{name}/previews/{name}-{s}.png"} for s in previews],
                "copies": copies, "options": options.get("options", {}), "resolved": options.get("resolved", {})}

    @app.get("/api/runs/{name}/previews/{file}")
    def preview(name: str, file: str) -> Response:
        return _image_response(workspace.file_in(workspace.run(name) / "previews", file))

    @app.post("/api/runs/{name}/use-step")
    def use_step(name: str, body: dict[str, Any]) -> dict[str, Any]:
        from ..runfolder import RunFolder

        step = body.get("step") if isinstance(body, dict) else None
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise OptionError("step", step, "send the step of a saved copy, e.g. {\"step\": 500}")
        busy = worker.current
        if busy is not None and busy.kind == "train" and busy.request.get("embedding") == name:
            raise OptionError("step", step, f"{name} is training now; stop it first")
        RunFolder(workspace.run(name), name).use_step(step, workspace.embeddings / f"{name}.safetensors")
        return {"embedding": name, "step": step}

    # -- generation -----------------------------------------------------------------------------------------------
    @app.post("/api/generate")
    def start_generation(body: dict[str, Any]) -> dict[str, Any]:
        options = _generate_options(body, config, workspace)
        return worker.submit("generate", _public(options)).public()

    @app.get("/api/outputs")
    def outputs(limit: int = 100) -> list[dict[str, Any]]:
        from PIL import Image

        files = sorted(workspace.outputs.glob("*.png"), key=lambda p: p.stat().st_mtime, reverse=True)
        out = []
        for path in files[: max(1, min(limit, 500))]:
            try:
                with Image.open(path) as image:
                    text = image.text.get("parameters", "") if hasattr(image, "text") else ""
            except OSError:
                text = ""
            out.append({"file": path.name, "url": f"/api/outputs/{path.name}", "infotext": text})
        return out

    @app.get("/api/outputs/{file}")
    def output(file: str) -> Response:
        return _image_response(workspace.file_in(workspace.outputs, file))

    # -- jobs -------------------------------------------------------------------------------------------------------
    @app.get("/api/jobs")
    def jobs() -> list[dict[str, Any]]:
        return [job.public() for job in store.all()[:100]]

    @app.get("/api/jobs/{job_id}")
    def job(job_id: str) -> dict[str, Any]:
        return _job(store, job_id).public()

    @app.post("/api/jobs/{job_id}/stop")
    def stop(job_id: str) -> dict[str, Any]:
        found = _job(store, job_id)
        found.stop.set()
        if found.status == "queued":
            store.update(found, status="stopped", finished=time.time())
        return found.public()

    @app.post("/api/jobs/{job_id}/resume")
    def resume(job_id: str) -> dict[str, Any]:
        found = _job(store, job_id)
        if found.status not in ("stopped", "interrupted", "failed"):
            raise OptionError("job", job_id, f"is {found.status}; only a stopped, interrupted or failed job resumes")
        return worker.submit(found.kind, dict(found.request)).public()

    @app.get("/api/jobs/{job_id}/events")
    async def events(job_id: str, request: Request, after: int = 0) -> StreamingResponse:
        found = _job(store, job_id)
        last = int(request.headers.get("last-event-id", after) or 0)

        async def stream():
            nonlocal last
            yield "retry: 1000\n\n"
            while True:
                for event in store.events_after(found, last):
                    last = event["seq"]
                    yield f"id: {last}\nevent: {event['type']}\ndata: {json.dumps(event)}\n\n"
                if found.status in FINISHED:
                    yield f"event: end\ndata: {json.dumps(found.public())}\n\n"
                    return
                if await request.is_disconnected():
                    return
                await asyncio.sleep(0.25)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- the A1111-compatible subset ----------------------------------------------------------------------------------
    @app.get("/sdapi/v1/embeddings")
    def a1111_embeddings() -> dict[str, Any]:
        from ..embedding import list_embedding_files, read_embedding

        width = worker.model.width if worker.model is not None else None
        loaded, skipped = {}, {}
        for name, path in sorted(list_embedding_files(workspace.embeddings).items()):
            try:
                emb = read_embedding(path)
            except TistudioError:
                continue
            entry = {"step": emb.step, "sd_checkpoint": emb.model_hash, "sd_checkpoint_name": emb.model_name,
                     "shape": emb.width, "vectors": emb.count}
            (loaded if width in (None, emb.width) else skipped)[name] = entry
        return {"loaded": loaded, "skipped": skipped}

    @app.get("/sdapi/v1/samplers")
    def a1111_samplers() -> list[dict[str, Any]]:
        return [{"name": name, "aliases": [], "options": {}} for name in SAMPLERS]

    @app.post("/sdapi/v1/txt2img")
    async def a1111_txt2img(body: dict[str, Any]) -> dict[str, Any]:
        options = _generate_options(_from_a1111(body), config, workspace)
        job = worker.submit("generate", _public(options))
        while not job.done.is_set():
            await asyncio.sleep(0.1)
        if job.status != "done":
            raise OptionError("txt2img", job.status, job.error or "the generation was interrupted")
        images, infotexts, seeds = [], [], []
        for image in job.result["images"]:
            images.append(base64.b64encode((workspace.outputs / image["file"]).read_bytes()).decode("ascii"))
            infotexts.append(image["infotext"])
            seeds.append(image["seed"])
        info = {"prompt": options.prompt, "negative_prompt": options.negative_prompt, "seed": seeds[0] if seeds else -1,
                "all_seeds": seeds, "steps": options.steps, "cfg_scale": options.cfg, "sampler_name": options.sampler,
                "width": job.result["width"], "height": job.result["height"], "batch_size": options.batch,
                "infotexts": infotexts, "sd_model_hash": job.result.get("model_hash"), "job": job.id}
        return {"images": images, "parameters": body, "info": json.dumps(info)}

    @app.get("/sdapi/v1/progress")
    def a1111_progress() -> dict[str, Any]:
        current = worker.current
        state = {"skipped": False, "interrupted": bool(current and current.stop.is_set()), "job": "",
                 "job_count": worker.waiting() + (1 if current else 0), "job_timestamp": "0", "job_no": 0,
                 "sampling_step": 0, "sampling_steps": 0}
        progress, eta = 0.0, 0.0
        if current is not None:
            done, total = current.progress.get("step", 0), current.progress.get("total", 0) or 1
            state.update(job=current.id, sampling_step=done, sampling_steps=total,
                         job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(current.started or 0)))
            progress = min(1.0, done / total)
            eta = float(current.progress.get("eta_s") or 0.0)
        return {"progress": progress, "eta_relative": eta, "state": state, "current_image": None, "textinfo": None}

    @app.post("/sdapi/v1/interrupt")
    def a1111_interrupt() -> dict[str, Any]:
        current = worker.current
        if current is not None:
            current.stop.set()
        return {}

    return app


# ----------------------------------------------------------------------------------------------------------------
# Helpers


def _public(options: Any) -> dict[str, Any]:
    """The options a client chose (what a job records and a resume repeats); paths and the model are left out."""
    return {k: v for k, v in dataclasses.asdict(options).items() if k not in SERVER_FIELDS}


def _job(store: JobStore, job_id: str) -> Job:
    found = store.get(job_id)
    if found is None:
        raise _not_found(f"job {job_id}")
    return found


def _embedding_path(workspace: Workspace, name: str) -> Path:
    path = workspace.embeddings / f"{check_name(name, 'embedding')}.safetensors"
    if not path.is_file():
        raise _not_found(f"embedding {name}")
    return path


def _steps(folder: Path, name: str, suffix: str) -> list[int]:
    steps = []
    if folder.is_dir():
        for path in folder.iterdir():
            tail = path.name[len(name) + 1:-len(suffix)] if path.name.startswith(f"{name}-") and \
                path.name.endswith(suffix) else ""
            if tail.isdigit():
                steps.append(int(tail))
    return sorted(steps)


async def _read_capped(upload: UploadFile, limit: int) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(f"{upload.filename}: larger than {limit // (1024 * 1024)} MB, the most this server accepts")
    return data


class TooLarge(TistudioError):
    pass


def _thumbnail(path: Path, side: int) -> bytes:
    from ..dataset import read_image
    from ..errors import DatasetError

    try:
        image, _ = read_image(path)
    except DatasetError as exc:
        raise OptionError("file", path.name, f"cannot be shown: {exc}") from None
    image.thumbnail((side, side))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def _generate_options(body: dict[str, Any], config: ServerConfig, workspace: Workspace) -> GenerateOptions:
    options = _options(GenerateOptions, body, model=config.model.model, embeddings_dir=str(workspace.embeddings),
                       out_dir=str(workspace.outputs))
    limits = config.limits
    from ..config import validate_generate

    validate_generate(options)
    if options.batch > limits.generate_batch:
        raise OptionError("batch", options.batch, f"this server allows at most {limits.generate_batch}")
    if options.steps > limits.generate_steps:
        raise OptionError("steps", options.steps, f"this server allows at most {limits.generate_steps}")
    size = parse_size(options.size)
    if size and max(size) > limits.generate_side:
        raise OptionError("size", options.size, f"this server allows at most {limits.generate_side} px a side")
    return options


def _from_a1111(body: dict[str, Any]) -> dict[str, Any]:
    """A1111's txt2img request as our generation options (fields we do not have are ignored, as A1111 does)."""
    if not isinstance(body, dict):
        raise OptionError("body", type(body).__name__, "send a JSON object")
    sampler = body.get("sampler_name") or body.get("sampler_index") or "Euler"
    scheduler = str(body.get("scheduler") or "")
    if scheduler.lower() == "karras" and not str(sampler).endswith("Karras"):
        sampler = f"{sampler} Karras"
    check_sampler(str(sampler), "sampler_name")
    count = int(body.get("batch_size", 1) or 1) * int(body.get("n_iter", 1) or 1)
    return {"prompt": str(body.get("prompt", "")), "negative_prompt": str(body.get("negative_prompt", "") or ""),
            "steps": int(body.get("steps", 50) or 50), "sampler": str(sampler),
            "cfg": float(body.get("cfg_scale", 7.0) or 7.0), "seed": int(body.get("seed", -1)),
            "size": f"{int(body.get('width', 512) or 512)}x{int(body.get('height', 512) or 512)}", "batch": count}


# ----------------------------------------------------------------------------------------------------------------
# The work


def make_handlers(workspace: Workspace, config: ServerConfig) -> dict[str, Any]:
    def model_for(worker: Worker, job: Job) -> Any:
        if worker.model is None:
            from ..models import load_model

            worker.store.event(job, "message", text=f"loading the model {config.model.model}")
            worker.model = load_model(config.model, config.cache_dir)
        return worker.model

    def prepare_job(job: Job, worker: Worker) -> dict[str, Any]:
        from ..preprocess import prepare

        name = job.request["set"]
        options = PrepareOptions(**{k: v for k, v in job.request.items() if k != "set"},
                                 photos=str(workspace.photo_set(name)), out=str(workspace.dataset(name)))
        if not hasattr(worker, "detector"):
            from ..faces import FaceDetector

            worker.detector = FaceDetector()  # type: ignore[attr-defined]

        def progress(p: Any) -> None:
            worker.store.event(job, "progress", step=p.step, total=p.total, source=p.message)

        result = prepare(options, on_progress=progress, stop=job.stop, detector=worker.detector)
        return {"set": name, "usable": len(result.usable), "total": len(result.items), "verdict": result.verdict,
                "processed": result.processed, "reused": result.reused}

    def create_job(job: Job, worker: Worker) -> dict[str, Any]:
        from ..create import create_embedding

        options = CreateOptions(**{**job.request, "model": config.model.model,
                                   "embeddings_dir": str(workspace.embeddings)})
        path = create_embedding(options, cache_dir=config.cache_dir, model=model_for(worker, job))
        return {"embedding": options.name, "file": path.name}

    def train_job(job: Job, worker: Worker) -> dict[str, Any]:
        from ..train import train

        request = {k: v for k, v in job.request.items() if k != "set"}
        name = request["embedding"]
        dataset = workspace.dataset(job.request["set"])
        if not (dataset / "manifest.json").is_file():
            dataset = workspace.photo_set(job.request["set"])
        options = TrainOptions(**request, model=config.model.model, dataset=str(dataset),
                               embeddings_dir=str(workspace.embeddings), run_dir=str(workspace.run(name)))

        def progress(p: Any) -> None:
            if p.event == "step":
                worker.store.event(job, "progress", step=p.step, total=p.total, loss=p.loss, lr=p.lr,
                                   epoch=p.epoch, eta_s=p.eta_s, elapsed_s=p.elapsed_s)
            elif p.event == "preview" and p.path:
                file = Path(p.path).name
                worker.store.event(job, "preview", step=p.step, url=f"/api/runs/{name}/previews/{file}")
            elif p.event in ("save", "start", "encode"):
                worker.store.event(job, p.event, step=p.step, text=p.message)

        result = train(options, cache_dir=config.cache_dir, model=model_for(worker, job), on_progress=progress,
                       stop=job.stop)
        return {"embedding": name, "step": result.step, "stopped": result.stopped, "message": result.message,
                "last_loss": result.last_loss}

    def generate_job(job: Job, worker: Worker) -> dict[str, Any]:
        from ..generate import generate

        options = GenerateOptions(**{**job.request, "model": config.model.model,
                                     "embeddings_dir": str(workspace.embeddings), "out_dir": str(workspace.outputs)})

        def progress(p: Any) -> None:
            worker.store.event(job, "progress", step=p.step, total=p.total, elapsed_s=p.elapsed_s)

        model = model_for(worker, job)
        images = generate(options, cache_dir=config.cache_dir, model=model, on_progress=progress, stop=job.stop)
        width, height = images[0].image.size if images else (0, 0)
        return {"images": [{"file": i.path.name, "url": f"/api/outputs/{i.path.name}", "seed": i.seed,
                            "infotext": i.infotext} for i in images if i.path],
                "width": width, "height": height, "model_hash": model.hash}

    return {"prepare": prepare_job, "create": create_job, "train": train_job, "generate": generate_job}
