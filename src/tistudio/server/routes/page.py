"""The web page, its static files, the server's status and the forms' schema."""

from __future__ import annotations

import dataclasses
from importlib import resources
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from tistudio import __version__
from tistudio.config import CreateOptions, GenerateOptions, PrepareOptions, TrainOptions
from tistudio.models.loading import DEMOS
from tistudio.samplers import SAMPLERS
from tistudio.server.context import ServerDep, not_found, schema
from tistudio.server.wording import model_name

router = APIRouter()
STATIC_FILES = {"app.js": "text/javascript", "app.css": "text/css"}


def static_folder() -> Any:
    return resources.files("tistudio").joinpath("server", "static")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def index() -> HTMLResponse:
    return HTMLResponse(
        static_folder().joinpath("index.html").read_text("utf-8"), headers={"Cache-Control": "no-cache"}
    )


@router.get("/static/{name}", include_in_schema=False)
def static_file(name: str) -> Response:
    if name not in STATIC_FILES:
        raise not_found(name)
    return Response(
        static_folder().joinpath(name).read_bytes(),
        media_type=STATIC_FILES[name],
        headers={"Cache-Control": "no-cache"},
    )


@router.get("/api/status")
def status(server: ServerDep) -> dict[str, Any]:
    workers, model = server.workers, server.config.model
    current = workers.current
    return {
        "version": __version__,
        "model": model_name(model.model),
        "demo": model.model in DEMOS,
        "model_loaded": workers.model.describe() if workers.model is not None else None,
        "busy": current.public() if current else None,
        "queued": workers.waiting(),
        "running": [job.public() for job in workers.running],
        "devices": workers.devices(),
        "limits": dataclasses.asdict(server.limits),
    }


@router.get("/api/schema")
def forms(server: ServerDep) -> dict[str, Any]:
    """The forms: the options' fields, with defaults that suit the served model (its size for preparing photos;
    the demo's own steps and previews when it serves a demo)."""
    forms = {
        "prepare": schema(PrepareOptions),
        "create": schema(CreateOptions),
        "train": schema(TrainOptions),
        "generate": schema(GenerateOptions),
    }
    native = server.native_size()
    defaults: dict[str, dict[str, Any]] = {"prepare": {"size": native} if native else {}}
    if server.config.model.model in DEMOS:
        from tistudio.demo.run import GENERATE_DEFAULTS, TRAIN_DEFAULTS

        defaults |= {"train": TRAIN_DEFAULTS, "generate": GENERATE_DEFAULTS}
    for form, changed in defaults.items():
        for field in forms[form]:
            if field["name"] in changed:
                field["default"] = changed[field["name"]]
    return {**forms, "samplers": list(SAMPLERS)}


@router.get("/docs", response_class=HTMLResponse, include_in_schema=False)
def api_docs(request: Request) -> HTMLResponse:
    """The API at a glance, from the OpenAPI schema, without any script from elsewhere."""
    import html

    spec = request.app.openapi()
    rows = []
    for path, methods in sorted(spec.get("paths", {}).items()):
        for method, operation in methods.items():
            rows.append(
                f"<tr><td><code>{html.escape(method.upper())}</code></td><td><code>{html.escape(path)}"
                f"</code></td><td>{html.escape(operation.get('summary', ''))}</td></tr>"
            )
    body = (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>tistudio API</title>"
        f"<link rel='stylesheet' href='/static/app.css'></head><body><main><h1>tistudio API "
        f"{html.escape(__version__)}</h1><p>The full schema: <a href='/openapi.json'>/openapi.json</a> (load it "
        f"into any OpenAPI viewer).</p><table>{''.join(rows)}</table></main></body></html>"
    )
    return HTMLResponse(body, headers={"Cache-Control": "no-cache"})
