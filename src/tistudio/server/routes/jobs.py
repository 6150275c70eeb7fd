"""The job list: status, stop, resume, and a job's progress as Server-Sent Events."""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from tistudio.errors import OptionError
from tistudio.server.context import ServerDep, job_or_404
from tistudio.server.jobs import FINISHED
from tistudio.server.routes.training import kept_step

router = APIRouter()
QUIET_S = 1.0  # with no change for this long, an event stream checks whether its client is still there


@router.get("/api/jobs")
def jobs(server: ServerDep) -> list[dict[str, Any]]:
    return [job.public() for job in server.store.all()[:100]]


@router.get("/api/jobs/{job_id}")
def job(job_id: str, server: ServerDep) -> dict[str, Any]:
    return job_or_404(server.store, job_id).public()


@router.post("/api/jobs/{job_id}/stop")
def stop(job_id: str, server: ServerDep) -> dict[str, Any]:
    """A running job stops at its next step (training saves it); a queued one is cancelled and never runs."""
    found = job_or_404(server.store, job_id)
    found.stop.set()
    if found.status == "queued":
        server.store.update(found, status="cancelled", finished=time.time())
    return found.public()


@router.post("/api/jobs/{job_id}/resume")
def resume(job_id: str, server: ServerDep) -> dict[str, Any]:
    """Run a stopped, interrupted or failed job's request again (training continues from its last save). Refused
    where it would not be what the person means: a later job on the same embedding is waiting or running, or the
    run has already reached the job's last step."""
    found = job_or_404(server.store, job_id)
    if found.status not in ("stopped", "interrupted", "failed"):
        raise OptionError("job", job_id, f"is {found.status}; only a stopped, interrupted or failed job resumes")
    if found.kind == "train":
        name = str(found.request.get("embedding", ""))
        busy = next(
            (
                j
                for j in server.store.all()
                if j.kind == "train" and j.status in ("queued", "running") and j.request.get("embedding") == name
            ),
            None,
        )
        if busy is not None:
            raise OptionError("job", job_id, f"{name} is {busy.status} in another job already ({busy.id})")
        kept = kept_step(server, name)
        last = int(found.request.get("max_steps") or 0)
        if kept is not None and last and kept["last_step"] >= last:
            raise OptionError(
                "max_steps",
                last,
                f"{name} is already trained to step {kept['last_step']}; raise "
                "Max steps and start training to go further",
            )
    return server.workers.submit(found.kind, dict(found.request)).public()


@router.get("/api/jobs/{job_id}/events")
async def events(job_id: str, request: Request, server: ServerDep, after: int = 0) -> StreamingResponse:
    store = server.store
    found = job_or_404(store, job_id)
    given = request.headers.get("last-event-id", "")
    last = int(given) if given.isascii() and given.isdigit() and len(given) < 19 else max(0, after)  # "abc" was a 500

    async def stream():
        nonlocal last
        yield "retry: 1000\n\n"
        async with contextlib.aclosing(store.changes(QUIET_S)) as changes:
            async for _ in changes:
                for event in store.events_after(found, last):
                    last = event["seq"]
                    yield f"id: {last}\nevent: {event['type']}\ndata: {json.dumps(event)}\n\n"
                if found.status in FINISHED:
                    yield f"event: end\ndata: {json.dumps(found.public())}\n\n"
                    return
                if await request.is_disconnected():
                    return

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
