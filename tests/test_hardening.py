"""Hardening, round three: what a red-team pass found - echoed values, decompression bombs, bad base64, 500s on odd
numbers and bytes, hostile plans, planted symlinks, stale temporaries, a quota jobs did not respect - each
refused or bounded with one clear line."""

from __future__ import annotations

import time

import pytest

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
