"""The web page in a real browser (Debian's Chromium, driven by Playwright): a person's whole path - upload
photos, prepare, create, train while the loss and previews update, pick a step, generate, reuse a seed - and the
safety rules as a browser meets them. Screenshots of each section go to test-artifacts/."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
playwright = pytest.importorskip("playwright.sync_api")
if CHROMIUM is None:
    if os.environ.get("TISTUDIO_REQUIRE_BROWSER"):
        raise RuntimeError("TISTUDIO_REQUIRE_BROWSER is set but no chromium is installed")
    pytest.skip("no chromium on this machine (CI installs Debian's)", allow_module_level=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    tmp: Path, cache: Path, model: Path | str, *extra: str, port: int | None = None
) -> tuple[subprocess.Popen, str]:
    """A served workspace (tmp/ws-PORT): the same port again is the same workspace, as after a restart."""
    port = port or free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tistudio",
            "--cache-dir",
            str(cache),
            "serve",
            "--model",
            str(model),
            "--workspace",
            str(tmp / f"ws-{port}"),
            "--port",
            str(port),
            *extra,
        ],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{base}/api/status", timeout=1)
            return process, base
        except urllib.error.HTTPError:
            return process, base  # it answers (e.g. 401 when a password is needed)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if process.poll() is not None:
                raise RuntimeError(f"the server did not start: {process.stdout.read()}") from None
            time.sleep(0.2)
    raise RuntimeError("the server did not answer in 60 s")


@pytest.fixture
def browser():
    with playwright.sync_playwright() as p:
        instance = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        yield instance
        instance.close()


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_a_persons_whole_path_in_the_browser(browser, tmp_path, cache_dir, tiny_sd1, photos) -> None:
    from playwright.sync_api import expect

    server, base = start_server(tmp_path, cache_dir, tiny_sd1, "--max-upload-mb", "0.5")
    errors: list[str] = []
    try:
        page = browser.new_page(viewport={"width": 1200, "height": 1000})
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(base)
        expect(page.locator("#sets-empty")).to_be_visible()  # a clear empty state first

        # 1. Photos: a set, drag-free upload through the file input, then prepare.
        page.fill("#new-set", "tomtut")
        page.click("#new-set-button")
        page.set_input_files("#file-input", sorted(str(p) for p in photos.glob("*.png")))
        expect(page.locator("#photo-grid figure")).to_have_count(6)
        big = tmp_path / "huge.png"
        big.write_bytes(b"\x89PNG" + os.urandom(700_000))
        page.set_input_files("#file-input", str(big))
        expect(page.locator("#upload-error")).to_contain_text("larger than 512 KB")  # --max-upload-mb 0.5
        page.fill("#prepare-form-size", "64")
        page.check("#prepare-form-flip")
        page.click("#prepare-button")
        expect(page.locator("#verdict li").first).to_be_visible(timeout=60_000)
        expect(page.locator("#prepared-grid figure")).to_have_count(6)
        shot(page, "1-photos")

        # 2. Embeddings: create one.
        page.click("nav a[data-tab=embeddings]")
        expect(page.locator("#embeddings-empty")).to_be_visible()
        page.fill("#create-form-name", "woman")
        page.click("#create-button")
        expect(page.locator("#create-error")).to_contain_text("already a word the model knows")
        page.fill("#create-form-name", "tomtut")
        page.fill("#create-form-init_text", "toy figure")
        page.fill("#create-form-vectors", "2")
        page.click("#create-button")
        expect(page.locator("#embedding-table tbody tr")).to_have_count(1, timeout=60_000)
        shot(page, "2-embeddings")

        # 3. Train: from the embedding's row; watch the loss and the previews arrive.
        page.click("#embedding-table tbody tr >> text=Train")
        expect(page.locator("#train-form-embedding")).to_have_value("tomtut")
        expect(page.locator("#train-form-set")).to_have_value("tomtut")
        for field, value in (
            ("max_steps", "40"),
            ("preview_every", "10"),
            ("save_every", "10"),
            ("size", "64"),
            ("batch_size", "2"),
        ):
            page.fill(f"#train-form-{field}", value)
        page.click("#train-form details summary")
        page.fill("#train-form-preview_steps", "2")
        page.click("#train-button")
        expect(page.locator("#train-status")).to_contain_text("step", timeout=60_000)
        seen = set()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            text = page.locator("#train-status").inner_text()
            seen.add(text)
            if "Trained tomtut to step 40" in text:
                break
            page.wait_for_timeout(100)
        # the finished run's line: the library's clause as a sentence, with its capital and full stop
        expect(page.locator("#train-status")).to_have_text("Trained tomtut to step 40.")
        assert any("step" in t and "of 40" in t and "loss" in t for t in seen), seen
        expect(page.locator("#loss-chart svg")).to_be_visible()
        expect(page.locator("#preview-timeline figure")).to_have_count(5)  # steps 0, 10, 20, 30, 40
        # the fixed-batch loss on the chart (every 25 steps and the last), the kept step said, the run's report
        expect(page.locator("#loss-chart polyline[stroke='#e6550d']")).to_have_count(1)
        expect(page.locator("#kept-step")).to_contain_text("step")
        report = page.locator("#kept-step a")
        expect(report).to_have_attribute("href", "/api/runs/tomtut/report")
        shot(page, "3-train")
        page.click("#preview-timeline figure[data-step='20'] button")
        expect(page.locator("#train-status")).to_contain_text("saved at step 20")
        expect(page.locator("#kept-step")).to_contain_text("keeps step 20")
        # the test photos show no face: why no likeness judged them is on the page, not only in the log (issue 33)
        expect(page.locator("#kept-step")).to_contain_text("Pictures were not judged by likeness: ")
        # what the next Start does with that choice is said before it is pressed (issue 33)
        expect(page.locator("#train-hint")).to_contain_text("continues from step 40, the last step trained, not from")
        expect(page.locator("#train-hint")).to_contain_text("To go on from step 20 instead, set Continue from to kept")
        page.select_option("#train-form-continue_from", "kept")  # and the user can choose it
        expect(page.locator("#train-hint")).to_contain_text("continues from step 20, the step the embedding holds")
        page.select_option("#train-form-continue_from", "last")
        page.click("nav a[data-tab=embeddings]")
        expect(page.locator("#embedding-table tbody tr td").nth(2)).to_have_text("20")
        # Start from the kept step: steps 21-40 are trained again, and the choice is not carried to the next Start
        page.click("nav a[data-tab=train]")
        page.select_option("#train-form-continue_from", "kept")
        page.click("#train-button")
        expect(page.locator("#train-form-continue_from")).to_have_value("last")
        branch = api(page, "GET", f"{base}/api/jobs")[0]
        assert branch["kind"] == "train" and branch["request"]["continue_from"] == "kept", branch
        while api(page, "GET", f"{base}/api/jobs/{branch['id']}")["status"] in ("queued", "running"):
            page.wait_for_timeout(200)
        expect(page.locator("#train-status")).to_have_text("Trained tomtut to step 40.", timeout=30_000)
        expect(page.locator("#preview-timeline figure")).to_have_count(5)  # 0-20 kept, 30 and 40 drawn again
        expect(page.locator("#train-hint")).not_to_contain_text("step 20, the step the embedding holds")

        # 4. Generate, see the image and its parameters, reuse its seed.
        page.click("nav a[data-tab=generate]")
        expect(page.locator("#gallery-empty")).to_be_visible()
        page.fill("#generate-form-prompt", "a photo of tomtut on a beach")
        page.fill("#generate-form-steps", "4")
        page.fill("#generate-form-size", "64x64")
        page.fill("#generate-form-batch", "2")
        page.click("#generate-button")
        expect(page.locator("#gallery figure")).to_have_count(2, timeout=60_000)
        batch = page.locator("#generate-note a", has_text="Download them all (zip)")  # issue 33
        with page.expect_download() as zipped:
            batch.click()
        assert Path(zipped.value.path()).read_bytes()[:2] == b"PK"
        text = page.locator("#gallery figure pre").first.inner_text()
        assert "a photo of tomtut on a beach" in text and 'TI hashes: "tomtut: ' in text
        seed = text.split("Seed: ")[1].split(",")[0]
        page.locator("#gallery figure").first.locator("text=Reuse seed").click()
        expect(page.locator("#generate-form-seed")).to_have_value(seed)
        shot(page, "4-generate")
        assert not errors, errors
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_photos_chosen_while_a_set_is_being_created_go_into_that_set(
    browser, tmp_path, cache_dir, tiny_sd1, photos
) -> None:
    """A person with a set open creates another and drops photos at once: they belong to the new set, even when
    the server is slow to create it (CI's browser test once found the photos dropped on the floor)."""
    from playwright.sync_api import expect

    server, base = start_server(tmp_path, cache_dir, tiny_sd1)
    try:
        page = browser.new_page()
        page.goto(base)
        page.click("#new-set-button")  # no name yet: said at the field, not "Method Not Allowed"
        expect(page.locator("#set-error")).to_contain_text("Give the set a name")
        page.fill("#new-set", "other")
        page.click("#new-set-button")
        expect(page.locator("#photos-empty")).to_be_visible()
        held = []

        def hold_creation(route) -> None:
            if route.request.method == "POST":
                held.append(route)
            else:
                route.continue_()

        page.route("**/api/photosets/tomtut", hold_creation)
        page.fill("#new-set", "tomtut")
        page.click("#new-set-button")
        while not held:
            page.wait_for_timeout(20)
        page.set_input_files("#file-input", sorted(str(p) for p in photos.glob("*.png")))
        page.wait_for_timeout(300)  # the upload must wait for the set, not go to "other"
        held[0].continue_()
        expect(page.locator("#set-select")).to_have_value("tomtut")
        expect(page.locator("#photo-grid figure")).to_have_count(6)
        sets = {s["name"]: s["photos"] for s in page.request.get(f"{base}/api/photosets").json()}
        assert sets == {"other": 0, "tomtut": 6}
        notes = tmp_path / "notes.png"
        notes.write_bytes(b"not a photo at all")
        page.set_input_files("#file-input", [str(notes), str(sorted(photos.glob("*.png"))[0])])
        expect(page.locator("#upload-error")).to_contain_text("notes.png: ")
        expect(page.locator("#upload-error")).to_contain_text("not a photo")

        # A number field that holds no number is an error at the field, never silently the default.
        for typed, said in (("", "enter a number"), ("abc", "Size: "), ("70000", "at most")):
            page.fill("#prepare-form-size", "")
            if typed:
                page.locator("#prepare-form-size").press_sequentially(typed)
            page.click("#prepare-button")
            expect(page.locator("#prepare-error")).to_contain_text(said)
            expect(page.locator("#prepare-form [data-field=size]")).to_have_class("field invalid")
        assert page.request.get(f"{base}/api/jobs").json() == []  # nothing was queued
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_listening_server_asks_for_a_password(browser, tmp_path, cache_dir, tiny_sd1) -> None:
    server, base = start_server(
        tmp_path, cache_dir, tiny_sd1, "--listen", "--host", "127.0.0.1", "--auth", "ann:s3cret"
    )
    try:
        anonymous = browser.new_context()
        assert anonymous.request.get(base).status == 401  # a page load would show the browser's sign-in prompt
        # What a browser shows once its sign-in prompt is cancelled is this answer's body (headless Chromium aborts
        # instead of prompting): words on a page, not raw JSON (issue 33); the page's own API calls still get JSON.
        cancelled = anonymous.request.get(base, headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
        assert cancelled.status == 401 and cancelled.headers["content-type"].startswith("text/html")
        shown = anonymous.new_page()
        shown.set_content(cancelled.text())
        assert "Sign-in needed" in shown.inner_text("h1") and "{" not in shown.inner_text("body")
        assert anonymous.request.get(f"{base}/api/status").json()["error"].startswith("sign in")

        context = browser.new_context(http_credentials={"username": "ann", "password": "s3cret"})
        page = context.new_page()
        assert page.goto(base).status == 200
        page.wait_for_selector("#sets-empty")  # the page loaded and talked to the API with the password
        shot(page, "5-signed-in")
        import base64

        wrong = {"Authorization": "Basic " + base64.b64encode(b"ann:wrong").decode()}
        for _ in range(11):
            anonymous.request.get(f"{base}/api/status", headers=wrong)
        locked = context.new_page()
        answer = locked.goto(base)
        assert answer.status == 429  # locked out, even with the right password for a while: said on a page too
        assert "Too many wrong passwords" in locked.inner_text("h1") and "try again in" in locked.inner_text("body")
    finally:
        server.terminate()
        server.wait(timeout=30)


def api(page, method: str, url: str, **data):
    answer = page.request.fetch(url, method=method, **({"data": data} if data else {}))
    assert answer.ok, answer.text()
    return answer.json()


def steps_on_chart(page) -> int:
    text = page.locator("#loss-chart p.muted").inner_text()  # "N steps, last loss ..."
    return int(text.split(" steps")[0])


def test_the_train_tab_tells_the_truth_after_reload_second_tab_queue_restart_and_signals(
    browser, tmp_path, cache_dir, tiny_sd1, photos
) -> None:
    """What the page shows and what its buttons do follow the server's jobs: a reload or a second tab during
    training shows the run being trained (not the alphabetically first embedding), a tab switch keeps the chart,
    the queue can be cancelled, a killed and restarted server's run shows as interrupted with a Resume that
    continues it, and SIGINT with the page watching stops the server within 10 s with the steps saved."""
    from playwright.sync_api import expect

    port = free_port()
    server, base = start_server(tmp_path, cache_dir, tiny_sd1, port=port)
    errors: list[str] = []
    try:
        page = browser.new_page(viewport={"width": 1200, "height": 1000})
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(base)
        api(page, "POST", f"{base}/api/photosets/tomtut")
        for photo in sorted(photos.glob("*.png")):
            upload = {"name": photo.name, "mimeType": "image/png", "buffer": photo.read_bytes()}
            assert page.request.post(f"{base}/api/photosets/tomtut/photos", multipart={"files": upload}).ok
        for name in ("abzqx", "tomtut"):  # abzqx: the first in the lists, which the form used to fall back to
            job = api(page, "POST", f"{base}/api/embeddings", name=name, init_text="toy figure", vectors=2)
            while (done := api(page, "GET", f"{base}/api/jobs/{job['id']}"))["status"] not in ("done", "failed"):
                page.wait_for_timeout(100)
            assert done["status"] == "done", done
        training = api(
            page,
            "POST",
            f"{base}/api/train",
            set="tomtut",
            embedding="tomtut",
            max_steps=5000,
            size=64,
            batch_size=1,
            preview_every=20,
            save_every=20,
            preview_steps=2,
        )

        # A reload during training: the form, the buttons and the chart are the running run's.
        page.goto(f"{base}/#train")
        expect(page.locator("#train-form-embedding")).to_have_value("tomtut")
        expect(page.locator("#train-form-max_steps")).to_have_value("5000")
        expect(page.locator("#stop-button")).to_be_visible()
        expect(page.locator("#train-button")).to_be_disabled()
        expect(page.locator("#train-status")).to_contain_text("of 5000", timeout=60_000)
        expect(page.locator("#preview-timeline figure[data-step='20']")).to_be_visible(timeout=60_000)
        assert page.locator("#preview-timeline button").count() == 0  # no "Use this step" while it trains
        page.wait_for_timeout(1500)
        before = steps_on_chart(page)
        page.click("nav a[data-tab=photos]")
        page.click("nav a[data-tab=train]")
        expect(page.locator("#train-form-embedding")).to_have_value("tomtut")
        page.wait_for_timeout(300)
        assert steps_on_chart(page) >= before  # a tab switch once cut 75 points to 19

        # A second tab shows the same.
        second = browser.new_page()
        second.goto(f"{base}/#train")
        expect(second.locator("#train-form-embedding")).to_have_value("tomtut")
        expect(second.locator("#stop-button")).to_be_visible()
        second.close()

        # The queue: a second training waits in sight and can be cancelled.
        waiting = api(page, "POST", f"{base}/api/train", set="tomtut", embedding="abzqx", max_steps=50, size=64)
        expect(page.locator("#queue")).to_contain_text("Waiting (1): training abzqx", timeout=10_000)
        page.locator("#queue li", has_text="training abzqx").locator("button", has_text="Cancel").click()
        expect(page.locator("#queue")).not_to_contain_text("training abzqx", timeout=10_000)
        assert api(page, "GET", f"{base}/api/jobs/{waiting['id']}")["status"] == "cancelled"
        page.select_option("#train-form-embedding", "abzqx")
        expect(page.locator("#train-status")).to_contain_text("cancelled while it waited")
        expect(page.locator("#resume-button")).to_be_hidden()
        page.select_option("#train-form-embedding", "tomtut")
        expect(page.locator("#stop-button")).to_be_visible()

        # The server is killed and started again: the page comes back by itself and offers to resume.
        expect(page.locator("#preview-timeline figure[data-step='40']")).to_be_visible(timeout=60_000)
        server.kill()
        server.wait(timeout=30)
        expect(page.locator("#busy")).to_contain_text("does not answer", timeout=10_000)
        # the queue says it is what the server said last, with no Stop that cannot act (issue 33)
        expect(page.locator("#queue li").first).to_contain_text("last known; the server does not answer")
        assert page.locator("#queue button").count() == 0
        server, _ = start_server(tmp_path, cache_dir, tiny_sd1, port=port)
        expect(page.locator("#train-status")).to_contain_text("was interrupted at step", timeout=30_000)
        saved = api(page, "GET", f"{base}/api/embeddings/tomtut")["step"]
        assert saved >= 40 and saved % 20 == 0
        expect(page.locator("#resume-button")).to_have_text(f"Resume from step {saved} of 5000")
        expect(page.locator("#train-form-embedding")).to_have_value("tomtut")
        page.reload()
        expect(page.locator("#resume-button")).to_have_text(f"Resume from step {saved} of 5000")
        expect(page.locator("#train-hint")).to_contain_text("Resume runs the interrupted training again")
        shot(page, "6-interrupted")
        page.click("#resume-button")
        expect(page.locator("#resume-button")).to_be_hidden()
        expect(page.locator("#stop-button")).to_be_visible()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            running = [j for j in api(page, "GET", f"{base}/api/jobs") if j["status"] == "running"]
            if running and running[0]["progress"].get("step", 0) > saved + 3:
                break
            page.wait_for_timeout(100)
        else:
            raise AssertionError("the resumed training did not go on")
        assert running[0]["id"] != training["id"] and running[0]["request"]["embedding"] == "tomtut"

        # SIGINT with the page watching: the server stops within 10 s, the step it reached saved.
        server.send_signal(signal.SIGINT)
        server.wait(timeout=10)
        jobs = [json.loads(p.read_text()) for p in (tmp_path / f"ws-{port}" / "jobs").glob("*.json")]
        resumed = next(j for j in jobs if j["id"] == running[0]["id"])
        assert resumed["status"] == "stopped", resumed
        from tistudio.embeddings.files import read_embedding

        embedding = read_embedding(tmp_path / f"ws-{port}" / "embeddings" / "tomtut.safetensors")
        assert embedding.step == resumed["result"]["step"] > saved + 3
        assert not errors, errors
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait(timeout=30)


def test_the_demo_server_offers_the_demos_settings(browser, tmp_path, cache_dir) -> None:
    """Serving the demo, the forms hold what suits its 64-px world (preparing at 64 px, 200 steps with a preview
    every 50), not the 512-px, 3000-step defaults that made a first try take 25 minutes; at 390 px the page fits."""
    from playwright.sync_api import expect

    server, base = start_server(tmp_path, cache_dir, "demo")
    try:
        page = browser.new_page(viewport={"width": 390, "height": 844})
        page.goto(f"{base}/#train")
        expect(page.locator("#demo-banner")).to_be_visible()
        expect(page.locator("#train-form-max_steps")).to_have_value("200")
        expect(page.locator("#train-form-preview_every")).to_have_value("50")
        page.click("nav a[data-tab=photos]")
        page.fill("#new-set", "tomtut")
        page.click("#new-set-button")
        expect(page.locator("#prepare-form-size")).to_have_value("64")
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"the page scrolls sideways at 390 px ({width} px wide)"
        page.click("nav a[data-tab=generate]")
        page.fill("#generate-form-prompt", "a photo of tomtut")
        expect(page.locator("#prompt-words")).to_contain_text("No embeddings yet")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        shot(page, "7-demo-390px")
        # Issue 33 at phone width: every tab's name shows whole; an embedding with a 64-character name, inspected,
        # keeps its buttons in view and their names readable; a long refused name wraps instead of widening.
        nav_right = page.evaluate(
            "Math.max(...[...document.querySelectorAll('nav a')].map(a => a.getBoundingClientRect().right))"
        )
        assert nav_right <= 390, f"the tabs run to {nav_right} px"
        page.click("nav a[data-tab=embeddings]")
        page.fill("#create-form-name", "t" + "x" * 63)
        page.fill("#create-form-init_text", "person")
        page.click("#create-button")
        row = page.locator("#embedding-table tbody tr").first
        row.wait_for(timeout=60_000)
        row.get_by_role("button", name="Inspect").click()
        expect(page.locator("#embedding-details")).to_be_visible()
        # the stacked cells say which column each is (the header row is hidden at this width)
        step = row.locator("td").nth(2)
        assert page.evaluate("c => getComputedStyle(c, '::before').content", step.element_handle()) == '"step: "'
        for button in row.get_by_role("button").all():
            box = button.bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, box
        page.fill("#create-form-name", "y" * 200)
        page.click("#create-button")
        expect(page.locator("#create-error")).to_be_visible()
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        shot(page, "8-embeddings-390px")
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_page_shows_a_word_trained_with_a_lora_and_offers_its_file(browser, tmp_path, cache_dir, tiny_sd1) -> None:
    """Pivotal tuning on the page: the embeddings table says the word has a LoRA (and when its file is gone), and a
    button downloads the LoRA A1111 loads with the word."""
    import torch

    from tistudio.embeddings.bundle import write_lora
    from tistudio.embeddings.files import Embedding, write_embedding

    port = free_port()
    workspace = tmp_path / f"ws-{port}"
    word = Embedding(
        name="hatted", vectors={"clip": torch.randn(2, 64)}, step=8, meta={"lora": "hatted", "lora_rank": "4"}
    )
    write_embedding(word, workspace / "embeddings" / "hatted.safetensors")
    down, up = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_q.lora_down.weight", "lora_up.weight"
    lora = write_lora(
        workspace / "loras" / "hatted.safetensors",
        {down: torch.zeros(4, 64), down.replace("lora_down.weight", up): torch.zeros(64, 4)},
        [word],
        {},
    )
    server, base = start_server(tmp_path, cache_dir, tiny_sd1, port=port)
    try:
        page = browser.new_page()
        page.goto(f"{base}/#embeddings")
        row = page.locator("#embedding-table tbody tr", has_text="hatted")
        row.wait_for()
        assert "2 × 64 + LoRA rank 4" in row.inner_text()
        with page.expect_download() as download:
            row.get_by_role("button", name="Download LoRA").click()
        assert Path(download.value.path()).read_bytes() == lora.read_bytes()
        lora.unlink()
        page.reload()
        row = page.locator("#embedding-table tbody tr", has_text="hatted")
        row.wait_for()
        assert (
            "(its file is missing)" in row.inner_text() and row.get_by_role("button", name="Download LoRA").count() == 0
        )
        shot(page, "6-word-with-lora")
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_run_stopped_by_the_workspace_cap_says_why_in_sentences(
    browser, tmp_path, cache_dir, tiny_sd1, photos
) -> None:
    """A training the server stopped because its workspace was full says so on the Train tab, why and what to do,
    each sentence with its capital and full stop: the cap's reason and the run's end had been one run-on line."""
    from playwright.sync_api import expect

    from tistudio.server.workspace import Workspace

    port = free_port()
    server, base = start_server(tmp_path, cache_dir, tiny_sd1, port=port)
    try:
        page = browser.new_page()
        api(page, "POST", f"{base}/api/photosets/tomtut")
        for photo in sorted(photos.glob("*.png")):
            upload = {"name": photo.name, "mimeType": "image/png", "buffer": photo.read_bytes()}
            assert page.request.post(f"{base}/api/photosets/tomtut/photos", multipart={"files": upload}).ok
        for job in (
            api(page, "POST", f"{base}/api/embeddings", name="tomtut", init_text="toy figure", vectors=2),
            api(page, "POST", f"{base}/api/photosets/tomtut/prepare", size=64),
        ):
            while (done := api(page, "GET", f"{base}/api/jobs/{job['id']}"))["status"] not in ("done", "failed"):
                page.wait_for_timeout(100)
            assert done["status"] == "done", done
    finally:
        server.terminate()
        server.wait(timeout=30)
    cap_gb = (Workspace(tmp_path / f"ws-{port}").used_bytes() + 150_000) / 1024**3
    server, base = start_server(tmp_path, cache_dir, tiny_sd1, "--max-workspace-gb", f"{cap_gb:.9f}", port=port)
    try:
        page = browser.new_page()
        body = {"set": "tomtut", "embedding": "tomtut", "max_steps": 400, "size": 64}
        job = api(page, "POST", f"{base}/api/train", **body, preview_every=1, save_every=1, tensorboard=True)
        while (done := api(page, "GET", f"{base}/api/jobs/{job['id']}"))["status"] in ("queued", "running"):
            page.wait_for_timeout(200)
        assert done["status"] == "stopped", done
        step = done["result"]["step"]
        page.goto(f"{base}/#train")
        status = page.locator("#train-status")
        expect(status).to_contain_text("Stopped because the workspace is full:")
        expect(status).to_contain_text(f"then go on. Stopped at step {step} of 400; everything up to it is saved.")
        expect(status).to_have_class(re.compile(r"\berror\b"))  # it needs the user: not in grey
        shot(page, "7-stopped-by-the-cap")
    finally:
        server.terminate()
        server.wait(timeout=30)


def tab_to(page, selector: str, limit: int = 80) -> int:
    """Press Tab until the element `selector` has the focus; the number of presses (fails if it is never reached)."""
    for presses in range(1, limit + 1):
        page.keyboard.press("Tab")
        if page.evaluate("(s) => document.activeElement === document.querySelector(s)", selector):
            return presses
    raise AssertionError(f"{selector} is not reached by Tab in {limit} presses")


def test_the_whole_path_by_keyboard_alone_and_a_reload_keeps_the_place(
    browser, tmp_path, cache_dir, tiny_sd1, photos
) -> None:
    """Issue 33: Tab reaches every control, Enter (Ctrl+Enter in the prompt) submits each form, the drop zone opens
    the file chooser, and a reload keeps the set shown and the prompt written."""
    from playwright.sync_api import expect

    server, base = start_server(tmp_path, cache_dir, tiny_sd1)
    errors: list[str] = []
    try:
        page = browser.new_page(viewport={"width": 1200, "height": 1000})
        page.on("pageerror", lambda e: errors.append(str(e)))
        # Playwright intercepts file choosers once a listener exists; registered late, inside expect_file_chooser,
        # the first chooser could open before the interception did (seen in CI)
        page.on("filechooser", lambda chooser: None)
        page.goto(base)
        expect(page.locator("#sets-empty")).to_be_visible()

        # Photos: name a set and press Enter; Enter on the drop zone opens the file chooser.
        tab_to(page, "#new-set")
        page.keyboard.type("../etc")
        page.keyboard.press("Enter")
        expect(page.locator("#set-error")).to_contain_text("one word of letters")  # said, not "Not Found"
        page.fill("#new-set", "")
        page.focus("#new-set")
        page.keyboard.type("kbd")
        page.keyboard.press("Enter")
        expect(page.locator("#set-select")).to_have_value("kbd")
        page.focus("#set-select")
        tab_to(page, "#dropzone")
        with page.expect_file_chooser() as chooser:
            page.keyboard.press("Enter")
        chooser.value.set_files(sorted(str(p) for p in photos.glob("*.png")))
        expect(page.locator("#photo-grid figure")).to_have_count(6)
        expect(page.locator("#upload-note")).to_contain_text("Added 6 photos")
        page.focus("#dropzone")
        tab_to(page, "#choose-files")  # "choose files" itself is reachable too
        with page.expect_file_chooser():
            page.keyboard.press("Enter")

        # A second, empty set created after it: a reload still shows the set chosen last, not the first one.
        page.fill("#new-set", "aaa-empty")
        page.press("#new-set", "Enter")
        expect(page.locator("#set-select")).to_have_value("aaa-empty")
        page.select_option("#set-select", "kbd")
        page.reload()
        expect(page.locator("#set-select")).to_have_value("kbd")
        expect(page.locator("#photo-grid figure")).to_have_count(6)

        # A caption is seen and written beside its photo (Enter saves); the empty set is deleted.
        caption = page.locator("#photo-grid figure input.caption").first
        caption.fill("smiling, on a beach")
        caption.press("Enter")
        expect(caption).to_have_attribute("title", "saved")
        page.reload()
        expect(page.locator("#photo-grid figure input.caption").first).to_have_value("smiling, on a beach")
        page.select_option("#set-select", "aaa-empty")
        page.once("dialog", lambda dialog: dialog.accept())
        page.click("#delete-set-button")
        expect(page.locator("#set-select option")).to_have_count(1)
        expect(page.locator("#set-select")).to_have_value("kbd")

        # Embeddings: Enter in the name creates it.
        page.goto(f"{base}/#embeddings")
        page.focus("#create-form-name")
        page.keyboard.type("kbd")
        page.focus("#create-form-vectors")
        page.keyboard.press("Control+A")
        page.keyboard.type("1")
        page.keyboard.press("Enter")
        expect(page.locator("#embedding-table tbody tr")).to_have_count(1, timeout=60_000)

        # Train: the set of the embedding's name is chosen (not the empty one first in order); Enter starts it.
        page.goto(f"{base}/#train")
        expect(page.locator("#train-form-set")).to_have_value("kbd")
        for field, value in (("size", "64"), ("preview_every", "0"), ("save_every", "0"), ("max_steps", "2")):
            page.fill(f"#train-form-{field}", value)
        # settings saved as a preset come back after a reload and a change (kept in this browser)
        page.once("dialog", lambda dialog: dialog.accept("tiny run"))
        page.click("#preset-save")
        page.reload()
        expect(page.locator("#train-form-set")).to_have_value("kbd")
        page.fill("#train-form-max_steps", "3000")
        page.select_option("#preset-select", "tiny run")
        expect(page.locator("#train-form-max_steps")).to_have_value("2")
        expect(page.locator("#train-form-size")).to_have_value("64")
        page.focus("#train-form-max_steps")
        page.keyboard.press("Enter")
        expect(page.locator("#train-status")).to_contain_text("to step 2", timeout=120_000)

        # Generate: Ctrl+Enter in the prompt; the picture comes with a Download link; a reload keeps the prompt.
        page.goto(f"{base}/#generate")
        page.fill("#generate-form-steps", "2")
        page.fill("#generate-form-size", "64x64")
        page.focus("#generate-form-prompt")
        page.keyboard.type("a photo of kbd")
        page.keyboard.press("Control+Enter")
        expect(page.locator("#gallery figure")).to_have_count(1, timeout=60_000)
        download = page.locator("#gallery figure a", has_text="Download")
        expect(download).to_have_attribute("download", re.compile(r"\.png$"))
        page.reload()
        expect(page.locator("#generate-form-prompt")).to_have_value("a photo of kbd")
        assert not errors, errors
    finally:
        server.terminate()
        server.wait(timeout=30)
