"""The HTTP API and the web page (FastAPI). Create it with :func:`create_app`; `tistudio serve` runs it.

Everything long (preparing, training, generating, creating) is a job for the worker threads, one per device, each
owning its model (jobs.py; the work itself in work.py); the calls return at once with the job, and
``GET /api/jobs/ID/events`` streams its progress (Server-Sent Events). The routes live in routes/, one router per
resource, and reach the server's state through context.Server. An A1111-compatible subset (routes/a1111.py) lets
existing clients work.
Safe by default: see security.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from tistudio import __version__
from tistudio.errors import OptionError, TistudioError, one_line
from tistudio.server.a1111 import CannotApply
from tistudio.server.context import NotFound, Server, ServerConfig, TooLarge
from tistudio.server.jobs import JobStore, Workers
from tistudio.server.routes import ROUTERS
from tistudio.server.security import SecurityMiddleware
from tistudio.server.wording import for_page
from tistudio.server.work import Work
from tistudio.server.workspace import TooFull, Workspace

__all__ = ["ServerConfig", "create_app"]
WORKER_STOP_S = 300.0  # the longest a shutdown waits for the running job to stop and save


def create_app(config: ServerConfig) -> FastAPI:
    workspace = Workspace(config.workspace)
    workspace.remove_stale_temporaries()
    store = JobStore(workspace.jobs)
    workers = Workers(
        store, Work(workspace, config).handlers(), config.devices, words=lambda text: for_page(text, workspace.root)
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        workers.start()
        yield
        app.state.server.close()
        # the running jobs finish their step and save before the process ends (the workers are daemon threads)
        await asyncio.to_thread(workers.join, WORKER_STOP_S)

    # FastAPI's /docs and /redoc load their scripts from a public CDN; tistudio fetches nothing at run time, so
    # /docs is its own page (routes/page.py) listing the API from /openapi.json.
    app = FastAPI(
        title="tistudio",
        version=__version__,
        description="Textual-inversion training and generation.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.add_middleware(
        SecurityMiddleware,
        auth=config.auth,
        listening=config.listening,
        max_body=config.limits.request_bytes,
        max_json=config.limits.json_bytes,
    )
    app.state.server = Server(config=config, workspace=workspace, store=store, workers=workers)
    app.add_exception_handler(TistudioError, user_error)
    app.add_exception_handler(RequestValidationError, malformed_request)
    for router in ROUTERS:
        app.include_router(router)
    return app


async def user_error(request: Request, exc: Exception) -> JSONResponse:
    """A user's error as JSON: 404 for what does not exist, 413 for what is too large, 507 for a full workspace,
    422 for an A1111 field tistudio cannot apply, else 400 (with the field)."""
    status = (
        404
        if isinstance(exc, NotFound)
        else 413
        if isinstance(exc, TooLarge)
        else 507
        if isinstance(exc, TooFull)
        else 422
        if isinstance(exc, CannotApply)
        else 400
    )
    root = request.app.state.server.workspace.root
    body: dict[str, Any] = {"error": for_page(one_line(str(exc)), root)}
    if isinstance(exc, OptionError):
        body["field"] = exc.field
    return JSONResponse(body, status_code=status)


async def malformed_request(request: Request, exc: Exception) -> JSONResponse:
    """A request the API cannot read (a wrong type, a missing part): 422 naming the field, never echoing what was
    sent (FastAPI's default repeats the whole input: a 150 MB body came back as a 900 MB answer)."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    first = errors[0] if errors else {}
    field = ".".join(str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")) or "request"
    message = " ".join(str(first.get("msg", "the request is malformed")).split())[:200]
    return JSONResponse({"error": f"{field}: {message}", "field": field}, status_code=422)
