"""Reliability: kills, signals, non-finite numbers and failing disks never lose more than one save interval and
never leave a broken file; resume after any of them continues exactly."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tistudio import storage
from tistudio.config import CreateOptions, TrainOptions
from tistudio.embeddings.files import Embedding, read_embedding, write_embedding
from tistudio.errors import StorageError
from tistudio.train.create import create_embedding
from tistudio.train.loop import TrainingDiverged, train
from tistudio.train.runfolder import read_loss_log

DRIVER = Path(__file__).with_name("driver.py")
KILLS = int(os.environ.get("TISTUDIO_TEST_KILLS", "6"))


def settings(photos: Path, folder: Path, **changes) -> TrainOptions:
    base = dict(
        model="x",
        embedding="tomtut",
        dataset=str(photos),
        embeddings_dir=str(folder / "emb"),
        run_dir=str(folder / "run"),
        size=64,
        batch_size=2,
        max_steps=8,
        preview_every=0,
        save_every=0,
    )
    base.update(changes)
    return TrainOptions(**base)


def fresh(model, folder: Path) -> Path:
    return create_embedding(
        CreateOptions(
            model="x", name="tomtut", init_text="toy", vectors=2, embeddings_dir=str(folder / "emb"), overwrite=True
        ),
        cache_dir=folder,
        model=model,
    )


def driver(cache: Path, *cli: str, slow_replace: float = 0.0, slow_step: float = 0.0) -> subprocess.Popen:
    extra = []
    if slow_replace:
        extra += ["--slow-replace", str(slow_replace)]
    if slow_step:
        extra += ["--slow-step", str(slow_step)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, str(DRIVER), *extra, "--", "--cache-dir", str(cache), *cli],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def logged_steps(run_dir: Path) -> int:
    rows = read_loss_log(run_dir / "loss.csv")
    return int(rows[-1]["step"]) if rows else 0


def check_everything_on_disk_loads(root: Path) -> int:
    """Every embedding, copy and state loads; returns how many temporary files a kill left behind."""
    leftovers = 0
    for path in root.rglob("*"):
        if path.name.endswith(".tmp"):
            leftovers += 1
        elif path.suffix == ".safetensors" and "state" in path.parts:
            assert load_file(path), path
        elif path.suffix == ".safetensors":
            embedding = read_embedding(path)
            assert torch.isfinite(embedding.tensor).all()
            if path.parent.name == "embeddings" and "-" in path.stem:
                assert embedding.step == int(path.stem.rsplit("-", 1)[1]), path
        elif path.suffix == ".json":
            json.loads(path.read_text())
    return leftovers


def test_sigkill_at_random_moments_never_breaks_a_file_and_resume_stays_exact(
    sd1_model, tiny_sd1, photos, tmp_path, cache_dir
) -> None:
    steps = 40
    reference = tmp_path / "reference"
    fresh(sd1_model, reference)
    train(settings(photos, reference, max_steps=steps, save_every=1), cache_dir=tmp_path, model=sd1_model)

    folder = tmp_path / "killed"
    fresh(sd1_model, folder)
    cli = [
        "train",
        "tomtut",
        "--model",
        str(tiny_sd1),
        "--dataset",
        str(photos),
        "--embeddings-dir",
        str(folder / "emb"),
        "--run-dir",
        str(folder / "run"),
        "--size",
        "64",
        "--batch-size",
        "2",
        "--steps",
        str(steps),
        "--save-every",
        "1",
        "--preview-every",
        "0",
    ]
    rng = random.Random(1234)
    kills, in_saves = 0, 0
    while kills < KILLS:
        before = logged_steps(folder / "run")
        process = driver(cache_dir, *cli, slow_replace=0.02)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and logged_steps(folder / "run") <= before and process.poll() is None:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.4))
        if process.poll() is not None:
            break  # finished before this kill
        process.kill()
        process.wait()
        kills += 1
        in_saves += check_everything_on_disk_loads(folder) > 0
        embedding = read_embedding(folder / "emb" / "tomtut.safetensors")
        assert logged_steps(folder / "run") - embedding.step <= 1, "more than one save interval lost"
        assert (folder / "run" / "state" / f"state-{embedding.step}.json").is_file()
    finished = driver(cache_dir, *cli)
    _out, err = finished.communicate(timeout=300)
    assert finished.returncode == 0, err
    assert check_everything_on_disk_loads(folder) == 0  # the resumed run cleaned up what the kills left
    final = read_embedding(folder / "emb" / "tomtut.safetensors")
    expected = read_embedding(reference / "emb" / "tomtut.safetensors")
    print(f"SIGKILL: {kills} kills, {in_saves} of them during a save; resumed run equals the uninterrupted one")
    assert kills >= min(KILLS, 3)
    assert final.step == expected.step == steps
    assert torch.equal(final.tensor, expected.tensor)


def test_sigterm_finishes_the_step_and_saves(tiny_sd1, photos, tmp_path, cache_dir) -> None:
    write_embedding(
        Embedding(name="tomtut", vectors={"clip": torch.zeros(2, 64)}), tmp_path / "emb" / "tomtut.safetensors"
    )
    process = driver(
        cache_dir,
        "train",
        "tomtut",
        "--model",
        str(tiny_sd1),
        "--dataset",
        str(photos),
        "--embeddings-dir",
        str(tmp_path / "emb"),
        "--size",
        "64",
        "--steps",
        "1000",
        "--preview-every",
        "0",
        "--save-every",
        "0",
        slow_step=0.3,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and logged_steps(tmp_path / "runs" / "tomtut") < 1:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    saved = read_embedding(tmp_path / "emb" / "tomtut.safetensors")
    assert saved.step >= 1 and saved.step == logged_steps(tmp_path / "runs" / "tomtut")


def serve_tomtut(workspace: Path, photos: Path, model: Path, cache: Path) -> tuple[subprocess.Popen, str]:
    """`tistudio serve` in a child process (training steps slowed to 0.2 s) on a workspace holding the set and an
    embedding named tomtut; returns once it answers, with its base URL."""
    import shutil
    import socket
    import urllib.request

    shutil.copytree(photos, workspace / "photos" / "tomtut")
    write_embedding(
        Embedding(name="tomtut", vectors={"clip": torch.zeros(2, 64)}), workspace / "embeddings" / "tomtut.safetensors"
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    process = driver(
        cache, "serve", "--model", str(model), "--workspace", str(workspace), "--port", str(port), slow_step=0.2
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{base}/api/status", timeout=1)
            return process, base
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise AssertionError("the server did not start") from None
            time.sleep(0.2)


def test_sigterm_stops_a_server_while_a_page_watches_its_training_and_the_run_is_saved(
    tiny_sd1, photos, tmp_path, cache_dir
) -> None:
    import urllib.request

    workspace = tmp_path / "ws"
    process, base = serve_tomtut(workspace, photos, tiny_sd1, cache_dir)
    try:
        request = urllib.request.Request(
            f"{base}/api/train",
            method="POST",
            headers={"Content-Type": "application/json"},
            data=json.dumps(
                {
                    "set": "tomtut",
                    "embedding": "tomtut",
                    "max_steps": 100000,
                    "size": 64,
                    "preview_every": 0,
                    "save_every": 0,
                }
            ).encode(),
        )
        job = json.loads(urllib.request.urlopen(request, timeout=30).read())
        seen: list[str] = []

        def watch() -> None:  # a page's EventSource
            url = f"{base}/api/jobs/{job['id']}/events"
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=120) as stream:
                for line in stream:
                    seen.append(line.decode())

        threading.Thread(target=watch, daemon=True).start()
        deadline = time.monotonic() + 120
        while sum("event: progress" in line for line in seen) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sum("event: progress" in line for line in seen) >= 3
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)  # before the fix it waited for the watching stream for ever
    finally:
        if process.poll() is None:
            process.kill()
    saved = read_embedding(workspace / "embeddings" / "tomtut.safetensors")
    assert saved.step >= 3 and saved.step == logged_steps(workspace / "runs" / "tomtut")
    assert json.loads((workspace / "jobs" / f"{job['id']}.json").read_text())["status"] == "stopped"


def test_sigterm_stops_a_server_while_txt2img_requests_wait_for_their_jobs(
    tiny_sd1, photos, tmp_path, cache_dir
) -> None:
    """Issue 21.4: a txt2img request waiting for its job (queued behind a training here), one whose client has
    left and one still connected, must not keep SIGTERM from stopping the server."""
    import urllib.request

    workspace = tmp_path / "ws"
    process, base = serve_tomtut(workspace, photos, tiny_sd1, cache_dir)

    def post(path: str, body: dict, timeout: float) -> bytes:
        request = urllib.request.Request(
            f"{base}{path}", method="POST", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        return urllib.request.urlopen(request, timeout=timeout).read()

    try:
        post(
            "/api/train",
            {
                "set": "tomtut",
                "embedding": "tomtut",
                "max_steps": 100000,
                "size": 64,
                "preview_every": 0,
                "save_every": 0,
            },
            30,
        )
        drawing = {"prompt": "a photo of tomtut", "steps": 4, "width": 64, "height": 64}
        with contextlib.suppress(OSError):  # this client gives up after a second and leaves
            post("/sdapi/v1/txt2img", drawing, 1.0)

        def wait_for_the_picture() -> None:  # this one stays connected
            with contextlib.suppress(OSError):
                post("/sdapi/v1/txt2img", drawing, 120)

        threading.Thread(target=wait_for_the_picture, daemon=True).start()
        time.sleep(1.0)
        stops_on_sigterm(process, within=30)
    finally:
        if process.poll() is None:
            process.kill()


def stops_on_sigterm(process: subprocess.Popen, within: float) -> None:
    """SIGTERM ends the server process within `within` seconds (a minute at most before it counts as never)."""
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    assert time.monotonic() - started < within, "the server took its time stopping"


def test_a_second_ctrl_c_stops_at_once(tiny_sd1, photos, tmp_path, cache_dir) -> None:
    write_embedding(
        Embedding(name="tomtut", vectors={"clip": torch.zeros(2, 64)}), tmp_path / "emb" / "tomtut.safetensors"
    )
    process = driver(
        cache_dir,
        "train",
        "tomtut",
        "--model",
        str(tiny_sd1),
        "--dataset",
        str(photos),
        "--embeddings-dir",
        str(tmp_path / "emb"),
        "--size",
        "64",
        "--steps",
        "1000",
        "--preview-every",
        "0",
        "--save-every",
        "0",
        slow_step=5.0,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (tmp_path / "runs" / "tomtut" / "options.json").is_file():
        time.sleep(0.05)
    time.sleep(1.0)  # inside the first (5 s) step
    process.send_signal(signal.SIGINT)
    time.sleep(0.3)
    sent = time.monotonic()
    process.send_signal(signal.SIGINT)
    _out, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "aborted" in err
    assert time.monotonic() - sent < 3.0, "the second Ctrl-C did not stop at once"
    assert read_embedding(tmp_path / "emb" / "tomtut.safetensors").step == 0


def nan_on(calls: set[int], monkeypatch, model) -> None:
    """Make the UNet return NaN on the given forward calls (1-based)."""
    unet = model.unet
    original = type(unet).forward
    seen = {"n": 0}

    def forward(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        seen["n"] += 1
        if seen["n"] in calls:
            output.sample = output.sample * float("nan")
        return output

    monkeypatch.setattr(type(unet), "forward", forward)


def test_non_finite_steps_are_discarded_and_the_rate_lowered(sd1_model, photos, tmp_path, monkeypatch) -> None:
    fresh(sd1_model, tmp_path)
    nan_on({3, 4}, monkeypatch, sd1_model)
    result = train(
        settings(photos, tmp_path, max_steps=6, save_every=1, eval_every=0), cache_dir=tmp_path, model=sd1_model
    )
    assert result.step == 6 and "2 non-finite steps discarded" in result.message
    rows = read_loss_log(tmp_path / "run" / "loss.csv")
    assert [r["lr"] for r in rows] == [0.005, 0.005, 0.005, 0.0025, 0.00125, 0.00125]
    assert all(torch.isfinite(read_embedding(p).tensor).all() for p in (tmp_path / "run").rglob("tomtut*.safetensors"))
    vectors_at = {
        step: read_embedding(tmp_path / "run" / "embeddings" / f"tomtut-{step}.safetensors").tensor
        for step in range(1, 7)
    }
    assert torch.equal(vectors_at[3], vectors_at[2]) and torch.equal(vectors_at[4], vectors_at[2])
    assert not torch.equal(vectors_at[5], vectors_at[4])


def test_repeated_non_finite_steps_stop_the_run_with_the_last_good_embedding_intact(
    sd1_model, photos, tmp_path, monkeypatch
) -> None:
    fresh(sd1_model, tmp_path)
    nan_on(set(range(4, 100)), monkeypatch, sd1_model)
    with pytest.raises(TrainingDiverged, match=r"5 steps in a row.*embedding saved at step 6 is intact"):
        train(settings(photos, tmp_path, max_steps=50, save_every=2, eval_every=0), cache_dir=tmp_path, model=sd1_model)
    saved = read_embedding(tmp_path / "emb" / "tomtut.safetensors")
    after_three = read_embedding(tmp_path / "run" / "embeddings" / "tomtut-4.safetensors").tensor
    assert saved.step == 6 and torch.isfinite(saved.tensor).all()
    assert torch.equal(saved.tensor, after_three)  # steps 4-8 were all discarded


def fail_writes(monkeypatch, code: int, after: int = 0) -> None:
    """Let `after` atomic renames succeed, then fail every write with the given errno."""
    original = storage.os.replace
    count = {"n": 0}

    def replace(src, dst):
        count["n"] += 1
        if count["n"] > after:
            raise OSError(code, os.strerror(code))
        original(src, dst)

    monkeypatch.setattr(storage.os, "replace", replace)


@pytest.mark.parametrize(
    ("code", "words"), [(errno.ENOSPC, "the disk is full"), (errno.EROFS, "the file system is read-only")]
)
def test_a_failing_disk_is_a_clear_error_and_the_previous_files_stay(
    code, words, sd1_model, photos, tmp_path, monkeypatch
) -> None:
    fresh(sd1_model, tmp_path)
    train(settings(photos, tmp_path, max_steps=2, save_every=1), cache_dir=tmp_path, model=sd1_model)
    before = (tmp_path / "emb" / "tomtut.safetensors").read_bytes()
    fail_writes(monkeypatch, code)
    with pytest.raises(StorageError, match=f"cannot write .*{words}; the previous file, if any, is unchanged"):
        train(settings(photos, tmp_path, max_steps=4, save_every=1), cache_dir=tmp_path, model=sd1_model)
    monkeypatch.undo()
    assert (tmp_path / "emb" / "tomtut.safetensors").read_bytes() == before
    assert not [p for p in tmp_path.rglob("*.tmp")]
    assert read_embedding(tmp_path / "emb" / "tomtut.safetensors").step == 2


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders anyway")
def test_a_real_read_only_folder(sd1_model, tmp_path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    write_embedding(Embedding(name="a", vectors={"clip": torch.zeros(1, 64)}), folder / "a.safetensors")
    folder.chmod(0o555)
    try:
        with pytest.raises(StorageError, match="permission denied"):
            write_embedding(Embedding(name="a", vectors={"clip": torch.ones(1, 64)}), folder / "a.safetensors")
    finally:
        folder.chmod(0o755)
    assert torch.equal(read_embedding(folder / "a.safetensors").tensor, torch.zeros(1, 64))


def test_the_server_worker_survives_a_full_disk_and_the_job_file_catches_up(tmp_path, monkeypatch) -> None:
    """A job that fails while the disk is full (so its end cannot be written either) ends as failed with its
    reason; the worker keeps serving the next jobs; once space is back, the failed job's file says so."""
    import errno
    import json

    from tistudio import storage
    from tistudio.server import jobs as jobs_module

    real_write = storage.write_json
    full = {"on": False}

    def write_json(path, data):
        if full["on"]:
            return storage.atomic_write(path, lambda temp: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
        return real_write(path, data)

    monkeypatch.setattr(jobs_module, "write_json", write_json)

    def fill_the_disk(job, worker):
        full["on"] = True
        raise storage.StorageError("cannot write embeddings/x.safetensors: no space left on the device")

    store = jobs_module.JobStore(tmp_path)
    workers = jobs_module.Workers(store, {"fill": fill_the_disk, "ok": lambda job, worker: {"fine": True}})
    workers.start()
    try:
        failed = workers.submit("fill", {})
        assert failed.done.wait(10) and failed.status == "failed" and "no space" in failed.error
        assert json.loads((tmp_path / f"{failed.id}.json").read_text())["status"] == "running"  # not written yet
        full["on"] = False  # space is freed
        later = workers.submit("ok", {})
        assert later.done.wait(10) and later.status == "done"
        on_disk = json.loads((tmp_path / f"{failed.id}.json").read_text())
        assert on_disk["status"] == "failed" and "no space" in on_disk["error"]
    finally:
        workers.shutdown()
        workers.join(10)
    assert not any(worker.is_alive() for worker in workers.workers)


def test_sigterm_stops_a_server_while_a_client_stalls_mid_request(tiny_sd1, photos, tmp_path, cache_dir) -> None:
    """A client that sent its headers and then stalls - an upload whose network dropped, a half-sent body - must
    not keep SIGTERM from stopping the server: uvicorn waits for every request in progress to finish, with no end
    of its own."""
    import socket

    process, base = serve_tomtut(tmp_path / "ws", photos, tiny_sd1, cache_dir)
    port = int(base.rsplit(":", 1)[1])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as stalled:
            stalled.sendall(
                b"POST /api/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b'Content-Length: 1000\r\n\r\n{"name": '
            )
            time.sleep(1.0)
            stops_on_sigterm(process, within=20)
    finally:
        if process.poll() is None:
            process.kill()
