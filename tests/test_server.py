"""The HTTP API, in-process: the whole workflow as jobs, the A1111-compatible subset, restarts, and the rules
that keep a local server safe."""

from __future__ import annotations

import base64
import io
import json
import os
import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from tistudio.cli import main
from tistudio.config import ModelOptions
from tistudio.server import ServerConfig, create_app
from tistudio.server.workspace import Limits
from tistudio.templates import SHIPPED

BASE = "http://127.0.0.1:7860"


def client_for(workspace: Path, model: Path, cache: Path, **config) -> TestClient:
    app = create_app(ServerConfig(workspace=workspace, model=ModelOptions(model=str(model)), cache_dir=cache, **config))
    return TestClient(app, base_url=BASE)


@pytest.fixture
def client(tmp_path, tiny_sd1, cache_dir):
    with client_for(tmp_path / "ws", tiny_sd1, cache_dir) as test_client:
        yield test_client


def wait(client: TestClient, job: dict, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/jobs/{job['id']}").json()
        if job["status"] in ("done", "failed", "stopped", "interrupted", "cancelled"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job['id']} did not finish")


def upload(client: TestClient, name: str, photos: Path) -> dict:
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in sorted(photos.glob("*.png"))]
    return client.post(f"/api/photosets/{name}/photos", files=files)


def test_photos_keep_their_shape_in_buckets_through_the_api(client, tmp_path) -> None:
    """Issue 32: the prepare and train forms have the buckets choice, the photo report names each picture's bucket,
    and the run says what it trained on."""
    from corpus import shaped_photos

    schema = client.get("/api/schema").json()
    assert {"buckets"} <= {f["name"] for f in schema["prepare"]} & {f["name"] for f in schema["train"]}
    client.post("/api/photosets/tomtut")
    upload(client, "tomtut", shaped_photos(tmp_path / "shaped", per_shape=1))
    job = client.post("/api/photosets/tomtut/prepare", json={"size": 64, "crop": "center", "buckets": "on"}).json()
    assert wait(client, job)["status"] == "done"
    items = {item["source"]: item for item in client.get("/api/datasets/tomtut").json()["items"]}
    assert {name: item["bucket"] for name, item in items.items()} == {
        "tall-0.png": [48, 80],
        "wide-0.png": [80, 48],
        "square-0.png": [64, 64],
    }
    created = client.post("/api/embeddings", json={"name": "tomtut", "init_text": "toy", "vectors": 1}).json()
    assert wait(client, created)["status"] == "done"
    train = {"set": "tomtut", "embedding": "tomtut", "max_steps": 2, "preview_every": 0, "size": 64, "buckets": "on"}
    assert wait(client, client.post("/api/train", json=train).json())["status"] == "done"
    resolved = client.get("/api/runs/tomtut").json()["resolved"]
    assert resolved["buckets"] == "on: 1 x 48x80, 1 x 64x64, 1 x 80x48"


def test_the_whole_workflow_through_the_api(client, photos) -> None:
    assert client.get("/api/status").json()["demo"] is False
    assert client.post("/api/photosets/tomtut").status_code == 200
    assert len(upload(client, "tomtut", photos).json()["saved"]) == 6
    prepared = wait(client, client.post("/api/photosets/tomtut/prepare", json={"size": 64, "flip": True}).json())
    assert prepared["status"] == "done" and prepared["result"]["usable"] == 6
    report = client.get("/api/datasets/tomtut").json()
    assert report["verdict"] and len(report["items"]) == 6
    assert client.get(report["items"][0]["images"][0]).headers["content-type"] == "image/png"

    created = wait(
        client, client.post("/api/embeddings", json={"name": "tomtut", "init_text": "toy", "vectors": 2}).json()
    )
    assert created["status"] == "done"
    assert [e["name"] for e in client.get("/api/embeddings").json()] == ["tomtut"]

    job = client.post(
        "/api/train",
        json={
            "set": "tomtut",
            "embedding": "tomtut",
            "max_steps": 6,
            "preview_every": 3,
            "save_every": 3,
            "preview_steps": 2,
            "batch_size": 2,
        },
    ).json()
    with client.stream("GET", f"/api/jobs/{job['id']}/events") as stream:
        kinds = [line.split(": ", 1)[1] for line in stream.iter_lines() if line.startswith("event: ")]
    assert "progress" in kinds and "preview" in kinds and kinds[-1] == "end"
    trained = wait(client, job)
    assert trained["status"] == "done" and trained["result"]["step"] == 6
    run = client.get("/api/runs/tomtut").json()
    assert [row["step"] for row in run["loss"]] == [1, 2, 3, 4, 5, 6]
    server = client.app.state.server
    for answer in (client.get("/api/runs/tomtut").text, client.get("/api/status").text, client.get("/api/jobs").text):
        assert str(server.workspace.root) not in answer and server.config.model.model not in answer
    assert run["resolved"]["embedding_file"] == "embeddings/tomtut.safetensors" and "dataset" not in run["options"]
    assert [p["step"] for p in run["previews"]] == [0, 3, 6] and run["copies"] == [3, 6]
    assert client.get(run["previews"][1]["url"]).status_code == 200
    assert client.post("/api/runs/tomtut/use-step", json={"step": 3}).json() == {"embedding": "tomtut", "step": 3}
    assert client.get("/api/embeddings/tomtut").json()["step"] == 3

    generated = wait(
        client,
        client.post(
            "/api/generate", json={"prompt": "a photo of tomtut", "steps": 3, "seed": 5, "batch": 2, "size": "64x64"}
        ).json(),
    )
    images = generated["result"]["images"]
    assert [i["seed"] for i in images] == [5, 6] and "TI hashes" in images[0]["infotext"]
    assert {o["file"] for o in client.get("/api/outputs").json()} == {i["file"] for i in images}
    assert client.get(images[0]["url"]).content[:8] == b"\x89PNG\r\n\x1a\n"
    assert client.get("/api/embeddings/tomtut/file").content[8:9] == b"{"  # a safetensors file


def test_the_a1111_subset(client, tmp_path) -> None:
    from tistudio.embeddings.files import Embedding, write_embedding

    write_embedding(
        Embedding(name="tomtut", vectors={"clip": torch.randn(2, 64)}, step=40),
        tmp_path / "ws" / "embeddings" / "tomtut.safetensors",
    )
    write_embedding(
        Embedding(name="wide", vectors={"clip": torch.randn(1, 768)}),
        tmp_path / "ws" / "embeddings" / "wide.safetensors",
    )
    answer = client.post(
        "/sdapi/v1/txt2img",
        json={
            "prompt": "a photo of tomtut",
            "negative_prompt": "blurry",
            "seed": 42,
            "steps": 3,
            "width": 64,
            "height": 64,
            "sampler_name": "DPM++ 2M",
            "scheduler": "Karras",
            "cfg_scale": 6,
            "batch_size": 2,
            "restore_faces": False,
        },
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert len(body["images"]) == 2 and body["parameters"]["prompt"] == "a photo of tomtut"
    image = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
    assert image.size == (64, 64) and "Sampler: DPM++ 2M, Schedule type: Karras" in image.text["parameters"]
    info = json.loads(body["info"])
    assert info["all_seeds"] == [42, 43] and info["seed"] == 42
    embeddings = client.get("/sdapi/v1/embeddings").json()
    assert embeddings["loaded"]["tomtut"] == {
        "step": 40,
        "sd_checkpoint": None,
        "sd_checkpoint_name": None,
        "shape": 64,
        "vectors": 2,
        "kept_step": 40,
        "kept_because": "it is the last step trained",
        "last_step": 40,
    }
    assert "wide" in embeddings["skipped"]
    progress = client.get("/sdapi/v1/progress").json()
    assert set(progress) >= {"progress", "eta_relative", "state", "current_image"}
    assert client.post("/sdapi/v1/interrupt").json() == {}
    refused = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "sampler_name": "Magic"})
    assert refused.status_code == 400 and "unknown sampler" in refused.json()["error"]


def test_jobs_survive_a_restart_and_training_resumes(tmp_path, tiny_sd1, cache_dir, photos) -> None:
    workspace = tmp_path / "ws"
    with client_for(workspace, tiny_sd1, cache_dir) as client:
        upload(client, "tomtut", photos)
        wait(client, client.post("/api/embeddings", json={"name": "tomtut", "vectors": 2}).json())
        first = wait(
            client,
            client.post(
                "/api/train",
                json={"set": "tomtut", "embedding": "tomtut", "max_steps": 4, "size": 64, "preview_every": 0},
            ).json(),
        )
        assert first["result"]["step"] == 4
    # A server that died while training: its job file still says "running".
    record = json.loads((workspace / "jobs" / f"{first['id']}.json").read_text())
    record.update(status="running", finished=None, request={**record["request"], "max_steps": 7})
    (workspace / "jobs" / "crashed.json").write_text(json.dumps({**record, "id": "crashed"}))
    with client_for(workspace, tiny_sd1, cache_dir) as client:
        crashed = client.get("/api/jobs/crashed").json()
        assert crashed["status"] == "interrupted" and "stopped while this job was running" in crashed["error"]
        resumed = wait(client, client.post("/api/jobs/crashed/resume").json())
        assert resumed["status"] == "done" and resumed["result"]["step"] == 7
        steps = [row["step"] for row in client.get("/api/runs/tomtut").json()["loss"]]
        assert steps == list(range(1, 8))  # continued from step 4, nothing repeated or lost


def test_a_running_training_stops_and_saves_on_request(client, photos) -> None:
    upload(client, "tomtut", photos)
    wait(client, client.post("/api/embeddings", json={"name": "tomtut", "vectors": 2}).json())
    job = client.post(
        "/api/train", json={"set": "tomtut", "embedding": "tomtut", "max_steps": 100000, "size": 64, "preview_every": 0}
    ).json()
    deadline = time.monotonic() + 60
    while client.get(f"/api/jobs/{job['id']}").json()["progress"].get("step", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    client.post(f"/api/jobs/{job['id']}/stop")
    stopped = wait(client, job)
    assert stopped["status"] == "stopped" and stopped["result"]["stopped"]
    assert client.get("/api/embeddings/tomtut").json()["step"] == stopped["result"]["step"] > 0


def test_uploaded_embeddings_are_read_safely_and_stored_as_safetensors(client, tmp_path) -> None:
    buffer = io.BytesIO()
    torch.save(
        {"string_to_token": {"*": 265}, "string_to_param": {"*": torch.ones(2, 64)}, "name": "old", "step": 9}, buffer
    )
    answer = client.post("/api/embeddings/upload", files={"file": ("old.pt", buffer.getvalue())})
    assert answer.status_code == 200 and answer.json()["step"] == 9
    assert (tmp_path / "ws" / "embeddings" / "old.safetensors").is_file()

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = io.BytesIO()
    torch.save({"string_to_param": {"*": torch.ones(1, 64)}, "x": Payload()}, evil)
    refused = client.post("/api/embeddings/upload", files={"file": ("evil.pt", evil.getvalue())})
    assert refused.status_code == 400 and "refused" in refused.json()["error"]
    assert not marker.exists() and not (tmp_path / "ws" / "embeddings" / "evil.safetensors").exists()
    assert not list((tmp_path / "ws" / "embeddings").glob(".*"))


# -- safe by default ---------------------------------------------------------------------------------------------


def test_other_hosts_and_cross_site_requests_are_refused(client) -> None:
    rebinding = client.get("/api/status", headers={"Host": "attacker.example:7860"})
    assert rebinding.status_code == 403 and "not this computer" in rebinding.json()["error"]
    for headers in ({"Origin": "http://attacker.example"}, {"Sec-Fetch-Site": "cross-site"}, {"Origin": "null"}):
        answer = client.post("/api/photosets/x", headers=headers)
        assert answer.status_code == 403, headers
    assert client.post("/api/photosets/x", headers={"Origin": BASE}).status_code == 200
    assert "access-control-allow-origin" not in client.get("/api/status", headers={"Origin": "http://a.b"}).headers


def test_auth_is_required_when_configured(tmp_path, tiny_sd1, cache_dir) -> None:
    with client_for(tmp_path / "ws", tiny_sd1, cache_dir, auth=[("ann", "s3cret")], listening=True) as client:
        refused = client.get("/api/status")
        assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Basic")
        assert client.get("/", auth=("ann", "wrong")).status_code == 401
        assert client.get("/api/status", auth=("ann", "s3cret")).status_code == 200
        # Listening with auth: any Host name is fine (the password protects it).
        assert client.get("/api/status", auth=("ann", "s3cret"), headers={"Host": "box.lan:7860"}).status_code == 200


def test_wrong_passwords_lock_the_address_out_for_a_while(tmp_path, tiny_sd1, cache_dir, monkeypatch) -> None:
    from tistudio.server import security

    monkeypatch.setattr(security, "AUTH_WINDOW_S", 1.0)
    with client_for(tmp_path / "ws", tiny_sd1, cache_dir, auth=[("ann", "s3cret")], listening=True) as client:
        assert client.get("/api/status").status_code == 401  # no password at all: not counted
        for _ in range(security.AUTH_FAILURES):
            assert client.get("/api/status", auth=("ann", "guess")).status_code == 401
        locked = client.get("/api/status", auth=("ann", "s3cret"))  # even the right one, until the window passes
        assert locked.status_code == 429 and locked.headers["retry-after"] == "1"
        time.sleep(1.1)
        assert client.get("/api/status", auth=("ann", "s3cret")).status_code == 200


def test_listen_refuses_to_start_without_auth(capsys, tmp_path) -> None:
    assert main(["serve", "--listen", "--workspace", str(tmp_path / "ws")]) == 2
    assert "needs a password" in capsys.readouterr().err
    assert main(["serve", "--host", "0.0.0.0", "--workspace", str(tmp_path / "ws")]) == 2


def test_clients_never_name_server_paths(client, photos, tmp_path) -> None:
    sneaky = [("files", ("../../escape.png", (photos / "01-toy figure.png").read_bytes(), "image/png"))]
    saved = client.post("/api/photosets/tomtut/photos", files=sneaky).json()["saved"]
    assert saved == ["escape.png"] and (tmp_path / "ws" / "photos" / "tomtut" / "escape.png").is_file()
    assert not (tmp_path / "escape.png").exists() and not (tmp_path / "ws" / "escape.png").exists()
    for url in (
        "/api/photosets/..%2F..%2Fetc/photos/passwd",
        "/api/photosets/tomtut/photos/..%2F..%2Fjobs",
        "/api/runs/..%2Fjobs/previews/x.png",
        "/api/outputs/..%2Fembeddings%2Fx",
    ):
        answer = client.get(url)
        assert answer.status_code in (400, 404), url
    assert client.post("/api/photosets/../x").status_code in (400, 404)
    for body, field in (
        ({"prompt": "x", "model": "/etc/passwd"}, "model"),
        ({"prompt": "x", "embeddings_dir": "/"}, "embeddings_dir"),
        ({"prompt": "x", "out_dir": "/tmp"}, "out_dir"),
    ):
        answer = client.post("/api/generate", json=body)
        assert answer.status_code == 400 and answer.json()["field"] == field
    answer = client.post("/api/train", json={"set": "tomtut", "embedding": "tomtut", "template": "/etc/passwd"})
    assert answer.status_code == 400


def test_every_field_is_checked_before_a_job_is_queued(client, photos) -> None:
    upload(client, "tomtut", photos)
    for url, body, field in (
        ("/api/train", {"set": "tomtut", "embedding": "tomtut", "preview_sampler": "Eulr"}, "preview_sampler"),
        ("/api/generate", {"prompt": "x", "sampler": "Eulr"}, "sampler"),
    ):
        answer = client.post(url, json=body)
        assert answer.status_code == 400 and answer.json()["field"] == field, answer.json()
        assert "unknown sampler" in answer.json()["error"]
    assert client.get("/api/jobs").json() == []
    schema = client.get("/api/schema").json()
    train = {f["name"]: f for f in schema["train"]}
    assert train["preview_sampler"]["advanced"] and "Euler" in train["preview_sampler"]["choices"]
    assert train["template"]["choices"] == list(SHIPPED)
    assert not train["max_steps"]["advanced"]


def test_uploads_and_requests_are_capped(tmp_path, tiny_sd1, cache_dir, photos) -> None:
    limits = Limits(upload_bytes=2000, photos_per_set=3, generate_batch=2, train_steps=50)
    with client_for(tmp_path / "ws", tiny_sd1, cache_dir, limits=limits) as client:
        big = client.post("/api/photosets/a/photos", files=[("files", ("big.png", b"x" * 5000, "image/png"))])
        assert big.status_code == 413 and "larger than 1.95 KB" in big.json()["error"]  # 2000 bytes, not "0 MB"
        many = [("files", (f"{i}.png", b"x", "image/png")) for i in range(4)]
        too_many = client.post("/api/photosets/a/photos", files=many)
        assert too_many.status_code == 400 and "a holds 0, so at most 3 more" in too_many.json()["error"]
        assert client.post("/api/generate", json={"prompt": "x", "batch": 3}).json()["field"] == "batch"
        assert client.post("/api/train", json={"set": "a", "embedding": "a", "max_steps": 51}).status_code == 400
        for field, value in (("size", 2048), ("gradient_accumulation", 1024)):  # each within the options' range
            answer = client.post("/api/train", json={"set": "a", "embedding": "a", "max_steps": 10, field: value})
            assert answer.status_code == 400 and answer.json()["field"] == field, answer.json()
    with client_for(tmp_path / "ws2", tiny_sd1, cache_dir, limits=Limits(request_bytes=1000)) as client:
        answer = client.post("/api/photosets/a/photos", files=[("files", ("x.png", b"y" * 3000, "image/png"))])
        assert answer.status_code == 413


def test_a_full_workspace_refuses_more_with_507(tmp_path, tiny_sd1, cache_dir, photos) -> None:
    png = sorted(photos.glob("*.png"))[0].read_bytes()
    with client_for(tmp_path / "ws", tiny_sd1, cache_dir, limits=Limits(workspace_bytes=len(png) * 2 + 100)) as client:
        first = client.post(
            "/api/photosets/a/photos",
            files=[("files", ("1.png", png, "image/png")), ("files", ("2.png", png, "image/png"))],
        ).json()
        assert first["saved"] == ["1.png", "2.png"]
        full = client.post("/api/photosets/a/photos", files=[("files", ("3.png", png, "image/png"))])
        assert full.status_code == 507 and "the workspace is full" in full.json()["error"]
        assert "delete photo sets" in full.json()["error"] and str(tmp_path) not in full.text
        assert client.post("/api/generate", json={"prompt": "x"}).status_code == 507
        client.delete("/api/photosets/a/photos/2.png")
        assert client.post("/api/photosets/a/photos", files=[("files", ("3.png", png, "image/png"))]).json()[
            "saved"
        ] == ["3.png"]


def test_no_other_site_may_frame_the_page_and_case_does_not_hide_a_cross_site_request(client) -> None:
    page = client.get("/")
    assert (
        page.headers["x-frame-options"] == "DENY"
        and "frame-ancestors 'none'" in page.headers["content-security-policy"]
    )
    assert client.get("/api/status").headers["x-content-type-options"] == "nosniff"
    assert client.post("/api/photosets/x", headers={"Sec-Fetch-Site": "Cross-Site"}).status_code == 403


def test_names_with_a_final_newline_are_refused(client) -> None:
    """'$' matches before a final newline: 's2\\n' once made a folder."""
    answer = client.post("/api/photosets/s2%0A")
    assert answer.status_code == 400 and answer.json()["field"] == "set"
    assert client.post("/api/embeddings", json={"name": "zqxnl\n", "init_text": "toy"}).status_code == 400
    assert not any("\n" in p.name for p in (client.app.state.server.workspace.root).rglob("*"))


def test_a_malformed_request_is_answered_briefly_naming_the_field(client) -> None:
    """FastAPI's 422 repeats the whole input: a 150 MB body came back as 900 MB. Ours names the field only."""
    blob = "x" * 2_000_000
    answer = client.post(
        "/sdapi/v1/txt2img",
        content=json.dumps({"prompt": "a", "steps": blob}),
        headers={"content-type": "application/json"},
    )
    assert answer.status_code in (400, 422) and len(answer.content) < 1000
    assert "steps" in answer.text
    broken = client.post("/api/train", content=b"{" + b"x" * 1_000_000, headers={"content-type": "application/json"})
    assert broken.status_code in (400, 422) and len(broken.content) < 1000


def test_a_chunked_body_past_the_cap_is_refused_as_it_arrives(tmp_path, tiny_sd1, cache_dir) -> None:
    """A request without a length (chunked) is counted as it arrives, and refused once past the cap, not spooled
    whole first."""
    with client_for(tmp_path / "ws", tiny_sd1, cache_dir, limits=Limits(request_bytes=1024 * 1024)) as capped:
        sent = {"bytes": 0}

        def chunks():
            for _ in range(64):
                sent["bytes"] += 256 * 1024
                yield b"x" * (256 * 1024)

        answer = capped.post(
            "/api/photosets/x/photos", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"}
        )
        assert answer.status_code == 413 and "larger than" in answer.json()["error"]
        assert capped.post("/api/photosets/y").status_code == 200  # and it keeps serving


@pytest.mark.parametrize("field", ["steps", "cfg_scale", "seed", "width", "height", "batch_size", "n_iter"])
@pytest.mark.parametrize("value", ["abc", "NaN", "Infinity", "1e400", [1], {"a": 1}, True, 1.5])
def test_txt2img_answers_a_bad_number_with_a_400_naming_the_field(client, field, value) -> None:
    if value == 1.5 and field == "cfg_scale":
        return  # a fine guidance scale
    raw = (
        json.dumps({"prompt": "a toy", field: value})
        if not isinstance(value, str) or value == "abc"
        else f'{{"prompt": "a toy", "{field}": {value}}}'
    )
    answer = client.post("/sdapi/v1/txt2img", content=raw, headers={"content-type": "application/json"})
    assert answer.status_code in (400, 422), (field, value, answer.text)
    assert field in answer.json()["error"] or answer.json().get("field") == field


def test_uploads_keep_every_photo_with_an_odd_name_and_say_which_files_they_refuse(client, photos) -> None:
    """Accented and camera names are made safe, not refused; a caption sidecar is kept as a caption (not a photo);
    a text file posing as a photo is refused by name while the rest of the batch is kept."""
    png = (photos / "01-toy figure.png").read_bytes()
    files = [
        ("files", ("Été photo (1).jpg", png, "image/jpeg")),
        ("files", ("_DSC0001.JPG", png, "image/jpeg")),
        ("files", ("DSC0001.txt", b"smiling, on a beach", "text/plain")),
        ("files", ("notes.png", b"just some notes", "image/png")),
        ("files", ("Ete photo _1_.jpg", png[:-1] + b"\0", "image/jpeg")),
    ]
    answer = client.post("/api/photosets/trip/photos", files=files).json()
    assert answer["saved"] == ["Ete photo _1_.jpg", "DSC0001.JPG", "DSC0001.txt", "Ete photo _1_-2.jpg"]
    assert [r["file"] for r in answer["refused"]] == ["notes.png"] and "not a photo" in answer["refused"][0]["reason"]
    listed = client.get("/api/photosets/trip").json()["photos"]
    assert sorted(p["file"] for p in listed) == ["DSC0001.JPG", "Ete photo _1_-2.jpg", "Ete photo _1_.jpg"]
    assert {s["name"]: s["photos"] for s in client.get("/api/photosets").json()}["trip"] == 3
    only_bad = client.post("/api/photosets/trip/photos", files=[("files", ("a.png", b"nope", "image/png"))])
    assert only_bad.status_code == 400 and "not a photo" in only_bad.json()["error"]
    # names Windows keeps for devices: a photo is renamed, a set or embedding refused at its field
    device = client.post("/api/photosets/trip/photos", files=[("files", ("CON.jpg", png, "image/jpeg"))]).json()
    assert device["saved"] == ["CON_.jpg"]
    for url, body in (("/api/photosets/nul", None), ("/api/embeddings", {"name": "Com1", "init_text": "toy"})):
        answer = client.post(url, json=body) if body else client.post(url)
        assert answer.status_code == 400 and "Windows keeps" in answer.json()["error"], answer.json()


def test_the_demo_servers_photos_prepare_with_the_default_settings(tmp_path, cache_dir) -> None:
    """The demo's first experience: its 64 px photos prepared with the form's defaults (the demo model's size),
    not refused as too small for 512."""
    from tistudio.demo.run import person_photos

    photos = person_photos(tmp_path / "demo-photos")
    with client_for(tmp_path / "ws", "demo", cache_dir) as demo:
        prepare = {f["name"]: f for f in demo.get("/api/schema").json()["prepare"]}
        assert prepare["size"]["default"] == 64
        files = [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in sorted(photos.iterdir())]
        answer = demo.post("/api/photosets/tomtut/photos", files=files).json()
        assert len(answer["saved"]) == 30 and not answer["refused"]  # 15 photos and their 15 captions
        done = wait(demo, demo.post("/api/photosets/tomtut/prepare", json={}).json())
        assert done["status"] == "done", done
        report = demo.get("/api/datasets/tomtut").json()
        assert sum(item["status"] == "ok" for item in report["items"]) == 15, report["verdict"]
        # the demo's crisp, varied 64-px pictures were called blurry (sharpness taken at 512 px) and duplicates
        assert report["verdict"] == ["Looks good: 15 sharp, distinct images with varied poses and backgrounds."]


def test_the_api_docs_load_nothing_from_elsewhere(client) -> None:
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/api/photosets/{name}/photos" in docs.text and "/openapi.json" in docs.text
    assert "cdn" not in docs.text.lower() and "src='http" not in docs.text and 'src="http' not in docs.text
    assert client.get("/redoc").status_code == 404
    assert "/api/status" in client.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0"])
def test_serve_refuses_a_nonsense_upload_cap_in_one_line(value, capsys, tmp_path) -> None:
    assert main(["serve", "--workspace", str(tmp_path / "ws"), "--max-upload-mb", value]) == 2
    err = capsys.readouterr().err.strip()
    assert "max_upload_mb" in err and "positive" in err and len(err.splitlines()) == 1


def test_symlinks_planted_in_the_workspace_lead_nowhere(client, tmp_path) -> None:
    """A link in the workspace that points out of it (someone with shell access, a synced folder) is refused by
    every route, and the refusal names no server folder."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"\x89PNG\r\n\x1a\n secret")
    from tistudio.embeddings.files import Embedding, write_embedding

    write_embedding(Embedding(name="stolen", vectors={"clip": torch.ones(1, 32)}), outside / "stolen.safetensors")
    workspace = tmp_path / "ws"
    (workspace / "photos" / "linked").symlink_to(outside, target_is_directory=True)
    (workspace / "embeddings" / "stolen.safetensors").symlink_to(outside / "stolen.safetensors")
    for url in ("/api/photosets/linked", "/api/embeddings/stolen/file", "/api/photosets/linked/photos/secret.png"):
        answer = client.get(url)
        assert answer.status_code in (400, 404), (url, answer.status_code)
        assert str(tmp_path) not in answer.text and "secret" not in answer.text.replace("secret.png", "")
    listed = client.get("/api/photosets")
    assert listed.status_code == 200 and "linked" not in listed.text  # the list still works, without the link
    embeddings = client.get("/api/embeddings").json()
    assert embeddings == [
        {
            "name": "stolen",
            "error": "path='stolen.safetensors': leads outside the workspace",
            "run": False,
            "lora": None,
        }
    ]  # listed with its reason, its contents never read


def test_a_malformed_last_event_id_is_ignored(client, tmp_path) -> None:
    store = client.app.state.server.store
    job = store.create("generate", {"prompt": "x"})
    store.event(job, "message", text="one")
    store.update(job, status="done")
    for given in ("abc", "1" * 40, "0x10", "-3"):
        with client.stream("GET", f"/api/jobs/{job.id}/events", headers={"Last-Event-ID": given}) as stream:
            assert stream.status_code == 200, given
            lines = list(stream.iter_lines())
        assert "event: message" in lines and "event: end" in lines  # from the start, as with no id


def test_an_embedding_in_training_cannot_be_deleted_from_under_it(client, tmp_path) -> None:
    from tistudio.embeddings.files import Embedding, write_embedding

    write_embedding(
        Embedding(name="tomtut", vectors={"clip": torch.ones(1, 32)}),
        tmp_path / "ws" / "embeddings" / "tomtut.safetensors",
    )
    store = client.app.state.server.store
    job = store.create("train", {"set": "tomtut", "embedding": "tomtut"})
    answer = client.delete("/api/embeddings/tomtut")
    assert answer.status_code == 400 and "stop that training first" in answer.json()["error"]
    assert (tmp_path / "ws" / "embeddings" / "tomtut.safetensors").is_file()
    store.update(job, status="stopped")
    assert client.delete("/api/embeddings/tomtut").json() == {"deleted": "tomtut"}


def test_two_workers_train_two_embeddings_at_once_but_never_one_twice(tmp_path, tiny_sd1, cache_dir, photos) -> None:
    """serve --devices with two workers (here both on the CPU): a second training of the same embedding waits for
    the first, and a training of another embedding queued behind it goes ahead on the free worker."""
    from tistudio.models.loading import parse_devices

    with client_for(tmp_path / "ws", tiny_sd1, cache_dir, devices=parse_devices("cpu,cpu")) as client:
        assert [d["device"] for d in client.get("/api/status").json()["devices"]] == ["cpu", "cpu"]
        for name in ("zaax", "zbbx"):
            upload(client, name, photos)
        made = [client.post("/api/embeddings", json={"name": n, "vectors": 1}).json() for n in ("zaax", "zbbx")]
        assert all(wait(client, job)["status"] == "done" for job in made)

        def train(name: str) -> dict:
            return client.post(
                "/api/train",
                json={
                    "set": name,
                    "embedding": name,
                    "max_steps": 100000,
                    "size": 64,
                    "preview_every": 0,
                    "eval_every": 0,
                },
            ).json()

        first, again, other = train("zaax"), train("zaax"), train("zbbx")

        def status_of(job: dict) -> dict:
            return client.get(f"/api/jobs/{job['id']}").json()

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and {status_of(j)["status"] for j in (first, other)} != {"running"}:
            time.sleep(0.05)
        assert status_of(first)["status"] == status_of(other)["status"] == "running"
        assert status_of(again)["status"] == "queued"  # the same embedding: it waits
        status = client.get("/api/status").json()
        assert {d["job"] for d in status["devices"]} == {first["id"], other["id"]}
        assert {j["id"] for j in status["running"]} == {first["id"], other["id"]}
        assert status_of(first)["device"] == "cpu" and status["queued"] == 1
        client.post(f"/api/jobs/{first['id']}/stop")
        stopped = wait(client, first)
        while time.monotonic() < deadline and status_of(again)["status"] == "queued":
            time.sleep(0.05)
        resumed = status_of(again)
        assert resumed["status"] == "running" and resumed["started"] >= stopped["finished"]
        while time.monotonic() < deadline and status_of(again)["progress"].get("step", 0) <= stopped["result"]["step"]:
            time.sleep(0.05)
        for job in (again, other):
            client.post(f"/api/jobs/{job['id']}/stop")
            assert wait(client, job)["status"] == "stopped"
        assert client.get("/api/embeddings/zaax").json()["step"] > stopped["result"]["step"]


@pytest.mark.parametrize(
    ("devices", "message"),
    [
        ("cuda:0", "PyTorch sees no CUDA GPU, so there is no cuda:0"),
        ("gpu1", "'gpu1' is not a device"),
    ],
)
def test_serve_refuses_devices_it_does_not_have_in_one_line(devices, message, capsys, tmp_path) -> None:
    assert main(["serve", "--workspace", str(tmp_path / "ws"), "--devices", devices]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tistudio: error: devices=") and message in err and err.count("\n") == 1


def test_devices_all_is_every_gpu_and_each_gpu_once(monkeypatch) -> None:
    from tistudio.errors import ModelError
    from tistudio.models.loading import parse_devices

    assert parse_devices("all") == ("",)  # no GPU: one worker, as without --devices
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert parse_devices("all") == ("cuda:0", "cuda:1", "cuda:2", "cuda:3")
    assert parse_devices("cuda, cuda:3") == ("cuda:0", "cuda:3")
    with pytest.raises(ModelError, match="cuda:0 is named twice"):
        parse_devices("cuda,cuda:0")
    with pytest.raises(ModelError, match="sees 4 CUDA GPUs, so there is no cuda:4"):
        parse_devices("cuda:4")


def test_a_runs_evaluations_kept_step_and_report_are_served(client, photos) -> None:
    upload(client, "tomtut", photos)
    wait(client, client.post("/api/embeddings", json={"name": "tomtut", "vectors": 2}).json())
    trained = wait(
        client,
        client.post(
            "/api/train",
            json={
                "set": "tomtut",
                "embedding": "tomtut",
                "max_steps": 6,
                "size": 64,
                "preview_every": 0,
                "eval_every": 2,
            },
        ).json(),
    )
    assert trained["status"] == "done"
    run = client.get("/api/runs/tomtut").json()
    assert [row["step"] for row in run["eval"]] == [0, 2, 4, 6] and all(row["loss"] > 0 for row in run["eval"])
    kept = run["kept"]
    assert kept["last_step"] == 6 and kept["step"] in (2, 4, 6)
    assert kept["by"] == ("the last step trained" if kept["step"] == 6 else "the lowest fixed-batch loss")
    report = client.get(run["report"])
    assert report.status_code == 200 and report.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in report.headers["content-security-policy"]
    assert "tomtut" in report.text and "<script" not in report.text
    assert client.get("/api/runs/nobody/report").status_code == 404


def test_a_photos_mask_travels_through_the_api_and_is_never_a_photo(client, photos) -> None:
    """A mask uploaded beside its photo is listed with it (not as a photo, not counted), prepared beside the
    prepared picture, and deleted with its photo."""
    upload(client, "masked", photos)
    first = sorted(photos.glob("*.png"))[0]
    mask = Image.new("L", Image.open(first).size, 0)
    mask.paste(255, (0, 0, mask.width // 2, mask.height))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    answer = client.post(
        "/api/photosets/masked/photos", files=[("files", (f"{first.stem}.mask.png", buffer.getvalue(), "image/png"))]
    ).json()
    assert answer["saved"] == [f"{first.stem}.mask.png"]
    listed = {p["file"]: p for p in client.get("/api/photosets/masked").json()["photos"]}
    count = len(list(photos.glob("*.png")))
    assert len(listed) == count and listed[first.name]["mask"] == f"{first.stem}.mask.png"
    assert {s["name"]: s["photos"] for s in client.get("/api/photosets").json()}["masked"] == count
    done = wait(client, client.post("/api/photosets/masked/prepare", json={"size": 64, "crop": "center"}).json())
    assert done["status"] == "done", done
    items = {item["source"]: item for item in client.get("/api/datasets/masked").json()["items"]}
    assert items[first.name]["masks"] == [items[first.name]["images"][0].replace(".png", ".mask.png")]
    assert all(".mask." not in url for item in items.values() for url in item["images"])
    assert sum(len(item["masks"]) for item in items.values()) == 1
    cut = client.get(items[first.name]["masks"][0])
    assert cut.status_code == 200 and Image.open(io.BytesIO(cut.content)).size == (64, 64)
    gone = client.delete(f"/api/photosets/masked/photos/{first.name}").json()
    assert gone == {"deleted": first.name, "mask": f"{first.stem}.mask.png"}
    assert len(client.get("/api/photosets/masked").json()["photos"]) == count - 1


def test_what_a_person_trips_over_first_in_the_photo_sets(client, photos) -> None:
    """(Issue 33.) A training of an empty set is refused before it is queued (it failed later, grey, and then offered
    'Resume from step 0'); 'TomTut' beside 'tomtut' is refused; the upload answer counts photos apart from captions
    ('Added 6' when 5 photos appeared) and gives each refusal's reason without a 'files=' prefix; the cap says how
    many the set holds."""
    created = client.post("/api/embeddings", json={"name": "tomtut", "init_text": "toy", "vectors": 1}).json()
    assert wait(client, created)["status"] == "done"
    assert client.post("/api/photosets/empty").status_code == 200
    refused = client.post("/api/train", json={"set": "empty", "embedding": "tomtut"})
    assert refused.status_code == 400 and refused.json()["field"] == "set" and "no photos" in refused.json()["error"]
    assert client.post("/api/photosets/tomtut").status_code == 200
    twin = client.post("/api/photosets/TomTut")
    assert twin.status_code == 400 and "only in case" in twin.json()["error"]
    pictures = sorted(photos.glob("*.png"))[:2]
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in pictures]
    files += [
        ("files", ("one.txt", b"a caption", "text/plain")),
        ("files", ("doc.pdf", b"%PDF-1.4", "application/pdf")),
    ]
    answer = client.post("/api/photosets/tomtut/photos", files=files).json()
    assert (answer["photos"], answer["captions"]) == (2, 1)
    assert answer["refused"] == [
        {"file": "doc.pdf", "reason": "not a photo: its content is not JPEG, PNG, WebP, GIF, BMP, TIFF or HEIC"}
    ]


def test_a_picture_uploaded_as_an_embedding_is_refused_by_its_own_name(client, photos) -> None:
    """It was refused naming the server's staging file (.upload-NAME.tmp). (Issue 33.)"""
    picture = sorted(photos.glob("*.png"))[0].read_bytes()
    answer = client.post("/api/embeddings/upload", files={"file": ("holiday.png", picture)})
    assert answer.status_code == 400 and "holiday.png" in answer.json()["error"], answer.json()
    assert ".tmp" not in answer.json()["error"] and ".upload-" not in answer.json()["error"]


def test_captions_are_seen_and_edited_and_sets_renamed_and_deleted(client, photos, tmp_path) -> None:
    """(Issue 33: what A1111 and kohya_ss GUI users look for next.) Each photo's caption is listed and can be
    written or cleared; a set is renamed with its prepared set and deleted with it - never while a job uses it."""
    picture = sorted(photos.glob("*.png"))[0]
    client.post("/api/photosets/tomtut")
    client.post("/api/photosets/tomtut/photos", files=[("files", (picture.name, picture.read_bytes(), "image/png"))])
    shown = client.get("/api/photosets/tomtut").json()["photos"][0]
    assert shown["caption"] is None
    url = f"/api/photosets/tomtut/photos/{picture.name}/caption"
    assert client.put(url, json={"text": "smiling,\n on a beach "}).json()["caption"] == "smiling, on a beach"
    assert (tmp_path / "ws" / "photos" / "tomtut" / f"{picture.stem}.txt").read_text() == "smiling, on a beach\n"
    assert client.get("/api/photosets/tomtut").json()["photos"][0]["caption"] == "smiling, on a beach"
    assert client.put(url, json={"text": 5}).json()["field"] == "text"
    assert client.put(url, json={"text": ""}).json()["caption"] == ""
    assert not (tmp_path / "ws" / "photos" / "tomtut" / f"{picture.stem}.txt").exists()
    assert client.put("/api/photosets/tomtut/photos/none.png/caption", json={"text": "x"}).status_code == 404

    (tmp_path / "ws" / "datasets" / "tomtut").mkdir()
    (tmp_path / "ws" / "datasets" / "tomtut" / "manifest.json").write_text("{}")
    client.post("/api/photosets/other")
    assert client.post("/api/photosets/tomtut/rename", json={"to": "Other"}).json()["field"] == "to"  # a case twin
    assert client.post("/api/photosets/tomtut/rename", json={"to": "../x"}).json()["field"] == "to"
    assert client.post("/api/photosets/tomtut/rename", json={"to": "tomtut2"}).json() == {"name": "tomtut2"}
    assert (tmp_path / "ws" / "datasets" / "tomtut2" / "manifest.json").is_file()
    assert [s["name"] for s in client.get("/api/photosets").json()] == ["other", "tomtut2"]

    store = client.app.state.server.store
    job = store.create("prepare", {"set": "tomtut2"})
    busy = client.delete("/api/photosets/tomtut2")
    assert busy.status_code == 400 and f"job {job.id} uses this set" in busy.json()["error"]
    store.update(job, status="done")
    assert client.delete("/api/photosets/tomtut2").json() == {"deleted": "tomtut2"}
    assert (
        not (tmp_path / "ws" / "photos" / "tomtut2").exists()
        and not (tmp_path / "ws" / "datasets" / "tomtut2").exists()
    )
    assert client.delete("/api/photosets/tomtut2").status_code == 404


def test_a_batch_of_pictures_downloads_as_one_zip(client, tmp_path) -> None:
    import io
    import zipfile

    from PIL import Image

    outputs = tmp_path / "ws" / "outputs"
    for name in ("00000-1.png", "00001-2.png"):
        Image.new("RGB", (8, 8)).save(outputs / name)
    answer = client.get("/api/outputs.zip", params={"files": "00000-1.png,00001-2.png"})
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(answer.content)) as archive:
        assert archive.namelist() == ["00000-1.png", "00001-2.png"]
        assert archive.read("00000-1.png") == (outputs / "00000-1.png").read_bytes()
    assert client.get("/api/outputs.zip", params={"files": "00000-1.png,../ws/x.png"}).status_code in (400, 404)
    assert client.get("/api/outputs.zip", params={"files": "nope.png"}).status_code == 404
    assert client.get("/api/outputs.zip", params={"files": ",".join(["a.png"] * 101)}).json()["field"] == "files"


def test_a_steps_previews_of_several_prompts_are_all_served(client, tmp_path) -> None:
    from PIL import Image

    previews = tmp_path / "ws" / "runs" / "tomtut" / "previews"
    previews.mkdir(parents=True)
    for name in ("tomtut-5.png", "tomtut-5-2.png", "tomtut-5-3.png", "tomtut-10.png"):
        Image.new("RGB", (8, 8)).save(previews / name)
    run = client.get("/api/runs/tomtut").json()
    assert [(p["step"], p["more"]) for p in run["previews"]] == [
        (5, ["/api/runs/tomtut/previews/tomtut-5-2.png", "/api/runs/tomtut/previews/tomtut-5-3.png"]),
        (10, []),
    ]
    assert client.get(run["previews"][0]["more"][1]).status_code == 200
