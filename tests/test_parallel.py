"""Data-parallel training under torchrun: two CPU processes (gloo) train the vectors one process trains, resume
exactly, and a killed process leaves loadable files and a clear message."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tistudio.config import CreateOptions, TrainOptions
from tistudio.embeddings.files import read_embedding
from tistudio.train.create import create_embedding
from tistudio.train.loop import train
from tistudio.train.parallel import Parallel
from tistudio.train.runfolder import read_loss_log

DRIVER = Path(__file__).parent / "driver.py"
# The vectors of N processes and of one differ by float rounding (a mean taken in halves, the UNet at another batch
# size): 9e-7 here after 6 steps. Adam's normalised steps can turn such last bits into a few percent of one step
# (lr 0.005) where a gradient component is near zero, so the bound is a tenth of a step.
TOLERANCE = 0.1 * 0.005
SETTINGS = [
    "--size",
    "64",
    "--gradient-accumulation",
    "2",
    "--flip",
    "--save-every",
    "3",
    "--eval-every",
    "2",
    "--preview-every",
    "0",
    "--learning-rate",
    "0.005",
]

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="this PyTorch has no gloo backend",
)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(
    cache: Path, *cli: str, processes: int = 2, slow_step: float = 0.0, wait: bool = True, launcher: str = "torchrun"
) -> subprocess.CompletedProcess | subprocess.Popen:
    """`torchrun --standalone --nproc-per-node N` (or `accelerate launch --multi_gpu --num_processes N`, which runs
    gloo where there is no GPU) of the tistudio CLI, through the test driver (for slow steps)."""
    if launcher == "accelerate":
        start = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            f"--num_processes={processes}",
            "--num_machines=1",
            "--mixed_precision=no",
            "--dynamo_backend=no",
            f"--main_process_port={free_port()}",
        ]
    else:
        start = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    command = [
        *start,
        str(DRIVER),
        *(["--slow-step", str(slow_step)] if slow_step else []),
        "--cli",
        "--cache-dir",
        str(cache),
        *cli,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if wait:
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def new_embedding(model, folder: Path) -> Path:
    return create_embedding(
        CreateOptions(
            model="unused", name="tomtut", init_text="toy", vectors=2, embeddings_dir=str(folder), overwrite=True
        ),
        cache_dir=Path("cache"),
        model=model,
    )


def one_process(model, photos: Path, folder: Path, cache_dir: Path, **changes) -> None:
    """What the two-process runs are compared with: one process, batch 2 and gradient accumulation 2 (the global
    batch of batch 1 on each of two processes with the CLI's SETTINGS)."""
    settings = dict(
        model="unused",
        embedding="tomtut",
        dataset=str(photos),
        embeddings_dir=str(folder / "emb"),
        run_dir=str(folder / "run"),
        size=64,
        batch_size=2,
        gradient_accumulation=2,
        flip=True,
        save_every=3,
        eval_every=2,
        preview_every=0,
        learning_rate="0.005",
    )
    train(TrainOptions(**{**settings, **changes}), cache_dir=cache_dir, model=model)


def copies(template: Path, *folders: Path) -> None:
    for folder in folders:
        (folder / "emb").mkdir(parents=True)
        shutil.copy(template, folder / "emb" / "tomtut.safetensors")


def cli_train(model: Path, photos: Path, folder: Path, *extra: str) -> list[str]:
    return [
        "train",
        "tomtut",
        "--model",
        str(model),
        "--dataset",
        str(photos),
        "--embeddings-dir",
        str(folder / "emb"),
        "--run-dir",
        str(folder / "run"),
        *SETTINGS,
        *extra,
    ]


def resolved(folder: Path) -> dict:
    return json.loads((folder / "run" / "options.json").read_text())["resolved"]


def vectors(folder: Path):
    return read_embedding(folder / "emb" / "tomtut.safetensors")


def test_the_launchers_environment_places_the_process() -> None:
    assert Parallel.from_environment({}) == Parallel()
    placed = Parallel.from_environment({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (placed.rank, placed.world, placed.local_rank, placed.main) == (3, 4, 1, False)
    assert list(placed.share(10)) == [3, 7] and placed.part(2) == slice(6, 8)
    from tistudio.errors import OptionError

    with pytest.raises(OptionError, match=r"RANK.*below WORLD_SIZE=2"):
        Parallel.from_environment({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(OptionError, match=r"WORLD_SIZE.*whole number"):
        Parallel.from_environment({"WORLD_SIZE": "two"})


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_train_the_vectors_one_process_trains(
    tiny_sd1, sd1_model, photos, tmp_path, cache_dir, launcher
) -> None:
    """Batch 1 on each of 2 processes is the global batch of batch 2 on one: the same vectors and losses, the
    resolved world saved, and only process 0 writing."""
    template = new_embedding(sd1_model, tmp_path / "template")
    one, two = tmp_path / "one", tmp_path / "two"
    copies(template, one, two)
    done = torchrun(
        cache_dir, *cli_train(tiny_sd1, photos, two, "--batch-size", "1", "--max-steps", "6"), launcher=launcher
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained tomtut to step 6") == 1  # process 0 alone reports
    one_process(sd1_model, photos, one, cache_dir, max_steps=6)
    a, b = vectors(one), vectors(two)
    assert a.step == b.step == 6
    assert torch.allclose(a.tensor, b.tensor, atol=TOLERANCE, rtol=0), (a.tensor - b.tensor).abs().max()
    assert not torch.equal(a.tensor, read_embedding(template).tensor)
    rows_one, rows_two = read_loss_log(one / "run" / "loss.csv"), read_loss_log(two / "run" / "loss.csv")
    assert [r["step"] for r in rows_two] == [1, 2, 3, 4, 5, 6]  # one writer: no step logged twice
    assert all(abs(x["loss"] - y["loss"]) < 1e-5 for x, y in zip(rows_one, rows_two, strict=True))
    settings = resolved(two)
    assert (settings["batch_size"], settings["processes"], settings["global_batch"]) == (1, 2, 4)
    assert resolved(one)["global_batch"] == 4
    assert sorted(p.name for p in (two / "run" / "embeddings").iterdir()) == [
        "tomtut-3.safetensors",
        "tomtut-6.safetensors",
    ]


def test_two_processes_draw_each_step_from_one_bucket_as_one_process_does(
    tiny_sd1, sd1_model, tmp_path, cache_dir
) -> None:
    """Aspect-ratio buckets under torchrun: each process encodes its share of photos of three shapes, the latents
    are exchanged whatever their shape, and every micro-batch's samples come from one bucket on both processes."""
    from corpus import shaped_photos

    photos = shaped_photos(tmp_path / "photos", per_shape=2)
    template = new_embedding(sd1_model, tmp_path / "template")
    one, two = tmp_path / "one", tmp_path / "two"
    copies(template, one, two)
    done = torchrun(
        cache_dir, *cli_train(tiny_sd1, photos, two, "--batch-size", "1", "--max-steps", "4", "--buckets", "on")
    )
    assert done.returncode == 0, done.stderr[-3000:]
    one_process(sd1_model, photos, one, cache_dir, max_steps=4, buckets="on")
    a, b = vectors(one), vectors(two)
    assert torch.allclose(a.tensor, b.tensor, atol=TOLERANCE, rtol=0), (a.tensor - b.tensor).abs().max()
    assert resolved(two)["buckets"] == resolved(one)["buckets"] == "on: 2 x 48x80, 2 x 64x64, 2 x 80x48"


def test_two_processes_train_the_word_and_its_lora_as_one_process_does(
    tiny_sd1, sd1_model, photos, tmp_path, cache_dir
) -> None:
    """Pivotal tuning under torchrun: every process starts the same LoRA (seeded), their gradients are averaged with
    the word's, and process 0 writes the LoRA the one-process run writes."""
    from safetensors.torch import load_file

    template = new_embedding(sd1_model, tmp_path / "template")
    one, two = tmp_path / "one", tmp_path / "two"
    copies(template, one, two)
    lora = ["--lora-rank", "2", "--lora-learning-rate", "0.01"]
    done = torchrun(
        cache_dir,
        *cli_train(tiny_sd1, photos, two, "--batch-size", "1", "--max-steps", "4", *lora),
        "--loras-dir",
        str(two / "loras"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    one_process(
        sd1_model,
        photos,
        one,
        cache_dir,
        max_steps=4,
        loras_dir=str(one / "loras"),
        lora_rank=2,
        lora_learning_rate="0.01",
    )
    a, b = (load_file(folder / "loras" / "tomtut.safetensors") for folder in (one, two))
    assert a.keys() == b.keys()
    assert sum(float(a[key].abs().sum()) for key in a if key.endswith("lora_up.weight")) > 0
    for key in a:
        assert torch.allclose(a[key], b[key], atol=TOLERANCE, rtol=0), (key, (a[key] - b[key]).abs().max())


def test_a_two_process_run_resumes_exactly_on_two_or_on_one(tiny_sd1, sd1_model, photos, tmp_path, cache_dir) -> None:
    template = new_embedding(sd1_model, tmp_path / "template")
    straight, resumed, on_one = tmp_path / "straight", tmp_path / "resumed", tmp_path / "on-one"
    copies(template, straight, resumed, on_one)
    runs = [(straight, "6"), (resumed, "3"), (on_one, "3"), (resumed, "6")]
    for folder, steps in runs:
        done = torchrun(cache_dir, *cli_train(tiny_sd1, photos, folder, "--batch-size", "1", "--max-steps", steps))
        assert done.returncode == 0, done.stderr[-3000:]
    assert vectors(resumed).step == 6 and torch.equal(vectors(straight).tensor, vectors(resumed).tensor)
    assert read_loss_log(straight / "run" / "loss.csv") == read_loss_log(resumed / "run" / "loss.csv")
    # the second sitting on one process: --batch-size 0 keeps the run's global micro-batch (1 x 2 processes)
    train(
        TrainOptions(
            model="unused",
            embedding="tomtut",
            dataset=str(photos),
            embeddings_dir=str(on_one / "emb"),
            run_dir=str(on_one / "run"),
            size=64,
            batch_size=0,
            gradient_accumulation=2,
            flip=True,
            save_every=3,
            eval_every=2,
            preview_every=0,
            max_steps=6,
            learning_rate="0.005",
        ),
        cache_dir=cache_dir,
        model=sd1_model,
    )
    assert (resolved(on_one)["batch_size"], resolved(on_one)["processes"]) == (2, 1)
    assert torch.allclose(vectors(on_one).tensor, vectors(straight).tensor, atol=TOLERANCE, rtol=0)


def rank_pids(parent: int) -> dict[int, int]:
    """RANK -> pid of the processes torchrun started (read from /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int((entry / "stat").read_text().split(") ")[1].split()[1]) != parent:
                continue
            environ = dict(item.split("=", 1) for item in (entry / "environ").read_text().split("\0") if "=" in item)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in environ:
            found[int(environ["RANK"])] = int(entry.name)
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the processes through /proc")
def test_killing_one_process_leaves_loadable_files_and_a_clear_message(
    tiny_sd1, sd1_model, photos, tmp_path, cache_dir
) -> None:
    from test_reliability import check_everything_on_disk_loads

    folder = tmp_path / "killed"
    copies(new_embedding(sd1_model, tmp_path / "template"), folder)
    launcher = torchrun(
        cache_dir,
        *cli_train(tiny_sd1, photos, folder, "--batch-size", "1", "--max-steps", "400", "--save-every", "2"),
        slow_step=0.1,
        wait=False,
    )
    try:
        deadline = time.monotonic() + 120
        while (
            time.monotonic() < deadline
            and len(read_loss_log(folder / "run" / "loss.csv") if (folder / "run" / "loss.csv").exists() else []) < 3
        ):
            time.sleep(0.2)
        ranks = rank_pids(launcher.pid)
        assert set(ranks) == {0, 1}, ranks
        os.kill(ranks[1], signal.SIGKILL)
        _, stderr = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    assert "another process of this run stopped or failed" in stderr, stderr[-3000:]
    assert "run the same command again to continue" in stderr
    assert check_everything_on_disk_loads(folder) == 0
    saved = vectors(folder)
    assert saved.step >= 2 and torch.isfinite(saved.tensor).all()
    again = torchrun(
        cache_dir, *cli_train(tiny_sd1, photos, folder, "--batch-size", "1", "--max-steps", str(saved.step + 2))
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert vectors(folder).step == saved.step + 2


def test_ctrl_c_stops_every_process_at_one_step_saved(tiny_sd1, sd1_model, photos, tmp_path, cache_dir) -> None:
    """Ctrl-C in the terminal reaches torchrun and both processes (one process group); torchrun then sends them
    SIGTERM too. They agree on the step to stop at, process 0 saves it and says so, and the run continues after."""
    folder = tmp_path / "interrupted"
    copies(new_embedding(sd1_model, tmp_path / "template"), folder)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        str(DRIVER),
        "--slow-step",
        "0.1",
        "--cli",
        "--cache-dir",
        str(cache_dir),
        *cli_train(tiny_sd1, photos, folder, "--batch-size", "1", "--max-steps", "400", "--save-every", "50"),
    ]
    launcher = subprocess.Popen(
        command,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        log = folder / "run" / "loss.csv"
        while time.monotonic() < deadline and len(read_loss_log(log) if log.exists() else []) < 3:
            time.sleep(0.2)
        os.killpg(launcher.pid, signal.SIGINT)
        out, err = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    saved = vectors(folder)
    assert f"stopped at step {saved.step} of 400; saved" in out, err[-3000:]
    assert out.count("stopped at step") == 1  # process 0 alone
    assert [row["step"] for row in read_loss_log(log)] == list(range(1, saved.step + 1))
    again = torchrun(
        cache_dir, *cli_train(tiny_sd1, photos, folder, "--batch-size", "1", "--max-steps", str(saved.step + 2))
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert vectors(folder).step == saved.step + 2
