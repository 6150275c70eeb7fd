"""Embedding files: what we write loads in diffusers and A1111's layout; what others write loads in ours;
hostile or broken files are refused without running anything."""

from __future__ import annotations

import base64
import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import save_file

from a1111_rules import a1111_check_pt
from tistudio.embeddings.files import (
    Embedding,
    describe,
    read_embedding,
    write_a1111_pt,
    write_diffusers,
    write_embedding,
)
from tistudio.errors import EmbeddingError


def vectors(count: int = 3, width: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn((count, width), generator=torch.Generator().manual_seed(seed))


def test_roundtrip_keeps_vectors_and_metadata(tmp_path: Path) -> None:
    original = Embedding(
        name="tomtut",
        vectors={"clip": vectors()},
        step=1200,
        model_hash="0123456789",
        model_name="v1-5",
        meta={"init_text": "woman"},
    )
    path = write_embedding(original, tmp_path / "tomtut.safetensors")
    loaded = read_embedding(path)
    assert torch.equal(loaded.tensor, original.tensor)
    assert (loaded.name, loaded.step, loaded.model_hash, loaded.model_name) == ("tomtut", 1200, "0123456789", "v1-5")
    assert loaded.meta["init_text"] == "woman"
    # The layout A1111, ComfyUI and kohya read: one tensor named emb_params.
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        assert list(handle.keys()) == ["emb_params"]
        assert handle.metadata()["step"] == "1200"


def test_the_same_content_gives_the_same_file_which_the_safetensors_library_reads(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    from tistudio.storage import write_safetensors

    tensors = {
        "b": vectors(2, 5),
        "a": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "s": torch.tensor(3.5),
        "h": vectors(1, 3).to(torch.bfloat16),
    }
    meta = {"name": "tomtut", "step": "12", "init_text": 'Été, "toy"\n'}
    first = write_safetensors(tmp_path / "one.safetensors", tensors, meta)
    shuffled = write_safetensors(
        tmp_path / "two.safetensors", dict(reversed(tensors.items())), dict(reversed(meta.items()))
    )
    assert first.read_bytes() == shuffled.read_bytes()  # so the A1111 TI hash of an embedding is its content's
    loaded = load_file(first)
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], v) for k, v in tensors.items())
    with safe_open(str(first), "pt") as handle:
        assert handle.metadata() == meta
    # Two writes of one embedding are one file.
    embedding = Embedding(name="tomtut", vectors={"clip": vectors()}, step=3, meta={"init_text": "toy", "z": "1"})
    one = write_embedding(embedding, tmp_path / "x" / "tomtut.safetensors").read_bytes()
    again = Embedding(name="tomtut", vectors={"clip": vectors()}, step=3, meta={"z": "1", "init_text": "toy"})
    assert write_embedding(again, tmp_path / "y" / "tomtut.safetensors").read_bytes() == one


def test_our_file_loads_in_diffusers_with_the_same_rows(tiny_sd1: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    rows = vectors(3)
    path = write_embedding(Embedding(name="tomtut", vectors={"clip": rows}), tmp_path / "tomtut.safetensors")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1, local_files_only=True, safety_checker=None)
    pipe.load_textual_inversion(str(path), token="tomtut")
    ids = pipe.tokenizer.convert_tokens_to_ids(["tomtut", "tomtut_1", "tomtut_2"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids].detach(), rows)
    assert pipe.maybe_convert_prompt("a tomtut", pipe.tokenizer) == "a tomtut tomtut_1 tomtut_2"

    converted = write_diffusers(read_embedding(path), tmp_path / "diffusers" / "tomtut.safetensors")
    other = StableDiffusionPipeline.from_pretrained(tiny_sd1, local_files_only=True, safety_checker=None)
    other.load_textual_inversion(str(converted))  # no token= needed for diffusers' own layout
    ids = other.tokenizer.convert_tokens_to_ids(["tomtut", "tomtut_1", "tomtut_2"])
    assert torch.equal(other.text_encoder.get_input_embeddings().weight[ids].detach(), rows)


def test_a1111_pt_built_like_a1111_loads(tmp_path: Path) -> None:
    rows = vectors(2)
    data = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": rows.clone().requires_grad_(True)},
        "name": "myface",
        "step": 500,
        "sd_checkpoint": "abcdef0123",
        "sd_checkpoint_name": "v1-5-pruned",
    }
    torch.save(data, tmp_path / "myface.pt")
    loaded = read_embedding(tmp_path / "myface.pt")
    assert torch.equal(loaded.tensor, rows)
    assert (loaded.name, loaded.step, loaded.model_hash, loaded.model_name) == (
        "myface",
        500,
        "abcdef0123",
        "v1-5-pruned",
    )
    assert loaded.source_format.startswith("a1111")


def test_old_a1111_pt_with_a_parameter_dict_loads(tmp_path: Path) -> None:
    rows = vectors(2)
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(rows.clone())})
    torch.save(
        {"string_to_token": {"*": 265}, "string_to_param": params, "name": "old", "step": 7}, tmp_path / "old.pt"
    )
    loaded = read_embedding(tmp_path / "old.pt")
    assert torch.equal(loaded.tensor, rows) and loaded.step == 7


def test_shared_files_are_readable_by_other_users_as_the_umask_allows(tmp_path: Path) -> None:
    # a web UI running as another user (or in a container) must be able to read what tistudio writes
    old = os.umask(0o022)
    try:
        embedding = Embedding(name="tomtut", vectors={"clip": vectors(1)})
        for path in (
            write_embedding(embedding, tmp_path / "a.safetensors"),
            write_a1111_pt(embedding, tmp_path / "a.pt"),
            write_diffusers(embedding, tmp_path / "d.bin"),
        ):
            assert path.stat().st_mode & 0o777 == 0o644, path
    finally:
        os.umask(old)


def test_a1111s_restricted_loader_accepts_our_pt(tmp_path: Path) -> None:
    path = write_a1111_pt(
        Embedding(name="tomtut", vectors={"clip": vectors(3)}, step=42, model_hash="0123456789"), tmp_path / "tomtut.pt"
    )
    a1111_check_pt(path)
    data = torch.load(path, weights_only=True)  # A1111 then loads it with torch.load
    assert data["name"] == "tomtut" and data["step"] == 42 and data["sd_checkpoint"] == "0123456789"
    # the oracle is strict: a file torch writes by default today is refused, as A1111 refuses it
    torch.save(data, tmp_path / "zipped.pt")
    with pytest.raises(AssertionError, match="bad file inside"):
        a1111_check_pt(tmp_path / "zipped.pt")


def test_convert_to_a1111_pt_writes_the_six_plain_keys(tmp_path: Path) -> None:
    embedding = Embedding(name="tomtut", vectors={"clip": vectors()}, step=42, model_hash="0123456789")
    path = write_a1111_pt(embedding, tmp_path / "tomtut.pt")
    data = torch.load(path, weights_only=True)  # A1111's safe unpickler accepts only plain data too
    assert set(data) == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}
    assert data["string_to_token"] == {"*": 265} and data["step"] == 42
    assert not data["string_to_param"]["*"].requires_grad
    assert torch.equal(read_embedding(path).tensor, embedding.tensor)


def test_an_embedding_saved_as_a_png_loads_in_a1111_exactly(tmp_path: Path) -> None:
    from a1111_rules import a1111_load_png_embedding
    from tistudio.embeddings.files import write_png_embedding

    sd1 = Embedding(name="tomtut", vectors={"clip": vectors(3)}, step=42, model_hash="0123456789")
    name, loaded, step = a1111_load_png_embedding(write_png_embedding(sd1, tmp_path / "tomtut.png"))
    assert (name, step) == ("tomtut", 42) and torch.equal(loaded, sd1.tensor)
    with Image.open(tmp_path / "tomtut.png") as picture:
        assert picture.height == 512 and 514 < picture.width < 600  # a card, as no preview was given, and the
        # strips that carry the same data in pixels (3 columns each for 3 vectors of 64)
    sdxl = Embedding(name="cat", vectors={"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}, step=9)
    name, loaded, step = a1111_load_png_embedding(write_png_embedding(sdxl, tmp_path / "cat.png"))
    assert name == "cat" and step is None  # A1111's SDXL dict holds the two tensors and nothing else
    assert all(torch.equal(loaded[key], sdxl.vectors[key]) for key in ("clip_l", "clip_g"))
    again = read_embedding(tmp_path / "tomtut.png")  # and tistudio reads its own
    assert again.step == 42 and torch.equal(again.tensor, sd1.tensor)


def test_every_file_tistudio_writes_loads_in_comfyui_as_its_loader_reads_it(tmp_path: Path) -> None:
    from a1111_rules import comfyui_load_embed

    sd1 = Embedding(name="tomtut", vectors={"clip": vectors(3)}, step=42)
    write_embedding(sd1, tmp_path / "own" / "tomtut.safetensors")
    write_a1111_pt(sd1, tmp_path / "pt" / "tomtut.pt")
    write_diffusers(sd1, tmp_path / "diffusers" / "tomtut.safetensors")
    for folder in ("own", "pt", "diffusers"):  # SD1's tokenizer asks for clip_l, which only SDXL files have
        assert torch.equal(comfyui_load_embed(tmp_path / folder, "tomtut", sd1.width, "clip_l"), sd1.tensor), folder
    sdxl = Embedding(name="cat", vectors={"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)})
    write_embedding(sdxl, tmp_path / "xl" / "cat.safetensors")
    assert torch.equal(comfyui_load_embed(tmp_path / "xl", "cat", 768, "clip_l"), sdxl.vectors["clip_l"])
    assert torch.equal(comfyui_load_embed(tmp_path / "xl", "cat", 1280, "clip_g"), sdxl.vectors["clip_g"])


def _tokenizers_and_widths(model: Path, parts: tuple[tuple[str, str], ...]) -> tuple[list, list[int]]:
    from transformers import CLIPTokenizer

    tokenizers = [CLIPTokenizer.from_pretrained(model / tokenizer) for tokenizer, _ in parts]
    widths = [json.loads((model / encoder / "config.json").read_text())["hidden_size"] for _, encoder in parts]
    return tokenizers, widths


def test_every_sd1_file_tistudio_writes_loads_in_kohya_and_the_onetrainer_file_in_onetrainer(
    tiny_sd1: Path, tmp_path: Path
) -> None:
    from a1111_rules import kohya_gen_img_embeddings, kohya_load_weights, onetrainer_load_embedding
    from tistudio.embeddings.files import ONETRAINER_KEY

    parts = (("tokenizer", "text_encoder"),)
    width = _tokenizers_and_widths(tiny_sd1, parts)[1][0]
    sd1 = Embedding(name="tomtut", vectors={"clip": vectors(3, width)}, step=42)
    files = {
        "own": write_embedding(sd1, tmp_path / "own" / "tomtut.safetensors"),
        "pt": write_a1111_pt(sd1, tmp_path / "pt" / "tomtut.pt"),
        "diffusers": write_diffusers(sd1, tmp_path / "diffusers" / "tomtut.safetensors"),
        "onetrainer": write_embedding(sd1, tmp_path / "ot" / "tomtut.safetensors", single_key=ONETRAINER_KEY),
    }
    for kind, path in files.items():  # a fresh tokenizer each time: kohya adds tomtut, tomtut1, tomtut2 to it
        tokenizers, widths = _tokenizers_and_widths(tiny_sd1, parts)
        assert torch.equal(kohya_gen_img_embeddings(path, tokenizers, widths)[0], sd1.tensor), kind
        assert torch.equal(kohya_load_weights(path, sdxl=False)[0], sd1.tensor), kind
    assert torch.equal(onetrainer_load_embedding(files["onetrainer"], sdxl=False)[0], sd1.tensor)
    # OneTrainer reads only its own key: the emb_params file A1111, ComfyUI and kohya read is not one for it
    with pytest.raises(AssertionError, match="no emp_params"):
        onetrainer_load_embedding(files["own"], sdxl=False)
    assert read_embedding(files["onetrainer"]).step == 42  # and tistudio reads it back whole
    # A word the tokenizer already holds cannot be a kohya embedding's name: the oracle refuses it as kohya does
    tokenizers, widths = _tokenizers_and_widths(tiny_sd1, parts)
    tokenizers[0].add_tokens(["tomtut"])
    with pytest.raises(AssertionError, match="same word"):
        kohya_gen_img_embeddings(files["own"], tokenizers, widths)


def test_tistudios_sdxl_file_loads_in_kohya_and_onetrainer(tiny_sdxl: Path, tmp_path: Path) -> None:
    from a1111_rules import kohya_gen_img_embeddings, kohya_load_weights, onetrainer_load_embedding

    parts = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
    tokenizers, widths = _tokenizers_and_widths(tiny_sdxl, parts)
    sdxl = Embedding(name="tomtut", vectors={"clip_l": vectors(2, widths[0]), "clip_g": vectors(2, widths[1], seed=1)})
    path = write_embedding(sdxl, tmp_path / "tomtut.safetensors")  # not "cat": kohya needs a word new to CLIP
    expected = [sdxl.vectors["clip_l"], sdxl.vectors["clip_g"]]
    for loaded in (
        kohya_gen_img_embeddings(path, tokenizers, widths),
        kohya_load_weights(path, sdxl=True),
        onetrainer_load_embedding(path, sdxl=True),
    ):
        assert all(torch.equal(a, b) for a, b in zip(loaded, expected, strict=True))


def test_a_png_embedding_also_loads_from_its_pixels_once_a_site_strips_its_text(tmp_path: Path) -> None:
    from a1111_rules import a1111_load_png_embedding
    from tistudio.embeddings.files import write_png_embedding

    picture = Image.new("RGB", (64, 48), (0, 0, 0))  # black edges: the strips must stay apart from the picture
    picture.paste((250, 120, 16), (16, 8, 48, 40))
    for embedding in (
        Embedding(name="tomtut", vectors={"clip": vectors(4, 768)}, step=7),
        Embedding(name="cat", vectors={"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}),
    ):
        path = write_png_embedding(embedding, tmp_path / f"{embedding.name}.png", image=picture)
        stripped = tmp_path / "stripped" / f"{embedding.name}.png"
        stripped.parent.mkdir(exist_ok=True)
        with Image.open(path) as image:
            assert image.height == 48 and image.width > 64 + 2
            image.convert("RGB").save(stripped)  # re-saved without its text chunks, as sites do
        with Image.open(stripped) as image:
            assert "sd-ti-embedding" not in image.text
        name, loaded, step = a1111_load_png_embedding(stripped)
        assert name == embedding.name
        if embedding.is_sdxl:
            assert all(torch.equal(loaded[key], embedding.vectors[key]) for key in ("clip_l", "clip_g"))
        else:
            assert step == 7 and torch.equal(loaded.to(torch.float32), embedding.tensor)
        again = read_embedding(stripped)  # tistudio reads the pixels too
        assert all(torch.equal(again.vectors[key], embedding.vectors[key]) for key in embedding.vectors)
    plain = tmp_path / "plain.png"
    picture.save(plain)
    with pytest.raises(EmbeddingError, match="no embedding in it"):
        read_embedding(plain)


@pytest.mark.parametrize("layout", ["diffusers-bin", "diffusers-safetensors", "kohya", "onetrainer", "1d"])
def test_other_tools_layouts_load(tmp_path: Path, layout: str) -> None:
    rows = vectors(2)
    if layout == "diffusers-bin":
        path = tmp_path / "learned_embeds.bin"
        torch.save({"<cat-toy>": rows}, path)
    elif layout == "diffusers-safetensors":
        path = tmp_path / "learned_embeds.safetensors"
        save_file({"<cat-toy>": rows}, path, metadata={"format": "pt"})
    elif layout == "kohya":
        path = tmp_path / "k.safetensors"
        save_file({"emb_params": rows}, path)
    elif layout == "onetrainer":
        path = tmp_path / "o.safetensors"
        save_file({"emp_params": rows}, path)
    else:
        rows = rows[:1]
        path = tmp_path / "single.bin"
        torch.save({"<x>": rows[0]}, path)
    loaded = read_embedding(path)
    assert torch.equal(loaded.tensor, rows)
    assert loaded.name == path.stem  # A1111: the file stem is the prompt word


def test_sdxl_files_are_listed_and_inspected(tmp_path: Path) -> None:
    path = tmp_path / "xl.safetensors"
    save_file({"clip_l": vectors(2, 768), "clip_g": vectors(2, 1280)}, path)
    loaded = read_embedding(path)
    assert loaded.is_sdxl and loaded.count == 2 and loaded.width == 2048
    info = describe(loaded, path)
    assert "SDXL" in info["fits"]
    with pytest.raises(EmbeddingError, match="SDXL"):
        _ = loaded.tensor


def test_a1111_embedding_in_a_png_text_chunk_loads(tmp_path: Path) -> None:
    rows = vectors(2, 8)
    data = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": {"TORCHTENSOR": rows.tolist()}},
        "name": "pngemb",
        "step": 9,
    }
    info = PngInfo()
    info.add_text("sd-ti-embedding", base64.b64encode(json.dumps(data).encode()).decode())
    path = tmp_path / "pngemb.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    loaded = read_embedding(path)
    assert torch.allclose(loaded.tensor, rows) and loaded.step == 9


@pytest.mark.parametrize("chunk", ["tEXt", "zTXt", "iTXt", "iTXt-zip"])
def test_a_png_embedding_is_read_from_its_chunk_without_decoding_the_picture(chunk, tmp_path, monkeypatch) -> None:
    """Any of PNG's three text chunks, after a large picture's data, read without PIL decoding the pixels (a
    13000x13000 PNG of 646 KB took 805 MB and seconds of the server's event loop to read that way)."""
    import zlib

    import PIL.Image

    rows = vectors(2, 8)
    text = base64.b64encode(json.dumps({"string_to_param": {"*": {"TORCHTENSOR": rows.tolist()}}, "step": 3}).encode())
    key = b"sd-ti-embedding"
    body = {
        "tEXt": key + b"\0" + text,
        "zTXt": key + b"\0\0" + zlib.compress(text),
        "iTXt": key + b"\0\0\0\0\0" + text,
        "iTXt-zip": key + b"\0\1\0\0\0" + zlib.compress(text),
    }[chunk]

    def png_chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    side = 13000
    pixels = zlib.compress(b"\0" * ((side + 1) * side), 9)  # filter byte + one grey byte per pixel
    path = tmp_path / "huge.png"
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0]))
        + png_chunk(b"IDAT", pixels)
        + png_chunk(chunk[:4].encode(), body)
        + png_chunk(b"IEND", b"")
    )
    monkeypatch.setattr(PIL.Image, "open", lambda *a, **k: pytest.fail("the picture was opened"))
    loaded = read_embedding(path)
    assert torch.allclose(loaded.tensor, rows) and loaded.step == 3


def test_describe_names_the_family() -> None:
    assert "SD 1.x" in Embedding(name="a", vectors={"clip": vectors(1, 768)}).fits()
    assert "SD 2.x" in Embedding(name="a", vectors={"clip": vectors(1, 1024)}).fits()


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class ImportsModule:
    def __reduce__(self):
        return (__import__, ("this",))


def hostile(tmp_path: Path, payload: object, name: str) -> Path:
    path = tmp_path / name
    torch.save({"string_to_param": {"*": torch.zeros(1, 8)}, "name": "x", "payload": payload}, path)
    return path


def test_pickle_that_would_run_a_command_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = RunsCode()
    payload.marker = marker
    for name in ("evil.pt", "evil.bin", "evil.safetensors", "evil.ckpt"):
        path = hostile(tmp_path, payload, name)
        with pytest.raises(EmbeddingError, match="refused"):
            read_embedding(path)
    assert not marker.exists()


def test_pickle_that_would_import_a_module_is_refused(tmp_path: Path) -> None:
    with pytest.raises(EmbeddingError, match="refused"):
        read_embedding(hostile(tmp_path, ImportsModule(), "imports.pt"))


def test_raw_pickle_without_torch_zip_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = RunsCode()
    payload.marker = marker
    path = tmp_path / "raw.pt"
    path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(EmbeddingError):
        read_embedding(path)
    assert not marker.exists()


def test_wrong_content_behind_a_known_extension_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "fake.safetensors"
    path.write_text("this is a text file, not tensors")
    with pytest.raises(EmbeddingError, match="not an embedding file"):
        read_embedding(path)


def test_truncated_and_lying_safetensors_are_refused(tmp_path: Path) -> None:
    good = write_embedding(Embedding(name="t", vectors={"clip": vectors()}), tmp_path / "t.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(EmbeddingError, match=r"outside the file|truncated"):
        read_embedding(truncated)
    header = json.dumps({"emb_params": {"dtype": "F32", "shape": [10**9, 10**9], "data_offsets": [0, 16]}}).encode()
    absurd = tmp_path / "absurd.safetensors"
    absurd.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(EmbeddingError):
        read_embedding(absurd)


def test_empty_file_and_nan_vectors_are_refused(tmp_path: Path) -> None:
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(EmbeddingError, match="empty"):
        read_embedding(tmp_path / "empty.pt")
    save_file({"emb_params": torch.tensor([[float("nan"), 1.0]])}, tmp_path / "nan.safetensors")
    with pytest.raises(EmbeddingError, match="NaN"):
        read_embedding(tmp_path / "nan.safetensors")
    with pytest.raises(EmbeddingError, match="NaN"):
        write_embedding(
            Embedding(name="n", vectors={"clip": torch.tensor([[float("inf")]])}), tmp_path / "n.safetensors"
        )
    assert not (tmp_path / "n.safetensors").exists()


def test_convert_never_replaces_an_earlier_conversion_silently(tmp_path: Path, capsys) -> None:
    """diffusers and OneTrainer files share the name NAME.safetensors: a second conversion into the same folder is
    refused naming the file, unless --overwrite. (Issue 33.)"""
    from tistudio.cli import main

    source = write_embedding(
        Embedding(name="tomtut", vectors={"clip": torch.randn(2, 64)}), tmp_path / "src" / "tomtut.safetensors"
    )
    out = str(tmp_path / "out")
    assert main(["convert", str(source), "--to", "diffusers", "--out-dir", out]) == 0
    before = (tmp_path / "out" / "tomtut.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["convert", str(source), "--to", "onetrainer", "--out-dir", out]) == 2
    assert "tomtut.safetensors is there already" in capsys.readouterr().err
    assert (tmp_path / "out" / "tomtut.safetensors").read_bytes() == before
    assert main(["convert", str(source), "--to", "onetrainer", "--out-dir", out, "--overwrite"]) == 0
    assert (tmp_path / "out" / "tomtut.safetensors").read_bytes() != before


def test_a_onetrainer_files_tensors_tistudio_does_not_use_are_said(tmp_path: Path, caplog) -> None:
    """OneTrainer may keep emp_params_out beside emp_params; it was dropped without a word. (Issue 33.)"""
    from tistudio.embeddings.files import describe

    path = tmp_path / "ot.safetensors"
    save_file({"emp_params": torch.randn(2, 64), "emp_params_out": torch.randn(2, 64)}, str(path))
    embedding = read_embedding(path)
    assert embedding.tensor.shape == (2, 64)
    assert describe(embedding, path)["unused_tensors"] == "emp_params_out"
    assert "emp_params_out" in caplog.text and "not used" in caplog.text


def test_a_png_embedding_is_called_by_the_name_inside_it_as_in_a1111(tmp_path: Path, sd1_model, cache_dir) -> None:
    """A1111 registers a picture's embedding by the name in its data: `a1111_png_text.png` holding `a1111_png` is
    the word `a1111_png` (the prompt `a1111_png` had silently used nothing). (Issue 33.)"""
    from tistudio.config import GenerateOptions
    from tistudio.embeddings.files import prompt_words
    from tistudio.generate import generate

    data = {"string_to_param": {"*": {"TORCHTENSOR": vectors(2, 64).tolist()}}, "name": "a1111_png", "step": 3}
    info = PngInfo()
    info.add_text("sd-ti-embedding", base64.b64encode(json.dumps(data).encode()).decode())
    folder = tmp_path / "emb"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a1111_png_text.png", pnginfo=info)
    assert read_embedding(folder / "a1111_png_text.png").name == "a1111_png"
    assert prompt_words(folder) == {"a1111_png": folder / "a1111_png_text.png"}
    options = dict(model="-", steps=1, size="64x64", embeddings_dir=str(folder), out_dir=str(tmp_path / "out"))
    image = generate(GenerateOptions(prompt="a photo of a1111_png", **options), cache_dir=cache_dir, model=sd1_model)
    assert "TI hashes" in image[0].infotext and "a1111_png:" in image[0].infotext
