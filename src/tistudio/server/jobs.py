"""Jobs: training, generation, preparation and creation run on worker threads, one per device, each owning its
model. With one device (every CPU-only machine) jobs run one at a time in order; with several (``serve --devices
cuda:0,cuda:1`` or ``all``) each job goes to the next free device, except that two jobs on the same embedding or
photo set never run at once (the later waits; jobs behind it that touch neither go ahead).

HTTP calls return at once with a job id. Each job keeps its status, its last progress and a bounded list of
events (steps, previews, messages) that the server streams to browsers. Jobs are saved as JSON in the
workspace; after a restart a job that was queued or running shows as ``interrupted`` and can be resumed (a
training run continues from its last save).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tistudio.errors import TistudioError
from tistudio.storage import write_json

log = logging.getLogger(__name__)

FINISHED = ("done", "failed", "stopped", "interrupted", "cancelled")  # cancelled: stopped while it waited
MAX_EVENTS = 2000


@dataclass
class Job:
    id: str
    kind: str  # prepare, create, train, generate
    request: dict[str, Any]  # what the client asked for (names, never paths)
    status: str = "queued"
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    error: str | None = None
    events: deque = field(default_factory=lambda: deque(maxlen=MAX_EVENTS))
    sequence: int = 0
    device: str = ""  # where it runs or ran
    stop: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "request": self.request,
            "status": self.status,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "progress": self.progress,
            "result": self.result,
            "error": self.error,
            "device": self.device,
        }

    def resources(self) -> set[str]:
        """What the job writes or reads while it runs, which no other job may change meanwhile."""
        found = set()
        name = self.request.get("embedding") if self.kind == "train" else self.request.get("name")
        if self.kind in ("train", "create") and isinstance(name, str):
            found.add(f"embedding:{name}")
        if self.kind in ("train", "prepare") and isinstance(self.request.get("set"), str):
            found.add(f"set:{self.request['set']}")
        return found


class JobStore:
    """Jobs in memory and on disk (workspace/jobs/ID.json), safe to use from any thread."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.lock = threading.Lock()
        self.jobs: dict[str, Job] = {}
        self._saved_at: dict[str, float] = {}
        self._unsaved: set[str] = set()  # jobs whose last change could not be written (a full disk)
        self._watchers: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self.closed = False  # the server is shutting down: changes() ends
        for path in sorted(folder.glob("*.json")):
            try:
                data = json.loads(path.read_text("utf-8"))
                job = Job(
                    id=data["id"],
                    kind=data["kind"],
                    request=data.get("request", {}),
                    status=data.get("status", "failed"),
                    created=data.get("created", 0.0),
                    started=data.get("started"),
                    finished=data.get("finished"),
                    progress=data.get("progress", {}),
                    result=data.get("result"),
                    error=data.get("error"),
                    device=str(data.get("device") or ""),
                )
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring unreadable job file %s (%s)", path, exc)
                continue
            if job.status not in FINISHED:
                job.status = "interrupted"
                job.error = "the server stopped while this job was " + ("running" if job.started else "waiting")
                job.finished = job.finished or time.time()
                self._write(job)
            job.done.set()
            self.jobs[job.id] = job

    def _write(self, job: Job) -> None:
        """Save a job's file. A full or read-only disk never fails the caller (a job's progress, or the worker
        ending a job): the job stays right in memory and is saved again at the next write that succeeds."""
        for pending in [job, *(self.jobs[i] for i in sorted(self._unsaved - {job.id}) if i in self.jobs)]:
            try:
                write_json(self.folder / f"{pending.id}.json", pending.public())
            except TistudioError as exc:
                if pending.id not in self._unsaved:
                    log.error(
                        "cannot save job %s (%s); it is kept in memory and saved once the disk allows", pending.id, exc
                    )
                self._unsaved.add(pending.id)
                return
            self._unsaved.discard(pending.id)
            self._saved_at[pending.id] = time.monotonic()

    def create(self, kind: str, request: dict[str, Any]) -> Job:
        job = Job(id=time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3), kind=kind, request=request)
        with self.lock:
            self.jobs[job.id] = job
            self._write(job)
        return job

    def get(self, job_id: str) -> Job | None:
        with self.lock:
            return self.jobs.get(job_id)

    def all(self) -> list[Job]:
        with self.lock:
            return sorted(self.jobs.values(), key=lambda j: j.created, reverse=True)

    def event(self, job: Job, kind: str, **data: Any) -> None:
        with self.lock:
            job.sequence += 1
            job.events.append({"seq": job.sequence, "type": kind, "time": time.time(), **data})
            if kind == "progress":
                job.progress = data
            if time.monotonic() - self._saved_at.get(job.id, 0.0) > 2.0:
                self._write(job)
        self._notify()

    def update(self, job: Job, **changes: Any) -> None:
        with self.lock:
            for key, value in changes.items():
                setattr(job, key, value)
            self._write(job)
        if job.status in FINISHED:
            job.done.set()
        self._notify()

    async def changes(self, timeout: float) -> AsyncIterator[None]:
        """For async code: yields at once, then after each change to any job (an event, a status) or after
        `timeout` seconds without one. Watching begins before each yield, so no change is missed between a look
        and the wait. It ends when the store is closed (the server is shutting down). Use it under
        contextlib.aclosing."""
        loop = asyncio.get_running_loop()
        while not self.closed:
            entry = (loop, loop.create_future())
            with self.lock:
                self._watchers.append(entry)
            try:
                yield
                with contextlib.suppress(asyncio.TimeoutError):  # TimeoutError from Python 3.11
                    await asyncio.wait_for(entry[1], timeout)
            finally:
                with self.lock:
                    self._watchers.remove(entry)

    def close(self) -> None:
        """End every changes() watch, so event streams and waiting requests let a shutdown finish."""
        self.closed = True
        self._notify()

    def _notify(self) -> None:
        with self.lock:
            watchers = list(self._watchers)
        for loop, future in watchers:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting any more
                loop.call_soon_threadsafe(_resolve, future)

    def events_after(self, job: Job, sequence: int) -> list[dict[str, Any]]:
        with self.lock:
            return [e for e in job.events if e["seq"] > sequence]


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


Handler = Callable[["Job", "Worker"], dict[str, Any]]


class Worker(threading.Thread):
    """One device's thread: runs the jobs the pool gives it; `handlers[kind](job, worker)` does the work and returns
    the result dict. It owns the model loaded on its device."""

    def __init__(self, pool: Workers, device: str) -> None:
        super().__init__(name=f"tistudio-worker-{device or 'default'}", daemon=True)
        self.pool, self.device = pool, device
        self.current: Job | None = None
        self.model: Any = None  # loaded on the first job that needs it, then kept

    @property
    def store(self) -> JobStore:
        return self.pool.store

    def run(self) -> None:
        while True:
            job = self.pool.take(self)
            if job is None:
                return
            try:
                self._run(job)
            finally:
                self.pool.finished(self, job)

    def _run(self, job: Job) -> None:
        """One job, ended as done, stopped or failed with its reason whatever its work raises."""
        self.store.update(job, status="running", started=time.time(), device=self.device)
        try:
            result = self.pool.handlers[job.kind](job, self)
            status = "stopped" if job.stop.is_set() else "done"
            self.store.update(job, status=status, result=result, finished=time.time())
        except TistudioError as exc:
            self.store.update(job, status="failed", error=self.pool.words(str(exc)), finished=time.time())
        except Exception as exc:  # a bug: keep serving, show it on the job, keep the traceback in the log
            log.exception("job %s failed", job.id)
            self.store.update(
                job, status="failed", error=f"internal error: {type(exc).__name__}: {exc}", finished=time.time()
            )


class Workers:
    """The server's workers, one per device, and the queue they share."""

    def __init__(
        self,
        store: JobStore,
        handlers: dict[str, Handler],
        devices: tuple[str, ...] = ("",),
        words: Callable[[str], str] = str,
    ) -> None:
        self.store, self.handlers = store, handlers
        self.words = words  # a job's error in the page's words (wording.for_page)
        self.queue: list[str] = []
        self.busy: set[str] = set()  # resources of the running jobs
        self.closing = False
        self.condition = threading.Condition()
        # diffusers and transformers build models under process-wide patches of torch (empty "meta" weights): two
        # threads loading at once break each other, so workers load one at a time
        self.loading = threading.Lock()
        self.workers = [Worker(self, device) for device in devices]

    # -- what routes use ---------------------------------------------------------------------------------------

    def submit(self, kind: str, request: dict[str, Any]) -> Job:
        job = self.store.create(kind, request)
        with self.condition:
            self.queue.append(job.id)
            self.condition.notify_all()
        return job

    def waiting(self) -> int:
        with self.condition:
            return len(self.queue)

    @property
    def running(self) -> list[Job]:
        return [job for job in (w.current for w in self.workers) if job is not None]

    @property
    def current(self) -> Job | None:
        """The running job that started first (the only one with one device)."""
        running = self.running
        return min(running, key=lambda job: job.started or 0.0) if running else None

    @property
    def model(self) -> Any:
        """A loaded model (the first device's that has one), or None."""
        return next((w.model for w in self.workers if w.model is not None), None)

    def devices(self) -> list[dict[str, Any]]:
        return [
            {
                "device": w.device or "default",
                "job": w.current.id if w.current else None,
                "model_loaded": w.model is not None,
            }
            for w in self.workers
        ]

    def running_on(self, resource: str) -> Job | None:
        return next((job for job in self.running if resource in job.resources()), None)

    # -- the threads -------------------------------------------------------------------------------------------

    def start(self) -> None:
        for worker in self.workers:
            if not worker.is_alive():
                worker.start()

    def shutdown(self) -> None:
        """Stop the running jobs at their next step (training saves) and start no more."""
        for job in self.running:
            job.stop.set()
        with self.condition:
            self.closing = True
            self.condition.notify_all()

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            if worker.is_alive():
                worker.join(max(0.0, deadline - time.monotonic()))

    def take(self, worker: Worker) -> Job | None:
        """The next queued job that touches nothing a running job does, for `worker` (waits for one); None when
        the server is shutting down. Jobs stopped while queued end here without running."""
        with self.condition:
            while not self.closing:
                for job_id in list(self.queue):
                    job = self.store.get(job_id)
                    if job is None or job.status != "queued":
                        self.queue.remove(job_id)
                        continue
                    if job.stop.is_set():
                        self.queue.remove(job_id)
                        self.store.update(job, status="cancelled", finished=time.time())
                        continue
                    if job.resources() & self.busy:
                        continue
                    self.queue.remove(job_id)
                    self.busy |= job.resources()
                    worker.current = job
                    return job
                self.condition.wait()
            return None

    def finished(self, worker: Worker, job: Job) -> None:
        with self.condition:
            self.busy -= job.resources()
            worker.current = None
            self.condition.notify_all()
