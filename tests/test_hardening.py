"""Hardening, round three: what a red-team pass found - echoed values, decompression bombs, bad base64, 500s on odd
numbers and bytes, hostile plans, planted symlinks, stale temporaries, a quota jobs did not respect - each
refused or bounded with one clear line."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_server import client_for
from tistudio.cli import main
from tistudio.errors import OptionError, one_line, shown

HUGE = 10_000_000  # characters: the answer must not grow with them


@pytest.fixture
def client(tmp_path, tiny_sd1, cache_dir):
    with client_for(tmp_path / "ws", tiny_sd1, cache_dir) as test_client:
        yield test_client


def test_an_echoed_value_is_a_short_prefix_and_its_length() -> None:
    error = OptionError("learning_rate", "9" * HUGE, "use a number")
    assert len(str(error)) < 200 and "(10,000,000 characters)" in str(error)
    assert len(str(OptionError("x" * HUGE, 1, "unknown option"))) < 200
    assert shown(10**400) == "a 1,329-bit integer" and shown([1] * 100).endswith("...]")
    assert len(one_line("word " * HUGE)) <= 1000


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/api/train", {"set": "a", "embedding": "a", "learning_rate": "9" * HUGE}),
        ("/api/train", {"set": "a", "embedding": "a", "x" * HUGE: 1}),
        ("/api/train", {"set": "a", "embedding": "a", "template": "t" * HUGE}),
        ("/api/embeddings", {"name": "n" * HUGE}),
        ("/sdapi/v1/train/embedding", {"embedding_name": "a", "data_root": "/" + "d" * HUGE}),
        ("/sdapi/v1/train/embedding", {"embedding_name": "a", "data_root": "a", "template_filename": "t" * HUGE}),
        ("/sdapi/v1/train/embedding", {"embedding_name": "a", "data_root": "a", "preview_sampler_name": "s" * HUGE}),
        ("/sdapi/v1/txt2img", {"prompt": "a", "sampler_name": "s" * HUGE}),
        ("/sdapi/v1/txt2img", {"prompt": "a", "styles": ["s" * HUGE]}),
    ],
)
def test_no_route_echoes_a_huge_value(client, route: str, body: dict) -> None:
    assert client.post("/api/photosets/a").status_code == 200  # so that the set is not what is refused
    started = time.monotonic()
    answer = client.post(route, json=body)
    assert 400 <= answer.status_code < 500, answer.text[:300]
    assert len(answer.content) < 2000, answer.content[:300]
    assert time.monotonic() - started < 20


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"data_root": "/tmp/a\x00b"}, "data_root"),
        ({"data_root": "a", "clip_grad_mode": "norm", "clip_grad_value": 10**400}, "clip_grad_value"),
        ({"data_root": "a", "clip_grad_mode": "norm", "clip_grad_value": "1e999"}, "clip_grad_value"),
        ({"data_root": "a", "steps": 0}, "steps"),
        ({"data_root": "a", "steps": -5}, "steps"),
    ],
)
def test_a1111_train_refuses_odd_values_with_the_field(client, body: dict, field: str) -> None:
    answer = client.post("/sdapi/v1/train/embedding", json={"embedding_name": "tomtut", **body})
    assert answer.status_code in (400, 422), answer.text[:300]
    assert answer.json()["field"] == field


def test_a_nul_character_is_refused_in_every_text_option(client, capsys) -> None:
    answer = client.post("/api/embeddings", json={"name": "tomtut", "init_text": "a\x00b"})
    assert answer.status_code == 400 and answer.json()["field"] == "init_text"
    assert main(["generate", "a\x00b", "--model", "demo"]) == 2
    assert "NUL" in capsys.readouterr().err


# -- PNG embeddings: bombs and bad base64 -------------------------------------------------------------------------

BOMB_JSON = b'{"string_to_param": {"*": {"TORCHTENSOR": [' + b"0.0, " * 13_000_000 + b"0.0]}}}"  # 65 MB


def bombs(folder: Path) -> dict[str, Path]:
    """PNG embeddings whose data unpacks to 65 MB: in a zTXt chunk, and in the pixel strips A1111 reads."""
    from PIL import Image, PngImagePlugin

    from tistudio.embeddings import pngdata

    folder.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    info.add_text("sd-ti-embedding", base64.b64encode(BOMB_JSON).decode("ascii"), zip=True)
    Image.new("RGB", (8, 8)).save(folder / "ztxt.png", pnginfo=info)
    pngdata.hide(Image.new("RGB", (64, 64)), BOMB_JSON).save(folder / "pixels.png")
    return {"ztxt": folder / "ztxt.png", "pixels": folder / "pixels.png"}


def bad_base64(folder: Path) -> dict[str, Path]:
    from PIL import Image, PngImagePlugin

    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, text in (("short", "abc"), ("accented", "é" * 12)):
        info = PngImagePlugin.PngInfo()
        info.add_text("sd-ti-embedding", text)
        files[name] = folder / f"{name}.png"
        Image.new("RGB", (8, 8)).save(files[name], pnginfo=info)
    return files


def test_png_embedding_bombs_are_refused_before_they_are_decoded(tmp_path: Path) -> None:
    files = bombs(tmp_path)
    assert all(path.stat().st_size < 300_000 for path in files.values())  # 65 MB inside each
    # A fresh process, its peak reset first (a forked one starts with its parent's): the time and memory of a refusal
    child = (
        "import re, sys, time\n"
        "from pathlib import Path\n"
        "from tistudio.embeddings.files import read_embedding\n"
        "from tistudio.errors import EmbeddingError\n"
        "def kb(field): return int(re.search(field + r':\\s+(\\d+)', Path('/proc/self/status').read_text())[1])\n"
        "Path('/proc/self/clear_refs').write_text('5')\n"
        "before, started = kb('VmRSS'), time.monotonic()\n"
        "try:\n"
        "    read_embedding(Path(sys.argv[1]))\n"
        "except EmbeddingError as exc:\n"
        "    print((kb('VmHWM') - before) // 1024, round(time.monotonic() - started, 2), str(exc).replace(' ', '_'))\n"
    )
    for kind, path in files.items():
        done = subprocess.run([sys.executable, "-c", child, str(path)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stdout, (kind, done.stderr[-2000:])
        growth_mb, seconds, message = done.stdout.split()
        assert int(growth_mb) < 100 and float(seconds) < 2, (kind, growth_mb, seconds)
        assert "more_than_an_embedding_can_be" in message, (kind, message)


def test_one_bad_png_embedding_breaks_no_list_and_no_command(client, tmp_path: Path, capsys) -> None:
    from tistudio.embeddings.files import Embedding, write_embedding

    folder = Path(client.app.state.server.workspace.embeddings)
    write_embedding(Embedding(name="tomtut", vectors={"clip": torch.randn(2, 64)}, step=4), folder / "tomtut.pt")
    broken = {**bad_base64(folder), **bombs(folder)}
    assert [e["name"] for e in client.get("/api/embeddings").json() if e.get("vectors")] == ["tomtut"]
    listed = client.get("/sdapi/v1/embeddings")
    assert listed.status_code == 200 and set(listed.json()["loaded"]) == {"tomtut"}
    for name, path in broken.items():
        assert main(["inspect", str(path)]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        uploaded = client.post("/api/embeddings/upload", files={"file": (f"up{name}.png", path.read_bytes())})
        assert uploaded.status_code == 400 and len(uploaded.content) < 2000, (name, uploaded.text[:300])


# -- train-many plans ----------------------------------------------------------------------------------------------


def plan_cases(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    texts = {
        "nested arrays": "[defaults]\nx = " + "[" * 5000 + "]" * 5000 + "\n",
        "nested tables": "[defaults]\nx = " + "{a = " * 3000 + "1" + "}" * 3000 + "\n",
        "deep dotted key": "[defaults]\n" + ".".join(["a"] * 1000) + " = 1\n",
        "deep header": "[" + ".".join(["a"] * 1000) + "]\n",
        "too large": "[defaults]\n" + "# padding\n" * 500_000,
    }
    cases = {}
    for name, text in texts.items():
        cases[name] = folder / f"{name.replace(' ', '-')}.toml"
        cases[name].write_text(text, encoding="utf-8")
    cases["named pipe"] = folder / "pipe.toml"
    os.mkfifo(cases["named pipe"])
    return cases


def test_hostile_plans_are_refused_by_size_and_shape_before_parsing(tmp_path: Path, capsys) -> None:
    for name, path in plan_cases(tmp_path).items():
        started = time.monotonic()
        assert main(["train-many", str(path), "--count"]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "plan=" in err and len(err) < 600, (name, err)
        assert time.monotonic() - started < 5, name


def test_an_ordinary_plan_still_reads(tmp_path: Path, capsys) -> None:
    (tmp_path / "prepared" / "alice").mkdir(parents=True)
    plan = tmp_path / "jobs.toml"
    plan.write_text(
        "# a plan with strings and comments that look like nesting\n[defaults]\nmodel = 'demo'  # it's [[[{{{\n"
        'max_steps = 10\npreview_prompt = """a photo of [name],\n  {in a [[[[[[[[[[ frame}"""\n[[job]]\n'
        'embedding = "alice"\ndataset = "prepared/alice"\nlearning_rate = "0.005:5, 1e-3"\n',
        encoding="utf-8",
    )
    assert main(["train-many", str(plan), "--count"]) == 0, capsys.readouterr().err


# -- what a killed write leaves behind ----------------------------------------------------------------------------


def test_a_killed_uploads_temporary_is_never_listed_and_is_removed_at_start(tmp_path, tiny_sd1, cache_dir) -> None:
    from PIL import Image

    workspace = tmp_path / "ws"
    folder = workspace / "photos" / "tomtut"
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 64), "red").save(folder / "one.png")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = folder / f".two.png.{dead.stdout.strip()}-0badf00d.tmp"  # what a SIGKILL during an upload leaves
    live = folder / f".three.png.{os.getpid()}-0badf00d.tmp"  # a write in progress (this process runs)
    for path in (stale, live):
        path.write_bytes((folder / "one.png").read_bytes()[:50])
    with client_for(workspace, tiny_sd1, cache_dir) as client:
        assert not stale.exists() and live.exists()
        live_listing = client.get("/api/photosets/tomtut").json()
        assert [p["file"] for p in live_listing["photos"]] == ["one.png"]
        assert [s["photos"] for s in client.get("/api/photosets").json() if s["name"] == "tomtut"] == [1]


def test_links_planted_in_a_set_are_not_followed_by_its_jobs(client, photos, tmp_path) -> None:
    from test_server import upload, wait

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes((sorted(photos.glob("*.png"))[0]).read_bytes())
    (outside / "hostname").write_text("the host's name", encoding="utf-8")
    assert client.post("/api/photosets/tomtut").status_code == 200
    assert len(upload(client, "tomtut", photos).json()["saved"]) == 6
    folder = Path(client.app.state.server.workspace.photo_set("tomtut"))
    first = sorted(folder.glob("*.png"))[0]
    (folder / "planted.png").symlink_to(outside / "secret.png")
    (folder / f"{first.stem}.txt").symlink_to(outside / "hostname")  # a caption from outside
    refused = client.post("/api/photosets/tomtut/prepare", json={"size": 64})
    assert refused.status_code == 400 and "figure.txt, planted.png)" in refused.json()["error"], refused.text
    trained = client.post("/api/train", json={"set": "tomtut", "embedding": "tomtut", "max_steps": 2, "size": 64})
    assert trained.status_code == 400 and "symbolic links" in trained.json()["error"], trained.text
    # a link planted after the route looked (a job queued before it): the job looks again when it runs
    server = client.app.state.server
    prepared = wait(client, server.workers.submit("prepare", {"set": "tomtut", "size": 64}).public())
    assert prepared["status"] == "failed" and "symbolic links" in prepared["error"], prepared
    dataset = Path(client.app.state.server.workspace.dataset("tomtut"))
    assert not dataset.exists() or not any(dataset.iterdir())


# -- a stop before the first step ---------------------------------------------------------------------------------


def test_a_stop_while_the_images_are_encoded_acts_between_two_images(sd1_model, photos, tmp_path) -> None:
    import threading

    from test_train import new_embedding, options
    from tistudio.embeddings.files import read_embedding
    from tistudio.progress import Event
    from tistudio.train import train

    new_embedding(sd1_model, tmp_path / "emb")
    before = read_embedding(tmp_path / "emb" / "tomtut.safetensors")
    stop, encoded = threading.Event(), []
    real_encode = sd1_model.vae.encode

    def encode(*args, **kwargs):
        encoded.append(1)
        stop.set()  # asked while the first image is being encoded
        return real_encode(*args, **kwargs)

    sd1_model.vae.encode = encode
    try:
        result = train(
            options(photos, tmp_path / "emb", max_steps=5, flip=True, preview_every=1),
            cache_dir=tmp_path,
            model=sd1_model,
            stop=stop,
            on_progress=lambda p: encoded.append(p.event) if p.event == Event.STOPPED else None,
        )
    finally:
        del sd1_model.vae.encode  # the instance attribute; the class's method again
    assert result.stopped and result.step == 0 and "while encoding" in result.message
    assert encoded.count(1) == 2 and Event.STOPPED in encoded  # one image and its mirror, then the stop
    after = read_embedding(tmp_path / "emb" / "tomtut.safetensors")
    assert after.step == 0 and (after.tensor == before.tensor).all()
    assert not list((tmp_path / "run" / "previews").glob("*.png"))


# -- the workspace's cap, for what jobs write ---------------------------------------------------------------------


def test_jobs_stop_saved_at_the_workspace_cap(tmp_path, tiny_sd1, cache_dir, photos) -> None:
    from test_server import upload, wait
    from tistudio.server.workspace import Limits, Workspace

    workspace = tmp_path / "ws"
    with client_for(workspace, tiny_sd1, cache_dir) as client:  # the photos, uncapped
        assert len(upload(client, "tomtut", photos).json()["saved"]) == 6
        created = client.post("/api/embeddings", json={"name": "tomtut", "init_text": "toy", "vectors": 2}).json()
        assert wait(client, created)["status"] == "done"
    used = Workspace(workspace).used_bytes()
    cap = used + 8_000  # room for a photo or two of the 6 prepared with their mirrors (62 KB with the report)
    with client_for(workspace, tiny_sd1, cache_dir, limits=Limits(workspace_bytes=cap)) as client:
        prepared = wait(client, client.post("/api/photosets/tomtut/prepare", json={"size": 64, "flip": True}).json())
        assert prepared["status"] == "stopped", prepared
        assert "workspace is full" in prepared["result"]["stopped"]
        assert prepared["result"]["total"] < 6 and (workspace / "datasets" / "tomtut" / "manifest.json").is_file()
        over = Workspace(workspace).used_bytes() - cap
        assert over < 40_000, over  # past the cap by the last photo's pictures at most
        # full already: a training is refused before it writes anything
        refused = wait(client, client.post("/api/train", json={"set": "tomtut", "embedding": "tomtut"}).json())
        assert refused["status"] == "failed" and "workspace is full" in refused["error"]
    cap = Workspace(workspace).used_bytes() + 150_000
    with client_for(workspace, tiny_sd1, cache_dir, limits=Limits(workspace_bytes=cap)) as client:
        body = {"set": "tomtut", "embedding": "tomtut", "max_steps": 400, "size": 64, "preview_every": 1}
        trained = wait(client, client.post("/api/train", json={**body, "save_every": 1, "tensorboard": True}).json())
        assert trained["status"] == "stopped" and "workspace is full" in trained["result"]["message"], trained
        step = trained["result"]["step"]
        # why it stopped, then where: two sentences, not one run-on clause ("... then go on stopped at step 12")
        assert f"then go on. Stopped at step {step} of 400; saved." in trained["result"]["message"]
        assert trained["result"]["stopped_because"].startswith("Stopped because the workspace is full: ")
        assert 0 < step < 400
        from tistudio.embeddings.files import read_embedding

        assert read_embedding(workspace / "embeddings" / "tomtut.safetensors").step == step  # saved where it stopped
        assert Workspace(workspace).used_bytes() - cap < 150_000


# -- smaller -------------------------------------------------------------------------------------------------------


def test_a_write_that_fails_mid_run_is_reported_on_a_line_of_its_own(
    sd1_model, photos, tmp_path, monkeypatch, capsys
) -> None:
    from test_train import new_embedding
    from tistudio.errors import StorageError
    from tistudio.train import runfolder

    new_embedding(sd1_model, tmp_path / "emb")
    real_append, calls = runfolder.RunFolder.append_losses, []

    def full_disk(self, lines):
        calls.append(1)
        if len(calls) == 3:
            raise StorageError("cannot append to loss.csv: No space left on device")
        return real_append(self, lines)

    monkeypatch.setattr(runfolder.RunFolder, "append_losses", full_disk)
    monkeypatch.setattr("tistudio.train.loop.load_model", lambda *a, **k: sd1_model)
    code = main(
        [
            "train",
            "tomtut",
            "--model",
            "x",
            "--dataset",
            str(photos),
            "--embeddings-dir",
            str(tmp_path / "emb"),
            "--run-dir",
            str(tmp_path / "run"),
            "--size",
            "64",
            "--steps",
            "10",
            "--preview-every",
            "0",
            "--eval-every",
            "0",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert any(line.startswith("tistudio: error: cannot append") for line in err.split("\n")), repr(err[-300:])


def test_a_file_where_tensorboard_logs_go_is_refused_before_training(sd1_model, photos, tmp_path) -> None:
    from test_train import new_embedding, options
    from tistudio.errors import StorageError
    from tistudio.train import train

    new_embedding(sd1_model, tmp_path / "emb")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "tensorboard").write_text("not a folder", encoding="utf-8")
    with pytest.raises(StorageError, match="is a file; TensorBoard"):
        train(options(photos, tmp_path / "emb", tensorboard=True), cache_dir=tmp_path, model=sd1_model)


def test_a_dangling_link_as_a_set_is_refused_not_a_500(client, tmp_path) -> None:
    photos = Path(client.app.state.server.workspace.photos)
    (photos / "ghost").symlink_to(tmp_path / "nowhere")
    answer = client.post("/api/photosets/ghost/photos", files={"files": ("a.png", b"\x89PNG\r\n\x1a\n")})
    assert answer.status_code == 400 and answer.json()["field"] == "set", answer.text


@pytest.mark.parametrize("host", ["[::1]x", "[::1]:abc", "[::1]]", "[::1]@evil.example", "localhost:80:80"])
def test_host_headers_that_only_begin_like_this_computer_are_refused(client, host: str) -> None:
    assert client.get("/api/status", headers={"host": host}).status_code == 403


@pytest.mark.parametrize("host", ["127.0.0.1:7860", "localhost", "[::1]:7860", "[::1]"])
def test_this_computers_host_headers_are_answered(client, host: str) -> None:
    assert client.get("/api/status", headers={"host": host}).status_code == 200


def test_wrong_passwords_are_counted_per_user_name_from_any_address(tmp_path, tiny_sd1, cache_dir) -> None:
    from tistudio.server.security import AUTH_FAILURES

    def basic(user: str, password: str) -> dict:
        return {"authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}

    from fastapi.testclient import TestClient

    from tistudio.config import ModelOptions
    from tistudio.server import ServerConfig, create_app

    app = create_app(
        ServerConfig(tmp_path / "ws", ModelOptions(model=str(tiny_sd1)), cache_dir, auth=[("ann", "right")])
    )
    for index in range(AUTH_FAILURES):  # each guess from another address, as rotating 127.0.1.x did
        one = TestClient(app, base_url="http://127.0.0.1:7860", client=(f"127.0.1.{index + 1}", 5000))
        assert one.get("/api/status", headers=basic("ann", f"guess{index}")).status_code == 401
    fresh = TestClient(app, base_url="http://127.0.0.1:7860", client=("127.0.1.200", 5000))
    assert fresh.get("/api/status", headers=basic("ann", "right")).status_code == 429  # the account rests
    assert fresh.get("/api/status", headers=basic("bob", "x")).status_code == 401  # another name does not
    app.state.server.close()


def test_forwarding_headers_are_not_believed_unless_told() -> None:
    from tistudio.server import uvicorn_settings
    from tistudio.server.workspace import Limits

    plain = uvicorn_settings(None, Limits(), "127.0.0.1", 7860)
    assert plain.proxy_headers is False
    told = uvicorn_settings(None, Limits(), "127.0.0.1", 7860, trusted_proxies="10.0.0.5")
    assert told.proxy_headers is True and told.forwarded_allow_ips == "10.0.0.5"


def test_a_json_request_is_capped_apart_from_file_uploads(client) -> None:
    big = b'{"set": "a", "embedding": "a", "learning_rate": "' + b"9" * (17 * 2**20) + b'"}'
    answer = client.post("/api/train", content=big, headers={"content-type": "application/json"})
    assert answer.status_code == 413 and "16 MB" in answer.json()["error"]
    assert client.post("/api/train", content=big).status_code == 413  # no content type: read as JSON all the same
    assert client.post("/api/photosets/a").status_code == 200
    upload = client.post("/api/photosets/a/photos", files={"files": ("big.png", b"x" * (17 * 2**20))})
    assert upload.status_code == 400 and "not a photo" in upload.json()["error"]  # read: the 16 MB cap is JSON's


def test_a_plain_picture_in_the_embeddings_folder_leaves_its_word_plain(client) -> None:
    """A1111 skips a picture without an embedding in it when it loads its folder; `cp some.png emb/beach.png` and
    a prompt '... on a beach' had exited 2 here (the API answered 400). (Issue 33.)"""
    from PIL import Image

    folder = Path(client.app.state.server.workspace.embeddings)
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), "blue").save(folder / "beach.png")
    answer = client.post(
        "/sdapi/v1/txt2img", json={"prompt": "a dog on a beach", "steps": 2, "width": 64, "height": 64}
    )
    assert answer.status_code == 200, answer.text[:300]
    assert "TI hashes" not in answer.json()["info"]
