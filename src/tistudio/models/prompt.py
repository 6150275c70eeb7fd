"""Prompt text, as A1111 reads it: attention weights, BREAK, embedding names, 75-token chunks.

Pure text and token-id logic; no torch. Syntax (A1111's): ``(word)`` multiplies its weight by 1.1, ``[word]``
divides it by 1.1, ``(word:1.3)`` sets it, brackets nest, ``\\(`` is a literal bracket, unclosed brackets close
at the end, and ``BREAK`` starts a new 75-token chunk. Embeddings are found by their CLIP token ids, as in A1111:
the file stem, typed as a plain word, case-insensitive; the longest matching name wins.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

CHUNK = 75
_TOKENS = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) runs; ("BREAK", -1.0) marks a forced chunk break."""
    runs: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for match in _TOKENS.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            runs.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(runs))
        elif token == "[":
            square_open.append(len(runs))
        elif weight is not None and round_open and _is_number(weight):
            multiply(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            multiply(round_open.pop(), 1.1)
        elif token == "]" and square_open:
            multiply(square_open.pop(), 1 / 1.1)
        else:
            for index, part in enumerate(_BREAK.split(token)):
                if index > 0:
                    runs.append(["BREAK", -1.0])
                runs.append([part, 1.0])
    for start in round_open:
        multiply(start, 1.1)
    for start in square_open:
        multiply(start, 1 / 1.1)
    if not runs:
        runs = [["", 1.0]]
    merged: list[list] = []
    for run in runs:
        if merged and merged[-1][1] == run[1] and run[1] != -1.0:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(str(t), float(w)) for t, w in merged]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass
class Chunk:
    """Up to 75 token ids (plain vocabulary ids or embedding slots) with their weights."""

    ids: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class NameMatcher:
    """Finds embedding names in token-id sequences: {token-id sequence: (first slot id, vector count)}."""

    names: dict[tuple[int, ...], tuple[int, int]]

    def match(self, ids: Sequence[int], position: int) -> tuple[int, int, int] | None:
        """(matched length, first slot id, count) of the longest name starting at `position`."""
        best = None
        for sequence, (slot, count) in self.names.items():
            length = len(sequence)
            if tuple(ids[position : position + length]) == sequence and (best is None or length > best[0]):
                best = (length, slot, count)
        return best


def chunk_prompt(text: str, tokenize: Callable[[str], list[int]], matcher: NameMatcher | None) -> list[Chunk]:
    """A prompt as 75-token chunks; each embedding name becomes its vector slots and never straddles chunks."""
    chunks = [Chunk()]
    for run_text, weight in parse_attention(text):
        if weight == -1.0 and run_text == "BREAK":
            chunks.append(Chunk())
            continue
        ids = tokenize(run_text) if run_text else []
        position = 0
        while position < len(ids):
            found = matcher.match(ids, position) if matcher else None
            if found:
                length, slot, count = found
                if len(chunks[-1].ids) + count > CHUNK:
                    chunks.append(Chunk())
                chunks[-1].ids.extend(range(slot, slot + count))
                chunks[-1].weights.extend([weight] * count)
                position += length
            else:
                if len(chunks[-1].ids) >= CHUNK:
                    chunks.append(Chunk())
                chunks[-1].ids.append(ids[position])
                chunks[-1].weights.append(weight)
                position += 1
    return chunks


def names_in(text: str, tokenize: Callable[[str], list[int]], names: dict[str, tuple[int, ...]]) -> list[str]:
    """Which of the names (given by their token ids) appear in a prompt, matched run by run as A1111 does."""
    found = []
    for run_text, weight in parse_attention(text):
        if weight == -1.0 or not run_text:
            continue
        ids = tokenize(run_text)
        for name, sequence in names.items():
            n = len(sequence)
            if name not in found and n and any(tuple(ids[i : i + n]) == sequence for i in range(len(ids) - n + 1)):
                found.append(name)
    return found
