"""Untrusted files: a corpus of hostile and broken files, built here, is refused with a clear error and nothing in
them runs; property-based fuzzing of every reader finds only results or our own errors."""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
import struct
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from tistudio.config import ModelOptions
from tistudio.embeddings.files import Embedding, read_embedding, write_embedding
from tistudio.errors import EmbeddingError, ModelError, OptionError
from tistudio.models.loading import load_model
from tistudio.templates import fill_template, load_template

SCALE = int(os.environ.get("TISTUDIO_FUZZ_SCALE", "1"))


class Call:
    """Pickles as a call of `function(*args)`: what an attacker puts in a .pt file."""

    def __init__(self, function, *args) -> None:
        self.function, self.args = function, args

    def __reduce__(self):
        return (self.function, self.args)


def torch_file(payload) -> bytes:
    buffer = io.BytesIO()
    torch.save({"string_to_param": {"*": torch.zeros(1, 8)}, "name": "x", "payload": payload}, buffer)
    return buffer.getvalue()


def with_pickle(raw_pickle: bytes) -> bytes:
    """A well-formed PyTorch archive whose data.pkl is the given (hand-written) pickle."""
    plain = torch_file(None)
    archive = zipfile.ZipFile(io.BytesIO(plain))
    members = {name: archive.read(name) for name in archive.namelist()}
    members[next(n for n in members if n.endswith("data.pkl"))] = raw_pickle
    return zip_file(members)


# Hand-written pickles: GLOBAL evil_sentinel.boom (importing the module runs its code), then boom(1).
IMPORT_SENTINEL = b"\x80\x02cevil_sentinel\nboom\nq\x00."
CALL_SENTINEL = b"\x80\x02cevil_sentinel\nboom\nK\x01\x85R."


def zip_file(members: dict[str, bytes], compress: bool = False) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def safetensors_bytes(header: dict, data: bytes = b"", length: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


@pytest.fixture
def sentinel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A module whose import, or whose function, would create a marker file."""
    marker = tmp_path / "ran"
    (tmp_path / "evil_sentinel.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('import')\n"
        f"def boom(*a):\n    pathlib.Path({str(marker)!r}).write_text('call')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return marker


def hostile_corpus(marker: Path) -> dict[str, bytes]:
    command = f"touch {marker}"
    plain = torch_file(None)
    members = {
        name: zipfile.ZipFile(io.BytesIO(plain)).read(name) for name in zipfile.ZipFile(io.BytesIO(plain)).namelist()
    }
    pickle_name = next(n for n in members if n.endswith("data.pkl"))
    corpus = {
        "os-system.pt": torch_file(Call(os.system, command)),
        "subprocess.bin": torch_file(Call(__import__("subprocess").call, ["touch", str(marker)])),
        "exec.pt": torch_file(Call(exec, f"open({str(marker)!r}, 'w')")),
        "eval.ckpt": torch_file(Call(eval, f"open({str(marker)!r}, 'w')")),
        "import-module.pt": with_pickle(IMPORT_SENTINEL),
        "call-module.pt": with_pickle(CALL_SENTINEL),
        "call-module-raw.bin": CALL_SENTINEL,
        "raw-pickle.pt": pickle.dumps(Call(os.system, command), protocol=2),
        "legacy-format.pt": pickle.dumps({"string_to_param": Call(os.system, command)}, protocol=2),
        "pickle-as-safetensors.safetensors": torch_file(Call(os.system, command)),
        "two-pickles.pt": zip_file({**members, "archive/other/data.pkl": members[pickle_name]}),
        "extra-member.pt": zip_file({**members, "archive/evil.py": b"import os"}),
        "zip-bomb.pt": zip_file(
            {
                **{k: v for k, v in members.items() if k != pickle_name},
                pickle_name: members[pickle_name] + b"\0" * 5_000_000,
            },
            compress=True,
        ),
        "truncated-torch.pt": plain[: len(plain) // 2],
        "text-as-pt.pt": b"this is not a tensor file",
        "png-as-safetensors.safetensors": b"\x89PNG\r\n\x1a\n" + b"\0" * 40,
        "random-bytes.bin": os.urandom(2048),
        "empty.safetensors": b"",
        "huge-header-length.safetensors": struct.pack("<Q", 2**60) + b"{}",
        "header-longer-than-file.safetensors": safetensors_bytes({"a": 1}, length=50_000_000),
        "header-not-json.safetensors": struct.pack("<Q", 10) + b"{not json}",
        "too-many-tensors.safetensors": safetensors_bytes(
            {f"t{i}": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]} for i in range(100_000)}, b"\0" * 4
        ),
        "absurd-shape.safetensors": safetensors_bytes(
            {"emb_params": {"dtype": "F32", "shape": [10**9, 10**9], "data_offsets": [0, 16]}}, b"\0" * 16
        ),
        "negative-shape.safetensors": safetensors_bytes(
            {"emb_params": {"dtype": "F32", "shape": [-1, 4], "data_offsets": [0, 16]}}, b"\0" * 16
        ),
        "unknown-dtype.safetensors": safetensors_bytes(
            {"emb_params": {"dtype": "X99", "shape": [1, 4], "data_offsets": [0, 16]}}, b"\0" * 16
        ),
        "offsets-outside.safetensors": safetensors_bytes(
            {"emb_params": {"dtype": "F32", "shape": [1, 4], "data_offsets": [0, 1600]}}, b"\0" * 16
        ),
        "integer-vectors.safetensors": _safetensors({"emb_params": torch.ones(2, 8, dtype=torch.int32)}),
        "three-d.safetensors": _safetensors({"emb_params": torch.ones(2, 2, 8)}),
        "too-many-vectors.safetensors": _safetensors({"emb_params": torch.ones(500, 8)}),
        "too-wide.safetensors": _safetensors({"emb_params": torch.ones(1, 100_000)}),
        "nan-vectors.safetensors": _safetensors({"emb_params": torch.full((2, 8), float("nan"))}),
        "two-terms.pt": _torch({"string_to_param": {"*": torch.ones(1, 8), "+": torch.ones(1, 8)}}),
        "not-an-embedding.safetensors": _safetensors({"a": torch.ones(2), "b": torch.ones(2)}),
        "list-not-dict.pt": _torch([torch.ones(1, 8)]),
        "400-digit-vector.png": png_embedding('{"string_to_param": {"*": {"TORCHTENSOR": [[' + "9" * 400 + "]]}}}"),
        "5000-digit-vector.png": png_embedding('{"string_to_param": {"*": {"TORCHTENSOR": [[' + "9" * 5000 + "]]}}}"),
        "deep-png.png": png_embedding('{"a": ' + "[" * 200_000 + "]" * 200_000 + "}"),
        "pixel-zlib-bomb.png": png_pixels(b"\0" * 70_000_000),
        "pixel-deep-json.png": png_pixels(b"[" * 200_000 + b"]" * 200_000),
        "pixel-truncated.png": png_pixels(b'{"string_to_param": {"*": 1}}' * 200)[:-300],
        "deep-header.safetensors": struct.pack("<Q", 400_002) + b"[" * 200_001 + b"]" * 200_001,
        "deep-metadata.safetensors": raw_safetensors(
            b'{"__metadata__": {"step": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}"
        ),
    }
    return corpus


def png_embedding(text: str) -> bytes:
    """A PNG carrying `text` as A1111's embedding chunk (base64 JSON)."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("sd-ti-embedding", base64.b64encode(text.encode()).decode())
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG", pnginfo=info)
    return buffer.getvalue()


def png_pixels(payload: bytes) -> bytes:
    """A PNG without text chunks carrying `payload` in A1111's pixel strips."""
    from PIL import Image

    from tistudio.embeddings.pngdata import hide

    buffer = io.BytesIO()
    hide(Image.new("RGB", (16, 64), (90, 90, 90)), payload).save(buffer, "PNG")
    return buffer.getvalue()


def raw_safetensors(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


def _safetensors(tensors: dict) -> bytes:
    from safetensors.torch import save

    return save(tensors)


def _torch(data) -> bytes:
    buffer = io.BytesIO()
    torch.save(data, buffer)
    return buffer.getvalue()


def test_hostile_embedding_files_are_refused_and_nothing_runs(tmp_path, sentinel) -> None:
    corpus = hostile_corpus(sentinel)
    folder = tmp_path / "corpus"
    folder.mkdir()
    refused = {}
    for name, data in corpus.items():
        (folder / name).write_bytes(data)
        with pytest.raises(EmbeddingError) as error:
            read_embedding(folder / name)
        refused[name] = str(error.value)
        assert str(folder / name) in refused[name] and len(refused[name]) < 600
    assert not sentinel.exists(), "a payload ran"
    assert "evil_sentinel" not in sys.modules
    print(f"hostile files refused: {len(refused)} of {len(corpus)}")
    assert "refused" in refused["os-system.pt"] and "zip bomb" in refused["zip-bomb.pt"]
    assert "exactly one data.pkl" in refused["two-pickles.pt"]


@pytest.mark.parametrize("value", ["abc", "1.5", "-3", "9" * 5000, "\u00b2", " ", "1e400", "NaN"])
def test_nonsense_step_numbers_in_a_files_metadata_are_no_steps(value, tmp_path, tiny_sd1, cache_dir) -> None:
    """step, last_step and best_step as text of any kind: the file reads as step 0 with no last or best step; the
    CLI inspects it, and the server lists it (beside a hostile PNG, which the list names as unreadable)."""
    from test_server import client_for
    from tistudio.cli import main

    folder = tmp_path / "ws" / "embeddings"
    folder.mkdir(parents=True)
    path = folder / "odd.safetensors"
    save_file({"emb_params": torch.ones(2, 32)}, path, metadata={"step": value, "last_step": value, "best_step": value})
    embedding = read_embedding(path)
    assert embedding.step == 0 and embedding.meta_count("last_step") is None
    assert embedding.meta_count("best_step") is None
    assert main(["inspect", str(path)]) == 0
    (folder / "bad.png").write_bytes(hostile_corpus(tmp_path / "never")["400-digit-vector.png"])
    with client_for(tmp_path / "ws", tiny_sd1, cache_dir) as client:
        listed = {item["name"]: item for item in client.get("/api/embeddings").json()}
        a1111 = client.get("/sdapi/v1/embeddings")
    assert listed["odd"].get("error") is None and listed["odd"]["step"] == 0
    assert "malformed" in listed["bad"]["error"]
    assert a1111.status_code == 200 and "odd" in json.dumps(a1111.json())


def test_hostile_checkpoints_are_refused_and_nothing_runs(tmp_path, sentinel, cache_dir) -> None:
    for name in ("evil.ckpt", "evil.safetensors"):
        path = tmp_path / name
        path.write_bytes(with_pickle(CALL_SENTINEL))
        with pytest.raises(ModelError, match="refused"):
            load_model(ModelOptions(model=str(path)), cache_dir)
    assert not sentinel.exists() and "evil_sentinel" not in sys.modules


def read_bytes(tmp_path_factory, data: bytes, name: str = "f.safetensors") -> None:
    path = tmp_path_factory.mktemp("fuzz") / name
    path.write_bytes(data)
    try:
        embedding = read_embedding(path)
    except EmbeddingError:
        return
    assert torch.isfinite(next(iter(embedding.vectors.values()))).all()


def fuzz(examples: int) -> settings:
    """A few hundred examples per reader in the suite; TISTUDIO_FUZZ_SCALE=20 for a longer job."""
    return settings(
        max_examples=examples * SCALE,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


@fuzz(400)
@given(st.binary(max_size=4096), st.sampled_from(["x.safetensors", "x.pt", "x.bin", "x.png", "x.ckpt"]))
def test_fuzz_readers_with_arbitrary_bytes(tmp_path_factory, data, name) -> None:
    read_bytes(tmp_path_factory, data, name)


shapes = st.lists(st.one_of(st.integers(-3, 5000), st.just(2**40), st.text(max_size=2)), max_size=4)
entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I32", "U8", "BOOL", "F64", "X", ""]),
        "shape": shapes,
        "data_offsets": st.lists(st.integers(-5, 5000), min_size=0, max_size=3),
    }
)


@fuzz(500)
@given(
    st.dictionaries(
        st.sampled_from(["emb_params", "clip_l", "clip_g", "tok", "__metadata__", "string_to_param"]),
        entries,
        max_size=3,
    ),
    st.binary(max_size=512),
)
def test_fuzz_safetensors_headers(tmp_path_factory, header, data) -> None:
    read_bytes(tmp_path_factory, safetensors_bytes(header, data))


values = st.recursive(
    st.one_of(
        st.none(),
        st.integers(),
        st.floats(),
        st.text(max_size=8),
        st.builds(lambda n, w: torch.randn(n, w), st.integers(0, 3), st.integers(0, 6)),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(
            st.sampled_from(["string_to_param", "*", "name", "step", "emb_params", "clip_l", "clip_g", "x"]),
            children,
            max_size=3,
        ),
    ),
    max_leaves=8,
)


@fuzz(300)
@given(values)
def test_fuzz_pickled_structures(tmp_path_factory, value) -> None:
    read_bytes(tmp_path_factory, _torch(value), "x.pt")


@fuzz(400)
@given(
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
    st.sampled_from(["safetensors", "pt", "a1111"]),
)
def test_fuzz_mutated_valid_files(tmp_path_factory, flips, kind) -> None:
    embedding = Embedding(name="m", vectors={"clip": torch.randn(2, 16)}, step=3)
    folder = tmp_path_factory.mktemp("valid")
    if kind == "safetensors":
        data = bytearray(write_embedding(embedding, folder / "m.safetensors").read_bytes())
    else:
        data = bytearray(_torch({"string_to_param": {"*": embedding.tensor}, "name": "m", "step": 3}))
    for position, value in flips:
        data[position % len(data)] = value
    read_bytes(tmp_path_factory, bytes(data), f"m.{'pt' if kind != 'safetensors' else 'safetensors'}")


@fuzz(300)
@given(
    st.text(max_size=80),
    st.text(max_size=20),
    st.text(max_size=80),
    st.floats(0, 1),
    st.booleans(),
    st.integers(0, 2**32),
)
def test_fuzz_template_filling(line, name, caption, dropout, shuffle, seed) -> None:
    import random

    text = fill_template(line, name, caption, random.Random(seed), shuffle_tags=shuffle, tag_dropout=dropout)
    assert isinstance(text, str)


@fuzz(200)
@given(st.binary(max_size=2048))
def test_fuzz_template_files(tmp_path_factory, data) -> None:
    path = tmp_path_factory.mktemp("templates") / "t.txt"
    path.write_bytes(data)
    try:
        lines = load_template(str(path))
    except OptionError:
        return
    assert lines and any("[name]" in line for line in lines)


def test_size_limit_refuses_huge_embedding_files(tmp_path) -> None:
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as handle:
        handle.truncate(65 * 1024 * 1024)
    with pytest.raises(EmbeddingError, match="larger than an embedding file can be"):
        read_embedding(path)
    save_file({"emb_params": torch.ones(1, 8)}, tmp_path / "ok.safetensors")
    assert read_embedding(tmp_path / "ok.safetensors").count == 1
