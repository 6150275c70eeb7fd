"""The A1111-compatible subset (``/sdapi/v1/...``): embeddings, samplers, txt2img, progress, interrupt, so that
existing clients work. Fields we do not have are ignored, as A1111 does."""

from __future__ import annotations

import base64
import contextlib
import json
import math
import time
from typing import Any

from fastapi import APIRouter

from ...embedding import list_embedding_files, read_embedding
from ...errors import OptionError, TistudioError
from ...samplers import SAMPLERS, check_sampler
from ..context import ServerDep, public
from .generation import generate_options

router = APIRouter()


@router.get("/sdapi/v1/embeddings")
def embeddings(server: ServerDep) -> dict[str, Any]:
    model = server.workers.model
    width = model.width if model is not None else None
    loaded, skipped = {}, {}
    for name, path in sorted(list_embedding_files(server.workspace.embeddings).items()):
        try:
            emb = read_embedding(path)
        except TistudioError:
            continue
        entry = {"step": emb.step, "sd_checkpoint": emb.model_hash, "sd_checkpoint_name": emb.model_name,
                 "shape": emb.width, "vectors": emb.count}
        (loaded if width in (None, emb.width) else skipped)[name] = entry
    return {"loaded": loaded, "skipped": skipped}


@router.get("/sdapi/v1/samplers")
def samplers() -> list[dict[str, Any]]:
    return [{"name": name, "aliases": [], "options": {}} for name in SAMPLERS]


@router.post("/sdapi/v1/txt2img")
async def txt2img(body: dict[str, Any], server: ServerDep) -> dict[str, Any]:
    options = generate_options(from_a1111(body), server)
    job = server.workers.submit("generate", public(options))
    async with contextlib.aclosing(server.store.changes(timeout=5.0)) as changes:
        async for _ in changes:
            if job.done.is_set():
                break
    if job.status != "done":
        raise OptionError("txt2img", job.status, job.error or "the generation was interrupted")
    images, infotexts, seeds = [], [], []
    for image in job.result["images"]:
        images.append(base64.b64encode((server.workspace.outputs / image["file"]).read_bytes()).decode("ascii"))
        infotexts.append(image["infotext"])
        seeds.append(image["seed"])
    info = {"prompt": options.prompt, "negative_prompt": options.negative_prompt, "seed": seeds[0] if seeds else -1,
            "all_seeds": seeds, "steps": options.steps, "cfg_scale": options.cfg, "sampler_name": options.sampler,
            "width": job.result["width"], "height": job.result["height"], "batch_size": options.batch,
            "infotexts": infotexts, "sd_model_hash": job.result.get("model_hash"), "job": job.id}
    return {"images": images, "parameters": body, "info": json.dumps(info)}


@router.get("/sdapi/v1/progress")
def progress(server: ServerDep) -> dict[str, Any]:
    workers = server.workers
    current = workers.current
    state = {"skipped": False, "interrupted": bool(current and current.stop.is_set()), "job": "",
             "job_count": workers.waiting() + len(workers.running), "job_timestamp": "0", "job_no": 0,
             "sampling_step": 0, "sampling_steps": 0}
    fraction, eta = 0.0, 0.0
    if current is not None:
        done, total = current.progress.get("step", 0), current.progress.get("total", 0) or 1
        state.update(job=current.id, sampling_step=done, sampling_steps=total,
                     job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(current.started or 0)))
        fraction = min(1.0, done / total)
        eta = float(current.progress.get("eta_s") or 0.0)
    return {"progress": fraction, "eta_relative": eta, "state": state, "current_image": None, "textinfo": None}


@router.post("/sdapi/v1/interrupt")
def interrupt(server: ServerDep) -> dict[str, Any]:
    for running in server.workers.running:  # A1111 has one job at a time; here every running one stops
        running.stop.set()
    return {}


def from_a1111(body: Any) -> dict[str, Any]:
    """A1111's txt2img request as our generation options; a field of the wrong kind is a 400 naming it."""
    if not isinstance(body, dict):
        raise OptionError("body", type(body).__name__, "send a JSON object")
    sampler = body.get("sampler_name") or body.get("sampler_index") or "Euler"
    scheduler = str(body.get("scheduler") or "")
    if scheduler.lower() == "karras" and not str(sampler).endswith("Karras"):
        sampler = f"{sampler} Karras"
    check_sampler(str(sampler), "sampler_name")
    count = _whole(body, "batch_size", 1) * _whole(body, "n_iter", 1)
    return {"prompt": _text(body, "prompt"), "negative_prompt": _text(body, "negative_prompt"),
            "steps": _whole(body, "steps", 50), "sampler": str(sampler),
            "cfg": _number(body, "cfg_scale", 7.0), "seed": _whole(body, "seed", -1, allow_zero=True),
            "size": f"{_whole(body, 'width', 512)}x{_whole(body, 'height', 512)}", "batch": count}


def _text(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise OptionError(key, type(value).__name__, "send text")
    return value


def _finite(key: str, value: Any) -> float:
    """A finite number from JSON's number, or a numeric string as some clients send."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise OptionError(key, type(value).__name__, "send a number")
    try:
        number = float(value) if not isinstance(value, str) or len(value) <= 40 else math.nan
    except (ValueError, OverflowError):
        number = math.nan
    if not math.isfinite(number):
        raise OptionError(key, str(value)[:40], "send a finite number")
    return number


def _number(body: dict[str, Any], key: str, default: float) -> float:
    """A finite number; null, absent or 0 -> default (A1111's clients send 0 for "the default")."""
    value = body.get(key)
    return default if value is None or (value == 0 and not isinstance(value, bool)) else _finite(key, value)


def _whole(body: dict[str, Any], key: str, default: int, allow_zero: bool = False) -> int:
    """A whole number (1.0 is one; 1.5 is not); null or absent -> default, and 0 too unless allow_zero."""
    value = body.get(key)
    if value is None or (value == 0 and not allow_zero and not isinstance(value, bool)):
        return default
    number = _finite(key, value)
    if number != int(number) or abs(number) > 2**53:
        raise OptionError(key, str(value)[:40], "send a whole number")
    return int(number)
