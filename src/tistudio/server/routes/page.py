"""The web page, its static files, the server's status and the forms' schema."""

from __future__ import annotations

import dataclasses
from importlib import resources
from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

from ... import __version__
from ...config import CreateOptions, GenerateOptions, PrepareOptions, TrainOptions
from ...models import DEMOS
from ...samplers import SAMPLERS
from ..context import ServerDep, not_found, schema

router = APIRouter()
STATIC_FILES = {"app.js": "text/javascript", "app.css": "text/css"}


def static_folder() -> Any:
    return resources.files("tistudio").joinpath("server", "static")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def index() -> HTMLResponse:
    return HTMLResponse(static_folder().joinpath("index.html").read_text("utf-8"),
                        headers={"Cache-Control": "no-cache"})


@router.get("/static/{name}", include_in_schema=False)
def static_file(name: str) -> Response:
    if name not in STATIC_FILES:
        raise not_found(name)
    return Response(static_folder().joinpath(name).read_bytes(), media_type=STATIC_FILES[name],
                    headers={"Cache-Control": "no-cache"})


@router.get("/api/status")
def status(server: ServerDep) -> dict[str, Any]:
    worker, model = server.worker, server.config.model
    current = worker.current
    return {"version": __version__, "model": model.model, "demo": model.model in DEMOS,
            "model_loaded": worker.model.describe() if worker.model is not None else None,
            "busy": current.public() if current else None, "queued": worker.waiting(),
            "limits": dataclasses.asdict(server.limits)}


@router.get("/api/schema")
def forms(server: ServerDep) -> dict[str, Any]:
    prepare, native = schema(PrepareOptions), server.native_size()
    for field in prepare:
        if field["name"] == "size" and native:
            field["default"] = native  # prepare at the served model's size
    return {"prepare": prepare, "create": schema(CreateOptions), "train": schema(TrainOptions),
            "generate": schema(GenerateOptions), "samplers": list(SAMPLERS)}
