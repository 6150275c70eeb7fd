"""Training (a job) and its run folders: the loss, the previews, the saved copies, and promoting a saved step."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

from tistudio.config import TrainOptions, check_name, validate_train
from tistudio.embeddings.files import read_embedding
from tistudio.errors import OptionError, TistudioError
from tistudio.server.context import (
    SERVER_FIELDS,
    Server,
    ServerDep,
    embedding_path,
    image_response,
    not_found,
    options_from_body,
    public,
)
from tistudio.server.routes.photos import is_photo
from tistudio.server.wording import without_paths
from tistudio.train.runfolder import RunFolder, read_eval_log, read_loss_log

router = APIRouter()


def train_options(body: dict[str, Any], server: Server) -> tuple[str, TrainOptions]:
    """A client's training request (a set's name and the options) as options, within the server's limits."""
    workspace, limits = server.workspace, server.limits
    body = dict(body or {})
    set_name = check_name(str(body.pop("set", "")), "set")
    folder = workspace.dataset(set_name)
    if not (folder / "manifest.json").is_file():
        folder = workspace.photo_set(set_name)
        if not folder.is_dir():
            raise OptionError("set", set_name, "no photo set or prepared set of this name")
    workspace.without_links(folder, f"set {set_name}")  # and again when the job runs
    name = check_name(str(body.get("embedding", "")), "embedding")
    options = options_from_body(
        TrainOptions,
        body,
        model=server.config.model.model,
        dataset=str(folder),
        embeddings_dir=str(workspace.embeddings),
        loras_dir=str(workspace.loras),
        run_dir=str(workspace.run(name)),
    )
    for field, cap in (
        ("max_steps", limits.train_steps),
        ("batch_size", limits.train_batch),
        ("size", limits.train_size),
        ("gradient_accumulation", limits.train_accumulation),
    ):
        if getattr(options, field) > cap:
            raise OptionError(field, getattr(options, field), f"this server allows at most {cap}")
    validate_train(options)
    embedding_path(workspace, name)
    if folder == workspace.photo_set(set_name) and not any(is_photo(p) for p in folder.iterdir()):
        raise OptionError("set", set_name, "holds no photos yet; upload photos of the subject to it first")
    return set_name, options


@router.post("/api/train")
def start_training(body: dict[str, Any], server: ServerDep) -> dict[str, Any]:
    set_name, options = train_options(body, server)
    return server.workers.submit("train", {"set": set_name, **public(options)}).public()


@router.get("/api/runs/{name}")
def run(name: str, server: ServerDep) -> dict[str, Any]:
    folder = RunFolder(server.workspace.run(name), name)
    if not folder.path.is_dir():
        raise not_found(f"training run {name}")
    options = folder.options()
    return {
        "name": name,
        "loss": read_loss_log(folder.loss_log),
        "eval": [{"step": step, "loss": loss, "likeness": like} for step, loss, like in read_eval_log(folder.eval_log)],
        "kept": kept_step(server, name),
        "report": f"/api/runs/{name}/report" if (folder.path / "report.html").is_file() else None,
        "previews": [
            {
                "step": s,
                "url": f"/api/runs/{name}/previews/{folder.preview_path(s).name}",
                # the step's pictures of further preview prompts (one per line of preview_prompt)
                "more": [f"/api/runs/{name}/previews/{path.name}" for path in folder.more_previews(s)],
            }
            for s in folder.preview_steps()
        ],
        "copies": folder.copy_steps(),
        # what the run recorded, without the server's paths (clients name things; the folders are the server's)
        "options": {
            k: v
            for k, v in without_paths(
                options.get("options", {}), server.workspace.root, server.config.model.model
            ).items()
            if k not in SERVER_FIELDS
        },
        "resolved": without_paths(options.get("resolved", {}), server.workspace.root, server.config.model.model),
    }


def kept_step(server: Server, name: str) -> dict[str, Any] | None:
    """The step the embedding holds and why: the best of a finished run (and its last step), else its own step."""
    path = server.workspace.embeddings / f"{name}.safetensors"
    if not path.is_file():
        return None
    try:
        embedding = read_embedding(path)
    except TistudioError:
        return None
    best_by = embedding.meta.get("best_by")
    if best_by == "chosen":  # use-step
        best_by = "you (Use this step)"
    return {
        "step": embedding.step,
        "by": best_by or "the last step trained",
        "last_step": embedding.meta_count("last_step") or embedding.step,
    }


@router.get("/api/runs/{name}/report")
def report(name: str, server: ServerDep) -> Response:
    """The run's report.html (self-contained: its pictures are inside it)."""
    path = server.workspace.file_in(server.workspace.run(name), "report.html")
    if not path.is_file():
        raise not_found(f"the report of {name}")
    return Response(
        path.read_bytes(),
        media_type="text/html; charset=utf-8",
        headers={
            "Cache-Control": "no-cache",
            "Content-Security-Policy": (
                "default-src 'none'; img-src data:; style-src 'unsafe-inline'; frame-ancestors 'none'"
            ),
        },
    )


@router.get("/api/runs/{name}/previews/{file}")
def preview(name: str, file: str, server: ServerDep) -> Response:
    return image_response(server.workspace.file_in(server.workspace.run(name) / "previews", file))


@router.post("/api/runs/{name}/use-step")
def use_step(name: str, body: dict[str, Any], server: ServerDep) -> dict[str, Any]:
    step = body.get("step") if isinstance(body, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise OptionError("step", step, 'send the step of a saved copy, e.g. {"step": 500}')
    busy = server.workers.running_on(f"embedding:{name}")
    if busy is not None and busy.kind == "train":
        raise OptionError("step", step, f"{name} is training now; stop it first")
    RunFolder(server.workspace.run(name), name).use_step(
        step, server.workspace.embeddings / f"{name}.safetensors", server.workspace.loras
    )
    return {"embedding": name, "step": step}
