"""Generation (a job) and the pictures it made."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

from tistudio.config import GenerateOptions, parse_size, validate_generate
from tistudio.errors import OptionError
from tistudio.server.context import Server, ServerDep, image_response, not_found, options_from_body, public

router = APIRouter()


def generate_options(body: Any, server: Server) -> GenerateOptions:
    """A client's generation request as options, within the server's limits."""
    workspace, limits = server.workspace, server.limits
    options = options_from_body(
        GenerateOptions,
        body,
        model=server.config.model.model,
        embeddings_dir=str(workspace.embeddings),
        loras_dir=str(workspace.loras),
        out_dir=str(workspace.outputs),
    )
    validate_generate(options)
    if options.batch > limits.generate_batch:
        raise OptionError("batch", options.batch, f"this server allows at most {limits.generate_batch}")
    if options.steps > limits.generate_steps:
        raise OptionError("steps", options.steps, f"this server allows at most {limits.generate_steps}")
    if options.batch * options.batch_count > limits.generate_images:
        raise OptionError(
            "batch_count",
            options.batch_count,
            f"this server makes at most {limits.generate_images} images a request (batch x batch count)",
        )
    size = parse_size(options.size)
    if size and max(size) > limits.generate_side:
        raise OptionError("size", options.size, f"this server allows at most {limits.generate_side} px a side")
    width, height = size or (1024, 1024)
    images = options.batch * options.batch_count
    workspace.make_room(images * width * height * 3 // 2, limits)  # the PNGs' size, about, at the most
    return options


@router.post("/api/generate")
def start_generation(body: dict[str, Any], server: ServerDep) -> dict[str, Any]:
    return server.workers.submit("generate", public(generate_options(body, server))).public()


@router.get("/api/outputs")
def outputs(server: ServerDep, limit: int = 100) -> list[dict[str, Any]]:
    from PIL import Image

    files = sorted(server.workspace.outputs.glob("*.png"), key=lambda p: p.stat().st_mtime, reverse=True)
    out = []
    for path in files[: max(1, min(limit, 500))]:
        try:
            with Image.open(path) as image:
                text = image.text.get("parameters", "") if hasattr(image, "text") else ""
        except OSError:
            text = ""
        out.append({"file": path.name, "url": f"/api/outputs/{path.name}", "infotext": text})
    return out


@router.get("/api/outputs.zip")
def outputs_zip(files: str, server: ServerDep) -> Response:
    """Several generated pictures as one zip (a batch's download): `files` names them, comma-separated."""
    import io
    import zipfile

    names = [name for name in files.split(",") if name]
    if len(names) > 100:
        raise OptionError("files", f"{len(names)} pictures", "a zip holds at most 100 pictures; ask for fewer")
    if not names:
        raise OptionError("files", files, "name the pictures, comma-separated: files=00001-5.png,00002-6.png")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:  # PNGs are compressed already
        for name in names:
            path = server.workspace.file_in(server.workspace.outputs, name)
            if not path.is_file():
                raise not_found(name)
            archive.write(path, path.name)
    return Response(
        buffer.getvalue(),
        media_type="application/zip",
        headers={"Content-Disposition": 'attachment; filename="tistudio-pictures.zip"'},
    )


@router.get("/api/outputs/{file}")
def output(file: str, server: ServerDep) -> Response:
    return image_response(server.workspace.file_in(server.workspace.outputs, file))
