"""The A1111-compatible API (``/sdapi/v1/...``) as A1111 1.10's clients use it: txt2img, the embeddings, A1111's
Train tab (create/embedding, train/embedding), progress and interrupt, and the lists and options clients read
first. The requests are translated in ``server/a1111.py``; what tistudio cannot do is refused with a 422."""

from __future__ import annotations

import base64
import contextlib
import json
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter

from tistudio.embeddings.files import prompt_words, read_embedding
from tistudio.errors import FieldError, OptionError, TistudioError, UnsafeFileError
from tistudio.generate.styles import read_styles
from tistudio.samplers import BASES, SCHEDULES, schedules_offered
from tistudio.server.a1111 import (
    apply_options,
    create_request,
    set_name,
    train_request,
    txt2img_info,
    txt2img_request,
)
from tistudio.server.context import Server, ServerDep, public
from tistudio.server.jobs import Job
from tistudio.server.routes.embeddings import create_options
from tistudio.server.routes.generation import generate_options
from tistudio.server.routes.training import train_options
from tistudio.server.wording import model_name

router = APIRouter()


def served_model(server: Server) -> dict[str, Any]:
    """The served checkpoint as A1111 lists it (its name, never its path; the hash once it is loaded)."""
    name = model_name(server.config.model.model)
    loaded = server.workers.model
    short = getattr(loaded, "hash", None) if loaded is not None else None
    return {
        "title": f"{name} [{short}]" if short else name,
        "model_name": name.rsplit(".", 1)[0] if name.endswith((".safetensors", ".ckpt")) else name,
        "hash": short,
        "sha256": None,
        "filename": name,
        "config": None,
    }


async def finished(server: Server, job: Job) -> None:
    """Until the job has ended (A1111's calls block until their work is done)."""
    async with contextlib.aclosing(server.store.changes(timeout=5.0)) as changes:
        async for _ in changes:
            if job.done.is_set():
                break


# -- txt2img ----------------------------------------------------------------------------------------------------


@router.post("/sdapi/v1/txt2img")
async def txt2img(body: dict[str, Any], server: ServerDep) -> dict[str, Any]:
    model = served_model(server)
    request = txt2img_request(body, server.a1111, model, read_styles(server.workspace.root / "styles.csv"))
    options = generate_options(request.options, server)
    job = server.workers.submit("generate", public(options))
    await finished(server, job)
    if job.status not in ("done", "stopped", "cancelled"):
        raise OptionError("txt2img", job.status, job.error or "the generation did not finish")
    result = job.result or {}
    images = []
    for image in result.get("images", []):
        path = server.workspace.outputs / image["file"]
        if request.send_images:
            images.append(base64.b64encode(path.read_bytes()).decode("ascii"))
        if not request.save_images:  # A1111's API default: the pictures are sent, not kept
            path.unlink(missing_ok=True)
    info = txt2img_info(
        request, result, served_model(server), job.started or time.time(), interrupted=job.status != "done"
    )
    return {"images": images, "parameters": body, "info": json.dumps(info)}


# -- A1111's Train tab ------------------------------------------------------------------------------------------


@router.post("/sdapi/v1/create/embedding")
async def create_embedding(body: dict[str, Any], server: ServerDep) -> dict[str, Any]:
    options = create_options(create_request(body), server)
    job = server.workers.submit("create", public(options))
    await finished(server, job)
    if job.status != "done":
        # 400 with the job's own words (A1111 answers 200 with "create embedding error: ..." in info; a client
        # that checks the status should see the failure)
        raise FieldError("name", job.error or f"the embedding {options.name!r} was not created ({job.status})")
    return {"info": f"create embedding filename: embeddings/{job.result['file']}"}


@router.post("/sdapi/v1/train/embedding")
async def train_embedding(body: dict[str, Any], server: ServerDep) -> dict[str, Any]:
    """A1111's blocking training call; /sdapi/v1/progress follows it meanwhile and /sdapi/v1/interrupt stops it
    (saved, as A1111's Interrupt does). A run of this embedding that exists is continued, as A1111 continues from
    the embedding's step."""
    options, data_root = train_request(body)
    workspace = server.workspace
    chosen = set_name(data_root, (workspace.photos, workspace.datasets))
    set_folder, train = train_options({"set": chosen, **options}, server)
    job = server.workers.submit("train", {"set": set_folder, **public(train)})
    await finished(server, job)
    result = job.result or {}
    error = job.error if job.status == "failed" else None
    answer = {
        "info": f"train embedding complete: filename: embeddings/{train.embedding}.safetensors error: {error}",
        "step": result.get("step"),
        "message": result.get("message"),
        "status": job.status,
        "job": job.id,
    }
    with contextlib.suppress(TistudioError):  # which step the file in the embeddings folder holds, and why
        answer.update(kept(read_embedding(workspace.embeddings / f"{train.embedding}.safetensors")))
    return answer


def kept(embedding: Any) -> dict[str, Any]:
    """Which step an embedding file holds and why: A1111 keeps the last step in its embeddings folder, tistudio the
    best (the last is then the run's NAME-last.safetensors, and training further continues from it)."""
    last = embedding.meta_count("last_step")
    if last is None or last <= embedding.step:
        return {"kept_step": embedding.step, "kept_because": "it is the last step trained", "last_step": embedding.step}
    why = embedding.meta.get("best_by") or "it was chosen"
    because = "it was chosen with use-step" if why == "chosen" else f"it had {why}"
    return {"kept_step": embedding.step, "kept_because": because, "last_step": last}


# -- what clients read ------------------------------------------------------------------------------------------


@router.get("/sdapi/v1/embeddings")
def embeddings(server: ServerDep) -> dict[str, Any]:
    width = server.model_width()  # an SDXL file on an SD1 server is skipped before the model is loaded too
    loaded, skipped = {}, {}
    for name, path in sorted(prompt_words(server.workspace.embeddings).items()):
        try:
            emb = read_embedding(path)
        except TistudioError:
            continue
        entry = {
            "step": emb.step,
            "sd_checkpoint": emb.model_hash,
            "sd_checkpoint_name": emb.model_name,
            "shape": emb.width,
            "vectors": emb.count,
            **kept(emb),
        }
        (loaded if width in (None, emb.width) else skipped)[name] = entry
    return {"loaded": loaded, "skipped": skipped}


@router.post("/sdapi/v1/refresh-embeddings")
def refresh_embeddings() -> dict[str, Any]:
    return {}  # the embeddings folder is read at every request: nothing is cached to refresh


@router.post("/sdapi/v1/refresh-checkpoints")
def refresh_checkpoints() -> dict[str, Any]:
    return {}  # one checkpoint is served, chosen when the server starts


@router.get("/sdapi/v1/samplers")
def samplers() -> list[dict[str, Any]]:
    return [
        {
            "name": base.name,
            "aliases": [],
            "options": {"scheduler": base.automatic} if base.automatic != "uniform" else {},
        }
        for base in BASES
    ]


@router.get("/sdapi/v1/schedulers")
def schedulers() -> list[dict[str, Any]]:
    return [
        {"name": key, "label": SCHEDULES[key], "aliases": None, "default_rho": -1, "need_inner_model": False}
        for key in schedules_offered()
    ]


@router.get("/sdapi/v1/sd-models")
def sd_models(server: ServerDep) -> list[dict[str, Any]]:
    return [served_model(server)]


@router.get("/sdapi/v1/prompt-styles")
def prompt_styles(server: ServerDep) -> list[dict[str, Any]]:
    return [
        {"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt}
        for s in read_styles(server.workspace.root / "styles.csv").values()
    ]


@router.get("/sdapi/v1/scripts")
def scripts() -> dict[str, list[str]]:
    return {"txt2img": [], "img2img": []}


@router.get("/sdapi/v1/options")
def options(server: ServerDep) -> dict[str, Any]:
    model = served_model(server)
    return {
        "sd_model_checkpoint": model["title"],
        "sd_checkpoint_hash": model["sha256"],
        "CLIP_stop_at_last_layers": server.a1111.clip_skip,
        "randn_source": "CPU",
        "eta_noise_seed_delta": 0,
        "sd_vae": "Automatic",
        "samples_format": "png",
    }


@router.post("/sdapi/v1/options")
def set_options(body: dict[str, Any], server: ServerDep) -> None:
    if not isinstance(body, dict):
        raise OptionError("body", type(body).__name__, "send a JSON object")
    apply_options(body, server.a1111, served_model(server))


# -- progress ---------------------------------------------------------------------------------------------------


@router.get("/sdapi/v1/progress")
def progress(server: ServerDep) -> dict[str, Any]:
    workers = server.workers
    current = workers.current
    state = {
        "skipped": False,
        "interrupted": bool(current and current.stop.is_set()),
        "stopping_generation": False,
        "job": "",
        "job_count": workers.waiting() + len(workers.running),
        "job_timestamp": "0",
        "job_no": 0,
        "sampling_step": 0,
        "sampling_steps": 0,
    }
    fraction, eta, text = 0.0, 0.0, None
    if current is not None:
        done, total = current.progress.get("step", 0), current.progress.get("total", 0) or 1
        state.update(job=current.id, job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(current.started or 0)))
        state.update(progress_counts(current, done, total))
        fraction = min(1.0, done / total)
        elapsed = time.time() - (current.started or time.time())
        eta = float(current.progress.get("eta_s") or (elapsed / fraction - elapsed if fraction > 0 else 0.0))
        if current.kind == "train":
            loss = current.progress.get("loss")
            text = f"Training {current.request.get('embedding')}: step {done} of {total}" + (
                f", loss {loss:.4f}" if isinstance(loss, (int, float)) else ""
            )
    return {
        "progress": fraction,
        "eta_relative": max(0.0, eta),
        "state": state,
        "current_image": None,
        "textinfo": text,
    }


def progress_counts(job: Job, done: int, total: int) -> dict[str, int]:
    """A1111's counters: a generation of n_iter batches is n_iter jobs of `steps` sampling steps each (job_no the
    batch being drawn); a training is one job per step (job_no the steps done), as A1111's Train tab counts."""
    if job.kind == "train":
        return {"job_count": total, "job_no": done, "sampling_step": done, "sampling_steps": total}
    batches = max(1, int(job.request.get("batch_count") or 1))
    per = max(1, total // batches)
    batch = min(done // per, batches - 1)
    return {"job_count": batches, "job_no": batch, "sampling_step": done - batch * per, "sampling_steps": per}


@router.post("/sdapi/v1/interrupt")
def interrupt(server: ServerDep) -> dict[str, Any]:
    for running in server.workers.running:  # A1111 has one job at a time; here every running one stops
        running.stop.set()
    return {}


@router.post("/sdapi/v1/skip")
def skip(server: ServerDep) -> dict[str, Any]:
    """A1111's Skip ends the picture being drawn and goes on with the next of the batch; a tistudio generation draws
    a batch as one job, so Skip stops it as Interrupt does (the finished batches are kept)."""
    return interrupt(server)


# -- lists that are truly empty here, and what tistudio does not do -----------------------------------------------


@router.get("/sdapi/v1/loras")
def loras(server: ServerDep) -> list[dict[str, Any]]:
    """A1111's Lora extension's list (scripts/api.py): name, alias, path and the file's metadata - the path as the
    file's name in the workspace's LoRA folder, never the server's folders."""
    from tistudio.embeddings.bundle import list_lora_files
    from tistudio.safeload import safetensors_header

    found = []
    for name, path in list_lora_files(server.workspace.loras).items():
        meta: dict[str, str] = {}
        with contextlib.suppress(OSError, UnsafeFileError):
            meta = safetensors_header(path, 20_000, 2**31)[1]
        alias = meta.get("ss_output_name", name)
        found.append({"name": name, "alias": alias, "path": path.name, "metadata": meta})
    return found


@router.post("/sdapi/v1/refresh-loras")
def refresh_loras() -> None:
    return None  # the folder is read at every request


@router.get("/sdapi/v1/sd-vae")
def vaes() -> list[dict[str, Any]]:
    return []  # tistudio draws with the checkpoint's own VAE


@router.get("/sdapi/v1/upscalers")
def upscalers() -> list[dict[str, Any]]:
    return []  # no upscaler: hires fix is refused (txt2img answers 422 naming enable_hr)


@router.get("/sdapi/v1/memory")
def memory() -> dict[str, Any]:
    """A1111's memory report: the system's RAM (from /proc/meminfo where there is one) and CUDA's, in bytes."""
    import torch

    ram: dict[str, Any] = {"error": "unavailable on this system"}
    with contextlib.suppress(OSError, ValueError, IndexError, KeyError):
        lines = Path("/proc/meminfo").read_text("ascii").splitlines()
        fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in lines if len(line.split()) > 1}
        total, free = fields["MemTotal"], fields["MemAvailable"]
        ram = {"free": free, "used": total - free, "total": total}
    cuda: dict[str, Any] = {"error": "no CUDA device"}
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        cuda = {
            "system": {"free": free, "used": total - free, "total": total},
            "active": {"current": torch.cuda.memory_allocated(), "peak": torch.cuda.max_memory_allocated()},
        }
    return {"ram": ram, "cuda": cuda}


@router.post("/sdapi/v1/png-info")
def png_info(body: dict[str, Any]) -> dict[str, Any]:
    """A picture's text chunks, as A1111 answers them: its generation parameters ("info", the `parameters` chunk)
    and the other chunks ("items"). Only PNG chunks are read (never the picture's pixels)."""
    import binascii
    import io

    from PIL import Image, UnidentifiedImageError

    image = body.get("image") if isinstance(body, dict) else None
    if not isinstance(image, str) or not image:
        raise OptionError("image", type(image).__name__, "send the picture as base64 text (a data URL is fine)")
    try:
        data = base64.b64decode(image.split(",", 1)[-1] if image.startswith("data:") else image, validate=False)
        with Image.open(io.BytesIO(data)) as picture:
            chunks = {str(k): str(v) for k, v in getattr(picture, "text", {}).items()}
    except (binascii.Error, ValueError, OSError, UnidentifiedImageError):
        raise OptionError("image", image, "is not a picture in base64") from None
    info = chunks.pop("parameters", "")
    return {"info": info, "items": chunks, "parameters": {}}


def not_here(what: str) -> Any:
    """A1111's error shape for what tistudio does not do."""
    from fastapi.responses import JSONResponse

    return JSONResponse(
        {"error": "NotImplemented", "detail": f"tistudio does not do {what}", "body": "", "errors": ""},
        status_code=501,
    )


@router.post("/sdapi/v1/img2img")
def img2img() -> Any:
    return not_here("img2img (it trains embeddings and draws with them through txt2img)")


@router.get("/sdapi/v1/cmd-flags")
def cmd_flags() -> Any:
    return not_here("A1111's command-line flags (its own are `tistudio serve --help`)")
