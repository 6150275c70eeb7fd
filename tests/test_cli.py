"""The tistudio command, end to end: create -> train -> Ctrl-C -> resume -> generate -> inspect -> convert,
and user errors as one line on stderr with exit code 2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from tistudio.cli import main
from tistudio.embeddings.files import Embedding, read_embedding, write_embedding


def tistudio(*args: str, cache: Path, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "tistudio", "--cache-dir", str(cache), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        **kwargs,
    )


def test_create_train_stop_resume_generate_end_to_end(
    tiny_sd1: Path, photos: Path, tmp_path: Path, cache_dir: Path
) -> None:
    model = ["--model", str(tiny_sd1)]
    created = tistudio("create", "tomtut", "--init-text", "toy figure", "--vectors", "3", *model, cache=cache_dir)
    assert created.returncode == 0, created.stderr
    assert read_embedding(tmp_path / "embeddings" / "tomtut.safetensors").step == 0

    # Train "for a long time", press Ctrl-C once the first steps are logged: the step finishes, it saves, exit 0.
    command = [
        sys.executable,
        "-m",
        "tistudio",
        "--cache-dir",
        str(cache_dir),
        "train",
        "tomtut",
        *model,
        "--dataset",
        str(photos),
        "--steps",
        "100000",
        "--size",
        "64",
        "--batch-size",
        "2",
        "--preview-every",
        "0",
        "--save-every",
        "0",
    ]
    process = subprocess.Popen(
        command, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    log = tmp_path / "runs" / "tomtut" / "loss.csv"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not log.is_file() or len(log.read_text().splitlines()) < 4):
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert "stopping after this step" in err and "stopped at step" in out
    stopped = read_embedding(tmp_path / "embeddings" / "tomtut.safetensors")
    assert 3 <= stopped.step < 100000

    # The same command (with a reachable max) continues from there, with the saved optimizer state.
    resumed = tistudio(
        "train",
        "tomtut",
        *model,
        "--dataset",
        str(photos),
        "--steps",
        str(stopped.step + 3),
        "--size",
        "64",
        "--batch-size",
        "2",
        "--preview-every",
        "0",
        cache=cache_dir,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming tomtut from step {stopped.step} with its optimizer state" in resumed.stderr
    final = read_embedding(tmp_path / "embeddings" / "tomtut.safetensors")
    assert final.step == stopped.step + 3
    steps_logged = [int(line.split(",")[0]) for line in log.read_text().splitlines()[1:]]
    assert steps_logged == list(range(1, final.step + 1))

    made = tistudio(
        "generate",
        "a photo of tomtut on a beach",
        "--negative",
        "blurry",
        *model,
        "--steps",
        "5",
        "--sampler",
        "DPM++ 2M Karras",
        "--cfg",
        "7",
        "--seed",
        "42",
        "--size",
        "64x64",
        "--batch",
        "2",
        "--embeddings",
        "embeddings",
        cache=cache_dir,
    )
    assert made.returncode == 0, made.stderr
    paths = [Path(line) for line in made.stdout.split()]
    assert [p.name for p in paths] == ["00000-42.png", "00001-43.png"]
    with Image.open(paths[0]) as image:
        assert 'TI hashes: "tomtut: ' in image.text["parameters"]

    shown = tistudio("inspect", "embeddings/tomtut.safetensors", "--json", cache=cache_dir)
    assert shown.returncode == 0 and f'"step": {final.step}' in shown.stdout and '"vectors": 3' in shown.stdout
    converted = tistudio("convert", "embeddings/tomtut.safetensors", "--to", "a1111", cache=cache_dir)
    assert converted.returncode == 0
    assert torch.equal(read_embedding(Path(converted.stdout.strip())).tensor, final.tensor)
    as_png = tistudio("convert", "embeddings/tomtut.safetensors", "--to", "png", cache=cache_dir)
    from a1111_rules import a1111_load_png_embedding

    name, vectors, step = a1111_load_png_embedding(Path(as_png.stdout.strip()))
    assert (name, step) == ("tomtut", final.step) and torch.equal(vectors, final.tensor)
    for_onetrainer = tistudio(
        "convert", "embeddings/tomtut.safetensors", "--to", "onetrainer", "--out-dir", "ot", cache=cache_dir
    )
    from a1111_rules import onetrainer_load_embedding

    assert torch.equal(onetrainer_load_embedding(Path(for_onetrainer.stdout.strip()), sdxl=False)[0], final.tensor)


def one_line_error(capsys, argv: list[str], fragment: str) -> None:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured.err
    lines = captured.err.strip().splitlines()
    assert lines[-1].startswith("tistudio: error: ") and fragment in lines[-1], captured.err
    assert "Traceback" not in captured.err


def test_user_errors_are_one_line_and_exit_2(
    tiny_sd1: Path, photos: Path, tmp_path: Path, cache_dir: Path, capsys
) -> None:
    base = ["--cache-dir", str(cache_dir)]
    model = ["--model", str(tiny_sd1)]
    assert main([*base, "create", "tomtut", *model, "--init-text", "toy"]) == 0
    capsys.readouterr()
    one_line_error(capsys, [*base, "create", "tomtut", *model], "an embedding with this name exists")
    one_line_error(capsys, [*base, "create", "woman", *model], "already a word the model knows")
    one_line_error(capsys, [*base, "create", "two words", *model], "use one word")
    one_line_error(capsys, [*base, "create", "tomtut2", *model, "--vectors", "0"], "vectors=0: must be at least 1")
    train = [*base, "train", "tomtut", *model, "--size", "64"]
    one_line_error(capsys, [*train, "--dataset", str(tmp_path / "nowhere")], "does not exist")
    one_line_error(capsys, [*train, "--dataset", str(photos), "--lr", "0.005:100, 1e-3:abc"], "item 2 '1e-3:abc'")
    one_line_error(capsys, [*train, "--dataset", str(photos), "--batch-size", "-1"], "batch_size=-1")
    write_embedding(Embedding(name="wide", vectors={"clip": torch.zeros(1, 768)}), Path("embeddings/wide.safetensors"))
    one_line_error(capsys, [*base, "train", "wide", *model, "--dataset", str(photos)], "768 wide")
    one_line_error(capsys, [*base, "generate", "a photo", "--model", str(tmp_path / "missing.ckpt")], "no such file")
    one_line_error(capsys, [*base, "generate", "a photo", *model, "--sampler", "Fast"], "unknown sampler")
    one_line_error(capsys, [*base, "inspect", str(photos / "01-toy figure.png")], "sd-ti-embedding")
    assert not Path("runs").exists()


def test_use_step_makes_a_saved_step_the_embedding_and_training_still_continues_the_run(
    tiny_sd1: Path, photos: Path, tmp_path: Path, cache_dir: Path, capsys
) -> None:
    base, model = ["--cache-dir", str(cache_dir)], ["--model", str(tiny_sd1)]
    train = [
        *base,
        "train",
        "tomtut",
        *model,
        "--dataset",
        str(photos),
        "--size",
        "64",
        "--batch-size",
        "2",
        "--preview-every",
        "0",
        "--save-every",
        "3",
        "--eval-every",
        "0",
    ]
    assert main([*base, "create", "tomtut", *model, "--init-text", "toy"]) == 0
    assert main([*train, "--steps", "6"]) == 0
    copies = tmp_path / "runs" / "tomtut" / "embeddings"
    one_line_error(capsys, [*base, "use-step", "tomtut", "4"], "no saved copy of tomtut at step 4 (saved steps: 3, 6)")

    assert main([*base, "use-step", "tomtut", "3"]) == 0
    chosen = read_embedding(tmp_path / "embeddings" / "tomtut.safetensors")
    assert chosen.step == 3 and torch.equal(chosen.tensor, read_embedding(copies / "tomtut-3.safetensors").tensor)
    assert read_embedding(copies / "tomtut-6.safetensors").step == 6  # the step it replaced is still there
    capsys.readouterr()
    assert main([*train, "--steps", "9"]) == 0
    assert "continuing from the last step 6" in capsys.readouterr().err
    log = (tmp_path / "runs" / "tomtut" / "loss.csv").read_text().splitlines()[1:]
    assert [int(line.split(",")[0]) for line in log] == list(range(1, 10))


def test_continue_from_kept_trains_on_from_the_chosen_step_and_sets_the_later_steps_aside(
    tiny_sd1: Path, photos: Path, tmp_path: Path, cache_dir: Path, capsys
) -> None:
    base, model = ["--cache-dir", str(cache_dir)], ["--model", str(tiny_sd1)]
    train = [*base, "train", "tomtut", *model, "--dataset", str(photos), "--size", "64", "--batch-size", "2"]
    train += ["--preview-every", "3", "--preview-steps", "1", "--save-every", "3", "--eval-every", "3"]
    assert main([*base, "create", "tomtut", *model, "--init-text", "toy"]) == 0
    assert main([*train, "--steps", "6", "--final", "last"]) == 0
    run = tmp_path / "runs" / "tomtut"
    abandoned = read_embedding(run / "embeddings" / "tomtut-6.safetensors")
    assert main([*base, "use-step", "tomtut", "3"]) == 0
    capsys.readouterr()

    assert main([*train, "--steps", "9", "--final", "last", "--continue-from", "kept"]) == 0
    assert "holds step 3; continuing from it, not from the last step 6" in capsys.readouterr().err
    # the branch: steps 4-9 trained from step 3's vectors; what the run had after step 3 is kept aside, whole
    (aside,) = run.glob("after-3-*")
    assert read_embedding(aside / "embeddings" / "tomtut-6.safetensors").tensor.equal(abandoned.tensor)
    assert (aside / "previews" / "tomtut-6.png").is_file() and (aside / "tomtut-last.safetensors").is_file()
    assert [line.split(",")[0] for line in (aside / "loss.csv").read_text().splitlines()[1:]] == list("123456")
    redone = read_embedding(run / "embeddings" / "tomtut-6.safetensors")
    assert redone.step == 6 and not redone.tensor.equal(abandoned.tensor)
    for log, steps in (("loss.csv", range(1, 10)), ("eval.csv", (0, 3, 6, 9))):
        assert [int(row.split(",")[0]) for row in (run / log).read_text().splitlines()[1:]] == list(steps)
    final = read_embedding(tmp_path / "embeddings" / "tomtut.safetensors")
    assert final.step == 9 and "last_step" not in final.meta and "best_by" not in final.meta
    assert sorted(p.name for p in (run / "previews").iterdir()) == [f"tomtut-{s}.png" for s in (0, 3, 6, 9)]


def test_the_command_leaves_the_library_logger_as_it_found_it(tmp_path: Path, capsys) -> None:
    """main() used in-process (a notebook, a test) must not keep printing the library's log lines after it."""
    import logging

    logger = logging.getLogger("tistudio")
    before = (logger.handlers[:], logger.propagate, logger.level)
    assert main(["inspect", str(tmp_path / "missing.pt")]) == 2
    assert (logger.handlers[:], logger.propagate, logger.level) == before
    logger.warning("after the command")
    assert "after the command" not in capsys.readouterr().err


def test_help_lists_the_options_from_the_dataclasses(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in (
        "--learning-rate",
        "--lr",
        "--gradient-accumulation",
        "--template",
        "--preview-every",
        "--save-every",
        "--flip",
        "--max-steps",
        "--steps",
        "--embeddings-dir",
    ):
        assert flag in text


def test_demo_runs_the_whole_story_and_writes_the_report(tmp_path: Path, cache_dir: Path, capsys) -> None:
    """The demo's plumbing on a short run (tests/test_world.py measures that it learns the person)."""
    assert main(["--cache-dir", str(cache_dir), "demo", "--out", "demo", "--demo-steps", "50"]) == 0
    out = capsys.readouterr().out
    assert "resumed the first" in out and "world model" in out and "before training" in out
    report = (tmp_path / "demo" / "report.html").read_text()
    assert "small world model" in report and report.count("<svg") >= 2  # loss, and evaluation with likeness
    assert "long red hair" in report and report.count("tomtut-") >= 15  # the training photos
    assert report.count("alt='step ") == 3  # previews at steps 0, 25 (the stop of sitting one) and 50
    assert len(list((tmp_path / "demo" / "images").glob("*.png"))) == 8
    assert "tistudio train tomtut --model ~/models/v1-5-pruned-emaonly.safetensors" in report
    kept = read_embedding(tmp_path / "demo" / "embeddings" / "tomtut.safetensors")
    rows = (tmp_path / "demo" / "run" / "eval.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "25", "50"] and all(r.split(",")[2] for r in rows[1:])
    assert kept.step in (25, 50)
