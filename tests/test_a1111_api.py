"""The A1111 API through `webuiapi`, a real A1111 client from PyPI that nobody here wrote, against a served
workspace: txt2img with A1111's fields, the lists and options clients read, and A1111's Train tab scripted over
HTTP (create, a blocking train followed through /progress, interrupt)."""

from __future__ import annotations

import io
import socket
import threading
import time
from pathlib import Path

import pytest
import requests
import torch
import uvicorn

from a1111_rules import a1111_load_png_embedding, parse_generation_parameters
from tistudio.config import ModelOptions
from tistudio.embeddings.files import Embedding, read_embedding, write_embedding
from tistudio.server import ServerConfig, create_app

webuiapi = pytest.importorskip("webuiapi")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def served(tmp_path, tiny_sd1, cache_dir):
    """A workspace served over real HTTP on a thread, with an embedding and a style in it."""
    workspace = tmp_path / "ws"
    write_embedding(
        Embedding(name="tomtut", vectors={"clip": torch.randn(2, 64)}, step=40),
        workspace / "embeddings" / "tomtut.safetensors",
    )
    (workspace / "styles.csv").write_text(
        'name,prompt,negative_prompt\nlego,"{prompt} as a lego figure",blurry\noil,oil painting,\n', encoding="utf-8"
    )
    app = create_app(ServerConfig(workspace=workspace, model=ModelOptions(model=str(tiny_sd1)), cache_dir=cache_dir))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield webuiapi.WebUIApi(host="127.0.0.1", port=port), workspace, f"http://127.0.0.1:{port}"
    app.state.server.close()
    server.should_exit = True
    thread.join(timeout=30)


def settings_of(result) -> dict:
    return parse_generation_parameters(result.info["infotexts"][0])


def test_webuiapi_txt2img_with_a1111s_fields(served) -> None:
    api, workspace, _ = served
    result = api.txt2img(
        prompt="a photo of tomtut",
        negative_prompt="ugly",
        styles=["lego"],
        seed=42,
        steps=3,
        width=64,
        height=64,
        cfg_scale=6,
        sampler_name="DPM++ 2M",
        batch_size=2,
        n_iter=2,
    )
    assert len(result.images) == 4 and result.images[0].size == (64, 64)
    info = result.info
    assert info["all_seeds"] == [42, 43, 44, 45] and info["seed"] == 42 and info["index_of_first_image"] == 0
    assert info["all_prompts"] == ["a photo of tomtut as a lego figure"] * 4 and info["styles"] == ["lego"]
    assert info["all_negative_prompts"] == ["ugly, blurry"] * 4 and info["clip_skip"] == 1
    assert set(info) >= {"subseed", "all_subseeds", "job_timestamp", "sd_model_name", "infotexts"}
    read = settings_of(result)  # webuiapi's default schedule "automatic" is Karras for DPM++ 2M, as in A1111 1.10
    assert (read["Sampler"], read["Schedule type"], read["Steps"], read["Seed"]) == ("DPM++ 2M", "Karras", "3", "42")
    assert "TI hashes" in read and read["RNG"] == "CPU"
    assert not list((workspace / "outputs").glob("*.png"))  # save_images false (A1111's API default): not kept

    kept = api.txt2img(
        prompt="tomtut",
        steps=2,
        width=64,
        height=64,
        save_images=True,
        send_images=False,
        override_settings={"CLIP_stop_at_last_layers": 2},
        sampler_name="DPM++ SDE",
        scheduler="Karras",
    )
    assert kept.images == [] and len(list((workspace / "outputs").glob("*.png"))) == 1
    assert settings_of(kept)["Clip skip"] == "2" and settings_of(kept)["Sampler"] == "DPM++ SDE"
    lms = api.txt2img(prompt="tomtut", steps=2, width=64, height=64, sampler_name="LMS", scheduler="uniform")
    assert (settings_of(lms)["Sampler"], settings_of(lms)["Schedule type"]) == ("LMS", "Automatic")


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"enable_hr": True}, "enable_hr"),
        ({"restore_faces": True}, "restore_faces"),
        ({"subseed_strength": 0.5}, "subseed_strength"),
        ({"styles": ["nope"]}, "styles"),
        (
            {"override_settings": {"sd_model_checkpoint": "another.safetensors"}},
            "override_settings.sd_model_checkpoint",
        ),
        ({"override_settings": {"img2img_fix_steps": True}}, "override_settings.img2img_fix_steps"),
        ({"sampler_name": "DDIM", "scheduler": "Karras"}, "scheduler"),
        ({"script_name": "x/y/z plot"}, "script_name"),
    ],
)
def test_what_tistudio_cannot_draw_is_refused_naming_the_field(served, fields, named) -> None:
    api, _, _ = served
    with pytest.raises(RuntimeError) as refused:
        api.txt2img(prompt="tomtut", steps=2, width=64, height=64, **fields)
    status, text = refused.value.args
    assert status in (400, 422) and f'"field":"{named}"' in text.replace(" ", ""), text


def test_the_lists_and_options_clients_read_first(served) -> None:
    api, _, _ = served
    assert "DPM++ 2M" in api.util_get_sampler_names() and "LMS" in api.util_get_sampler_names()
    assert {"automatic", "karras", "exponential"} <= set(api.util_get_scheduler_names())
    [model] = api.get_sd_models()
    assert api.util_get_model_names() == [model["title"]] and "/" not in model["filename"]
    assert api.get_prompt_styles()[0] == {
        "name": "lego",
        "prompt": "{prompt} as a lego figure",
        "negative_prompt": "blurry",
    }
    assert api.get_embeddings()["loaded"]["tomtut"]["step"] == 40
    assert api.refresh_checkpoints() == {}
    api.util_set_model(model["title"])  # webuiapi's own helper: sets sd_model_checkpoint to the served one
    assert api.util_get_current_model() == model["title"]
    api.set_options({"CLIP_stop_at_last_layers": 2})
    assert api.get_options()["CLIP_stop_at_last_layers"] == 2
    later = api.txt2img(prompt="tomtut", steps=2, width=64, height=64)
    assert settings_of(later)["Clip skip"] == "2"
    assert api.get_progress()["state"]["job_count"] == 0


def a1111_train_body(name: str, data_root: str, steps: int) -> dict:
    """Every one of the 30 parameters A1111's train/embedding requires, as its Train tab sends them."""
    return {
        "id_task": "task(abc)",
        "embedding_name": name,
        "learn_rate": "0.005",
        "batch_size": 1,
        "gradient_step": 1,
        "data_root": data_root,
        "log_directory": "textual_inversion",
        "training_width": 64,
        "training_height": 64,
        "varsize": False,
        "steps": steps,
        "clip_grad_mode": "disabled",
        "clip_grad_value": "0.1",
        "shuffle_tags": False,
        "tag_drop_out": 0,
        "latent_sampling_method": "once",
        "use_weight": False,
        "create_image_every": 2,
        "save_embedding_every": 2,
        "template_filename": "subject_filewords.txt",
        "save_image_with_stored_embedding": True,
        "preview_from_txt2img": False,
        "preview_prompt": "",
        "preview_negative_prompt": "",
        "preview_steps": 2,
        "preview_sampler_name": "Euler a",
        "preview_cfg_scale": 7,
        "preview_seed": -1,
        "preview_width": 512,  # the Train tab's defaults: A1111 reads them only with preview_from_txt2img
        "preview_height": 512,
    }


def last_step(workspace: Path) -> int:
    embedding = read_embedding(workspace / "embeddings" / "newface.safetensors")
    return embedding.meta_count("last_step") or embedding.step


def test_a1111s_train_tab_scripted_through_webuiapi(served, photos) -> None:
    api, workspace, base = served
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in sorted(photos.glob("*.png"))]
    assert requests.post(f"{base}/api/photosets/faces/photos", files=files, timeout=30).status_code == 200
    created = api.custom_post(
        "create/embedding",
        {"name": "newface", "num_vectors_per_token": 2, "overwrite_old": False, "init_text": "toy"},
        baseurl=True,
    )
    assert created.info == "create embedding filename: embeddings/newface.safetensors"

    answers, seen = [], []
    body = a1111_train_body("newface", str(workspace / "photos" / "faces"), steps=4)  # a server path, as A1111's
    worker = threading.Thread(target=lambda: answers.append(api.custom_post("train/embedding", body, baseurl=True)))
    worker.start()
    while worker.is_alive():
        progress = api.get_progress()
        if progress["state"]["sampling_step"]:
            seen.append(progress)
        time.sleep(0.05)
    assert answers[0].info == "train embedding complete: filename: embeddings/newface.safetensors error: None"
    assert last_step(workspace) == 4
    said = answers[0].json  # which step the embeddings folder holds, and why (A1111 keeps the last; tistudio the best)
    assert said["last_step"] == 4 and said["kept_step"] <= 4 and said["kept_because"].startswith("it ")
    entry = api.get_embeddings()["loaded"]["newface"]
    assert (entry["kept_step"], entry["kept_because"]) == (said["kept_step"], said["kept_because"])
    assert seen and seen[-1]["textinfo"].startswith("Training newface: step") and seen[-1]["progress"] > 0
    # "Save images with embedding in PNG chunks": each preview is the embedding at its step, as A1111 loads it
    run = workspace / "runs" / "newface"
    name, vectors, step = a1111_load_png_embedding(run / "previews" / "newface-4.png")
    assert (name, step) == ("newface-4", 4)
    assert torch.equal(vectors, read_embedding(run / "embeddings" / "newface-4.safetensors").tensor)

    longer = threading.Thread(
        target=lambda: answers.append(
            api.custom_post(
                "train/embedding",
                {**a1111_train_body("newface", "faces", steps=4000), "create_image_every": 0},
                baseurl=True,
            )
        )
    )
    longer.start()
    while api.get_progress()["state"]["sampling_step"] < 6 and longer.is_alive():
        time.sleep(0.05)
    assert api.interrupt() == {}
    longer.join(timeout=60)
    assert not longer.is_alive() and answers[1].info.endswith("error: None")
    assert answers[1].json["status"] == "stopped"
    assert 6 <= last_step(workspace) < 4000


def test_a1111s_training_fields_tistudio_cannot_apply_are_refused(served) -> None:
    api, _, _ = served
    for change, named in (
        ({"varsize": True}, "varsize"),
        ({"latent_sampling_method": "random"}, "latent_sampling_method"),
        ({"training_height": 96}, "training_height"),
        ({"clip_grad_mode": "value"}, "clip_grad_mode"),
        ({"data_root": "/etc"}, "data_root"),
        ({"template_filename": "mine.txt"}, "template_filename"),
    ):
        with pytest.raises(RuntimeError) as refused:
            api.custom_post("train/embedding", {**a1111_train_body("tomtut", "faces", 4), **change}, baseurl=True)
        assert refused.value.args[0] in (400, 422) and f'"field":"{named}"' in refused.value.args[1], change


def test_the_routes_webuiapi_clients_call_next(served) -> None:
    """png-info, skip, memory and the lists are served (empty where tistudio truly has none); img2img and
    cmd-flags are refused in A1111's error shape, not a 404. (Issue 33.)"""
    from PIL import Image, PngImagePlugin

    api, _, base = served
    picture = Image.new("RGB", (8, 8))
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a photo of tomtut\nSteps: 20, Sampler: Euler a, Seed: 42")
    info.add_text("sd-ti-embedding", "abc")
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", pnginfo=info)
    result = api.png_info(Image.open(io.BytesIO(buffer.getvalue())))
    assert result.info.startswith("a photo of tomtut\nSteps: 20") and result.json["items"] == {"sd-ti-embedding": "abc"}
    assert api.skip() == {}
    assert api.get_sd_vae() == [] and api.get_upscalers() == []
    memory = api.get_memory()
    assert memory["ram"]["total"] > memory["ram"]["free"] > 0 and "cuda" in memory
    for method, route in (("post", "img2img"), ("get", "cmd-flags")):
        answer = getattr(requests, method)(f"{base}/sdapi/v1/{route}", json={}, timeout=10)
        assert answer.status_code == 501 and answer.json()["error"] == "NotImplemented", (route, answer.text)
    refused = requests.post(f"{base}/sdapi/v1/png-info", json={"image": "not a picture"}, timeout=10)
    assert refused.status_code == 400 and refused.json()["field"] == "image"


def test_loras_are_listed_and_called_from_prompts_as_a1111_does(served, sd1_model) -> None:
    """A LoRA with its word bundled, put in the workspace's LoRA folder: listed with its metadata (no server
    path), called by <lora:NAME:weight> in a txt2img prompt, its word working and its hash in the infotext."""
    from tistudio.embeddings.bundle import lora_hash, write_lora
    from tistudio.models.lora import target_layers

    api, workspace, base = served
    tensors = {}
    generator = torch.Generator().manual_seed(3)
    for name, module in target_layers(sd1_model.unet, "attention").items():
        tensors[f"{name}.lora_down.weight"] = torch.randn(2, module.in_features, generator=generator) * 0.3
        tensors[f"{name}.lora_up.weight"] = torch.randn(module.out_features, 2, generator=generator) * 0.3
        tensors[f"{name}.alpha"] = torch.tensor(2.0)
    word = Embedding(name="hatted", vectors={"clip": torch.randn(2, 64, generator=generator)})
    path = write_lora(workspace / "loras" / "hatted.safetensors", tensors, [word], {"ss_output_name": "hatted"})
    listed = api.get_loras()
    assert [(x["name"], x["alias"], x["path"]) for x in listed] == [("hatted", "hatted", "hatted.safetensors")]
    assert listed[0]["metadata"]["ss_output_name"] == "hatted"
    assert requests.post(f"{base}/sdapi/v1/refresh-loras", timeout=10).status_code == 200
    called = api.txt2img(prompt="a photo of hatted <lora:hatted:0.8>", seed=5, steps=2, width=64, height=64)
    plain = api.txt2img(prompt="a photo of hatted", seed=5, steps=2, width=64, height=64)
    settings = settings_of(called)
    assert settings["Lora hashes"] == f"hatted: {lora_hash(path)}" and "Lora hashes" not in settings_of(plain)
    assert settings["Prompt"] == "a photo of hatted <lora:hatted:0.8>"
    assert called.image.tobytes() != plain.image.tobytes()
    page_list = requests.get(f"{base}/api/loras", timeout=10).json()  # what the page shows
    assert (
        page_list[0]["name"] == "hatted" and page_list[0]["rank"] == 2 and "hatted (2 vectors" in page_list[0]["words"]
    )
    assert requests.get(f"{base}/api/loras/hatted/file", timeout=10).content == path.read_bytes()
    assert requests.get(f"{base}/api/loras/nobody/file", timeout=10).status_code == 404
    missing = requests.post(f"{base}/sdapi/v1/txt2img", json={"prompt": "<lora:nobody:1>", "steps": 2}, timeout=30)
    assert missing.status_code in (400, 422) and "nobody" in missing.text


def test_creating_an_embedding_that_exists_is_refused_once_in_words(served) -> None:
    _, _, base = served
    body = {"name": "tomapi", "num_vectors_per_token": 1}
    assert requests.post(f"{base}/sdapi/v1/create/embedding", json=body, timeout=60).status_code == 200
    again = requests.post(f"{base}/sdapi/v1/create/embedding", json=body, timeout=60)
    assert again.status_code == 400 and again.json()["field"] == "name"
    assert again.json()["error"].count("tomapi") == 2, again.json()  # the name, and the file it names; said once


def test_embeddings_that_do_not_fit_are_skipped_before_the_model_is_loaded(served) -> None:
    """A fresh SD1 server listed a 2048-wide SDXL file as loaded until its first generation. (Issue 33.)"""
    api, workspace, _ = served
    write_embedding(
        Embedding(name="xlface", vectors={"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}),
        workspace / "embeddings" / "xlface.safetensors",
    )
    listed = api.get_embeddings()
    assert set(listed["loaded"]) == {"tomtut"} and set(listed["skipped"]) == {"xlface"}
    assert listed["skipped"]["xlface"]["shape"] == 2048


def test_the_kept_step_is_said_with_its_reason() -> None:
    from tistudio.server.routes.a1111 import kept

    vectors = {"clip": torch.randn(2, 64)}
    best = Embedding(name="a", vectors=vectors, step=300, meta={"last_step": "500", "best_by": "the highest likeness"})
    assert kept(best) == {"kept_step": 300, "kept_because": "it had the highest likeness", "last_step": 500}
    chosen = Embedding(name="a", vectors=vectors, step=50, meta={"last_step": "400", "best_by": "chosen"})
    assert kept(chosen)["kept_because"] == "it was chosen with use-step"
    assert kept(Embedding(name="a", vectors=vectors, step=7))["kept_because"] == "it is the last step trained"


def test_progress_counts_jobs_as_a1111_does() -> None:
    """n_iter 3 of 150 steps is 3 jobs of 150 sampling steps (it read 1 job of 450); a training counts its steps as
    jobs (job_no stayed 0). (Issue 33.)"""
    from tistudio.server.jobs import Job
    from tistudio.server.routes.a1111 import progress_counts

    drawing = Job(id="g", kind="generate", request={"batch_count": 3, "steps": 150})
    assert progress_counts(drawing, 200, 450) == {
        "job_count": 3,
        "job_no": 1,
        "sampling_step": 50,
        "sampling_steps": 150,
    }
    assert progress_counts(drawing, 450, 450)["job_no"] == 2
    training = Job(id="t", kind="train", request={})
    assert progress_counts(training, 7, 40) == {"job_count": 40, "job_no": 7, "sampling_step": 7, "sampling_steps": 40}
