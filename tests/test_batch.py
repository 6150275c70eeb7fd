"""`tistudio train-many`: a plan of embeddings, run here one after another or as a cluster's array jobs, continued
by running it again; every job checked before any model is loaded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tistudio.cli import main
from tistudio.embeddings.files import read_embedding

PLAN = """
[defaults]
model = "{model}"
size = 64
max_steps = 3
preview_every = 0
batch_size = 2
vectors = 2

[[job]]
embedding = "zalicex"
dataset = "prepared/zalicex"
init_text = "toy"

[[job]]
embedding = "zbobx"
dataset = "prepared/zbobx"
learning_rate = "0.003"
buckets = "on"
"""


def plan_folder(where: Path, model: Path, photos: Path, text: str = PLAN) -> Path:
    for name in ("zalicex", "zbobx"):
        shutil.copytree(photos, where / "prepared" / name)
    (where / "jobs.toml").write_text(text.format(model=model))
    return where / "jobs.toml"


def many(cache: Path, *args: str) -> int:
    return main(["--cache-dir", str(cache), "train-many", *args])


def test_a_plan_trains_every_embedding_and_continues_when_run_again(
    tiny_sd1, photos, tmp_path, cache_dir, capsys
) -> None:
    plan = plan_folder(tmp_path / "studio", tiny_sd1, photos)
    os.chdir(tmp_path)  # somewhere else than the plan: its paths are the plan's folder's
    assert many(cache_dir, str(plan), "--count") == 0 and capsys.readouterr().out.strip() == "2"
    assert many(cache_dir, str(plan)) == 0
    out = capsys.readouterr().out
    assert "zalicex: trained: trained zalicex to step 3" in out and "2 jobs: 2 trained" in out
    studio = plan.parent
    alice, bob = (read_embedding(studio / "embeddings" / f"{n}.safetensors") for n in ("zalicex", "zbobx"))
    assert alice.step == bob.step == 3 and alice.tensor.shape[0] == 2 == bob.tensor.shape[0]
    assert alice.meta["init_text"] == "toy"
    options = json.loads((studio / "runs" / "zbobx" / "options.json").read_text())["options"]
    assert options["learning_rate"] == "0.003" and options["dataset"] == str(studio / "prepared" / "zbobx")
    buckets = {
        n: json.loads((studio / "runs" / n / "options.json").read_text())["resolved"]["buckets"]
        for n in ("zalicex", "zbobx")
    }
    assert buckets == {"zalicex": "off: 6 x 64x64", "zbobx": "on: 6 x 64x64"}  # a job's own choice (issue 32)
    # again: nothing left to train, and no model is loaded for it
    assert many(cache_dir, str(plan)) == 0
    assert "2 jobs: 2 finished" in capsys.readouterr().out
    # the command line's options replace the file's defaults: two more steps each, resumed
    assert many(cache_dir, str(plan), "--max-steps", "5", "--only", "zbobx") == 0
    assert "1 jobs: 1 trained" in capsys.readouterr().out
    assert read_embedding(studio / "embeddings" / "zbobx.safetensors").step == 5
    assert read_embedding(studio / "embeddings" / "zalicex.safetensors").step == 3


def test_array_jobs_train_the_plan_as_one_process_does(tiny_sd1, photos, tmp_path, cache_dir) -> None:
    """A simulated Slurm array: one process per --index, at the same time, against the same plan folder; each
    embedding comes out as the sequential run's."""
    sequential = plan_folder(tmp_path / "sequential", tiny_sd1, photos)
    array = plan_folder(tmp_path / "array", tiny_sd1, photos)
    assert many(cache_dir, str(sequential)) == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    tasks = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tistudio",
                "--cache-dir",
                str(cache_dir),
                "train-many",
                str(array),
                "--index",
                str(index),
            ],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in (0, 1)
    ]
    outputs = [task.communicate(timeout=300) for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], [err[-2000:] for _, err in outputs]
    assert "1 jobs: 1 trained" in outputs[0][0] and "zalicex" in outputs[0][0] and "zbobx" in outputs[1][0]
    for name in ("zalicex", "zbobx"):
        a = read_embedding(sequential.parent / "embeddings" / f"{name}.safetensors")
        b = read_embedding(array.parent / "embeddings" / f"{name}.safetensors")
        assert a.step == b.step == 3 and torch.equal(a.tensor, b.tensor)


def test_a_folder_of_prepared_sets_is_a_plan(tiny_sd1, photos, tmp_path, cache_dir, capsys) -> None:
    for name in ("zcarolx", "zdavex"):
        shutil.copytree(photos, tmp_path / "prepared" / name)
    assert (
        many(
            cache_dir,
            "prepared",
            "--model",
            str(tiny_sd1),
            "--size",
            "64",
            "--max-steps",
            "2",
            "--preview-every",
            "0",
            "--vectors",
            "1",
        )
        == 0
    )
    assert "2 jobs: 2 trained" in capsys.readouterr().out
    for name in ("zcarolx", "zdavex"):
        trained = read_embedding(tmp_path / "embeddings" / f"{name}.safetensors")
        assert trained.step == 2 and trained.tensor.shape[0] == 1
        assert (tmp_path / "runs" / name / "loss.csv").is_file()


def test_a_failing_job_is_reported_and_the_next_one_runs(tiny_sd1, photos, tmp_path, cache_dir, capsys) -> None:
    text = PLAN.replace('embedding = "zalicex"', 'embedding = "alice"')  # a word the model knows: refused
    plan = plan_folder(tmp_path, tiny_sd1, photos, text).parent
    (plan / "prepared" / "zalicex").rename(plan / "prepared" / "alice")
    (plan / "jobs.toml").write_text((plan / "jobs.toml").read_text().replace("prepared/zalicex", "prepared/alice"))
    assert many(cache_dir, str(plan / "jobs.toml")) == 1
    out = capsys.readouterr().out
    assert "alice: failed: name='alice': 'alice' is already a word the model knows" in out
    assert "zbobx: trained" in out and "2 jobs: 1 failed, 1 trained" in out
    assert read_embedding(plan / "embeddings" / "zbobx.safetensors").step == 3


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda t: t + '\n[[job]]\nembedding = "zbobx"\ndataset = "prepared/zbobx"\n',
            "job 3: embedding='zbobx': job 2 trains it too",
        ),
        (
            lambda t: t.replace('learning_rate = "0.003"', 'learning_rate = "fast"'),
            "jobs.toml job 2: learning_rate='fast'",
        ),
        (
            lambda t: t.replace('learning_rate = "0.003"', 'learnig_rate = "0.003"'),
            "jobs.toml job 2: learnig_rate='0.003': unknown option",
        ),
        (lambda t: t.replace('"prepared/zbobx"', '"prepared/nobody"'), "jobs.toml job 2: dataset="),
        (lambda t: t.replace("max_steps = 3", "max_steps = -3"), "jobs.toml job 1: max_steps=-3: must be at least"),
        (lambda t: t.replace("vectors = 2", "vectors = 0"), "jobs.toml job 1: vectors=0: must be at least 1"),
        (lambda t: t.replace("[[job]]", "[[jobs]]", 1), "[jobs]"),
        (lambda t: t.replace("size = 64", "size = "), "is not valid TOML"),
        (lambda t: t[: t.index("[[job]]")], "add at least one [[job]]"),
        (lambda t: t.replace("[defaults]", '[defaults]\nrun_dir = "one-run"'), "job 2: run_dir="),
    ],
)
def test_bad_plans_are_refused_before_any_model_is_loaded(
    tiny_sd1, photos, tmp_path, cache_dir, capsys, monkeypatch, change, message
) -> None:
    import tistudio.models.loading

    monkeypatch.setattr(tistudio.models.loading, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    plan = plan_folder(tmp_path, tiny_sd1, photos, change(PLAN))
    assert many(cache_dir, str(plan)) == 2
    err = capsys.readouterr().err
    assert err.startswith("tistudio: error: ") and message in err and err.count("\n") == 1, err
    assert many(cache_dir, str(plan.with_name("missing.toml"))) == 2
    assert "cannot be read" in capsys.readouterr().err


def test_an_array_index_outside_the_plan_says_the_range(tiny_sd1, photos, tmp_path, cache_dir, capsys) -> None:
    plan = plan_folder(tmp_path, tiny_sd1, photos)
    assert many(cache_dir, str(plan), "--index", "2") == 2
    assert "index=2: the plan has 2 jobs: use 0 to 1" in capsys.readouterr().err
    assert many(cache_dir, str(plan), "--only", "zevex") == 2
    assert "only='zevex': no job trains it" in capsys.readouterr().err
