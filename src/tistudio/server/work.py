"""The jobs' work, run on the worker thread: each turns a job's request (names, never paths) into the library's
options for the workspace, calls the library, and turns its progress into the job's events."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from tistudio.config import CreateOptions, GenerateOptions, PrepareOptions, TrainOptions
from tistudio.progress import Event, Progress
from tistudio.server.context import ServerConfig
from tistudio.server.jobs import Job, Worker
from tistudio.server.wording import for_page, sentences
from tistudio.server.workspace import Limits, Workspace
from tistudio.storage import size_text


class QuotaWatch:
    """The workspace's cap (--max-workspace-gb) for a job that writes: the job is refused before it starts where
    the workspace is full already, and watched while it runs - at each write it reports, and every few seconds
    between them (TensorBoard's logs, the loss log) - and stopped once the workspace passes the cap. A stopped job
    saves where it is, as a stop from the page does; `reason` says why."""

    EVERY_S = 2.0  # the longest between two looks at the workspace while a job runs
    WRITES = (Event.SAVE, Event.PREVIEW, Event.EVAL, Event.START)

    def __init__(
        self, workspace: Workspace, limits: Limits, job: Job, worker: Worker, writes_per_step: bool = False
    ) -> None:
        self.workspace, self.limits, self.job, self.worker = workspace, limits, job, worker
        self.writes_per_step = writes_per_step  # prepare writes a picture at each step
        self.reason = ""
        self.looked = 0.0
        workspace.make_room(0, limits)

    def __call__(self, progress: Progress) -> None:
        cap = self.limits.workspace_bytes
        if not cap or self.reason:
            return
        now = time.monotonic()
        written = progress.event in self.WRITES or (self.writes_per_step and progress.event == Event.STEP)
        if not written and now - self.looked < self.EVERY_S:
            return
        self.looked = now
        used = self.workspace.used_bytes()
        if used >= cap:
            self.reason = (
                f"stopped because the workspace is full: {size_text(used)} of the {size_text(cap)} this server "
                "allows; what was done is saved. Delete photo sets, embeddings or images to make room, then go on"
            )
            self.job.stop.set()
            self.worker.store.event(self.job, "message", text=self.reason)


class Work:
    """One method per job kind: (job, worker) -> the job's result."""

    def __init__(self, workspace: Workspace, config: ServerConfig) -> None:
        self.workspace, self.config = workspace, config

    def handlers(self) -> dict[str, Callable[[Job, Worker], dict[str, Any]]]:
        return {"prepare": self.prepare, "create": self.create, "train": self.train, "generate": self.generate}

    def model_for(self, worker: Worker, job: Job) -> Any:
        """The worker's model, loaded on the first job that needs it."""
        if worker.model is None:
            from tistudio.models.loading import load_model

            options = replace(self.config.model, device=worker.device) if worker.device else self.config.model
            where = f" on {worker.device}" if worker.device else ""
            worker.store.event(job, "message", text=f"loading the model {self.config.model.model}{where}")
            with worker.pool.loading:
                worker.model = load_model(options, self.config.cache_dir)
        return worker.model

    def prepare(self, job: Job, worker: Worker) -> dict[str, Any]:
        from tistudio.prepare.preprocess import prepare

        name = job.request["set"]
        options = PrepareOptions(
            **{k: v for k, v in job.request.items() if k != "set"},
            photos=str(self.workspace.without_links(self.workspace.photo_set(name), f"photo set {name}")),
            out=str(self.workspace.dataset(name)),
        )
        if not hasattr(worker, "detector"):
            from tistudio.prepare.faces import FaceDetector

            worker.detector = FaceDetector()  # type: ignore[attr-defined]

        quota = QuotaWatch(self.workspace, self.config.limits, job, worker, writes_per_step=True)

        def progress(p: Progress) -> None:
            quota(p)
            worker.store.event(job, "progress", step=p.step, total=p.total, source=p.message)

        identity = None
        if options.identity != "off" and options.crop != "center":
            if getattr(worker, "face_identity", None) is None:
                from tistudio.prepare.preprocess import load_identity

                worker.face_identity = load_identity(options.identity)  # type: ignore[attr-defined]
            identity = worker.face_identity  # type: ignore[attr-defined]
        result = prepare(options, on_progress=progress, stop=job.stop, detector=worker.detector, identity=identity)
        return {
            "set": name,
            "usable": len(result.usable),
            "total": len(result.items),
            "verdict": result.verdict,
            "processed": result.processed,
            "reused": result.reused,
            **({"stopped": quota.reason} if quota.reason else {}),
        }

    def create(self, job: Job, worker: Worker) -> dict[str, Any]:
        from tistudio.train.create import create_embedding

        options = CreateOptions(
            **{**job.request, "model": self.config.model.model, "embeddings_dir": str(self.workspace.embeddings)}
        )
        path = create_embedding(options, cache_dir=self.config.cache_dir, model=self.model_for(worker, job))
        return {"embedding": options.name, "file": path.name}

    def train(self, job: Job, worker: Worker) -> dict[str, Any]:
        from tistudio.train.loop import train

        request = {k: v for k, v in job.request.items() if k != "set"}
        name = request["embedding"]
        dataset = self.workspace.dataset(job.request["set"])
        if not (dataset / "manifest.json").is_file():
            dataset = self.workspace.photo_set(job.request["set"])
        self.workspace.without_links(dataset, f"set {job.request['set']}")
        options = TrainOptions(
            **request,
            model=self.config.model.model,
            dataset=str(dataset),
            embeddings_dir=str(self.workspace.embeddings),
            loras_dir=str(self.workspace.loras),
            run_dir=str(self.workspace.run(name)),
        )

        quota = QuotaWatch(self.workspace, self.config.limits, job, worker)

        def progress(p: Progress) -> None:
            quota(p)
            if p.event == Event.STEP:
                worker.store.event(
                    job,
                    "progress",
                    step=p.step,
                    total=p.total,
                    loss=p.loss,
                    lr=p.lr,
                    epoch=p.epoch,
                    eta_s=p.eta_s,
                    elapsed_s=p.elapsed_s,
                )
            elif p.event == Event.PREVIEW and p.path:
                file = Path(p.path).name
                worker.store.event(job, "preview", step=p.step, url=f"/api/runs/{name}/previews/{file}")
            elif p.event == Event.EVAL:
                worker.store.event(job, "eval", step=p.step, loss=p.loss, likeness=p.likeness)
            elif p.event in (Event.SAVE, Event.START, Event.ENCODE):
                worker.store.event(job, str(p.event), step=p.step, text=p.message)

        result = train(
            options,
            cache_dir=self.config.cache_dir,
            model=self.model_for(worker, job),
            on_progress=progress,
            stop=job.stop,
        )
        return {
            "embedding": name,
            "step": result.step,
            "stopped": result.stopped,
            "message": for_page(sentences(quota.reason, result.message), self.workspace.root),
            **({"stopped_because": for_page(sentences(quota.reason), self.workspace.root)} if quota.reason else {}),
            "last_loss": result.last_loss,
        }

    def generate(self, job: Job, worker: Worker) -> dict[str, Any]:
        from tistudio.generate.images import generate

        options = GenerateOptions(
            **{
                **job.request,
                "model": self.config.model.model,
                "embeddings_dir": str(self.workspace.embeddings),
                "loras_dir": str(self.workspace.loras),
                "out_dir": str(self.workspace.outputs),
            }
        )

        def progress(p: Progress) -> None:
            worker.store.event(job, "progress", step=p.step, total=p.total, elapsed_s=p.elapsed_s)

        model = self.model_for(worker, job)
        images = generate(options, cache_dir=self.config.cache_dir, model=model, on_progress=progress, stop=job.stop)
        width, height = images[0].image.size if images else (0, 0)
        return {
            "images": [
                {"file": i.path.name, "url": f"/api/outputs/{i.path.name}", "seed": i.seed, "infotext": i.infotext}
                for i in images
                if i.path
            ],
            "width": width,
            "height": height,
            "model_hash": model.hash,
        }
