"""The real 49,408-token CLIP tokenizer, built offline from the BPE file shipped in this package.

``data/bpe_simple_vocab_16e6.txt.gz`` is OpenAI's CLIP BPE vocabulary as distributed (MIT licence) inside the
``open_clip_torch`` wheel; see ``data/LICENSE-clip-bpe.txt``. SD1.x, SD2.x and SDXL all use this vocabulary;
they differ only in the padding token. Nothing is fetched from the Hub.
"""

from __future__ import annotations

import gzip
import json
from importlib import resources
from pathlib import Path
from typing import Any

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 49408
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_symbol_order() -> list[str]:
    """GPT-2/CLIP byte-level stand-ins: printable bytes map to themselves, the other bytes to chr(256 + n).

    Listed in the order CLIP's vocabulary lists them: the printable bytes first, then the remapped ones.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\u00a1"), ord("\u00ac") + 1),
        *range(ord("\u00ae"), ord("\u00ff") + 1),
    ]
    remapped = [chr(256 + n) for n, b in enumerate(b for b in range(256) if b not in set(printable))]
    return [chr(b) for b in printable] + remapped


def vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The CLIP vocabulary {token: id} and its ordered BPE merges."""
    raw = resources.files("tistudio").joinpath("data", BPE_FILE).read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")[1 : N_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    symbols = _byte_symbol_order()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(pair) for pair in merges] + [BOS, EOS]
    return {token: index for index, token in enumerate(tokens)}, merges  # type: ignore[return-value]


def tokenizer_config(pad: str = EOS) -> dict[str, Any]:
    """The tokenizer's settings; `pad`: its padding token (an encoder slot's pad_token: CLIP pads with the end
    token, OpenCLIP with "!")."""
    return {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": pad,
        "do_lower_case": True,
    }


def write_tokenizer(folder: Path, pad: str = EOS) -> None:
    """Write a tokenizer folder (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json)."""
    vocab, merges = vocab_and_merges()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), "utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), "utf-8")
    config = tokenizer_config(pad)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), "utf-8")
    specials = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2), "utf-8")


def load_tokenizer(pad: str = EOS) -> Any:
    """A CLIPTokenizer with the real vocabulary, built in memory."""
    from transformers import CLIPTokenizer

    vocab, merges = vocab_and_merges()
    return CLIPTokenizer(
        vocab=vocab, merges=merges, model_max_length=77, bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=pad
    )
