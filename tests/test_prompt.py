"""Prompt parsing (A1111 attention syntax), embedding-name matching, chunking, template filling."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tistudio.errors import OptionError
from tistudio.models.families import family
from tistudio.models.prompt import CHUNK, NameMatcher, chunk_prompt, parse_attention
from tistudio.models.tokenizer import load_tokenizer
from tistudio.templates import SHIPPED, fill_template, load_template, preview_prompt


@pytest.fixture(scope="module")
def tokenize():
    tokenizer = load_tokenizer()
    return lambda text: list(tokenizer(text, add_special_tokens=False).input_ids)


def approx(runs):
    return [(t, round(w, 4)) for t, w in runs]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.5730),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641),
                (".", 1.1),
            ],
        ),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("[less]", [("less", 0.9091)]),
        ("", [("", 1.0)]),
        ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ],
)
def test_attention_syntax_matches_a1111(text, expected) -> None:
    assert approx(parse_attention(text)) == approx(expected)


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab (:)[]\\.1,BREAK")), max_size=40))
def test_any_prompt_parses(text: str) -> None:
    runs = parse_attention(text)
    assert runs and all(isinstance(t, str) and (w > 0 or w == -1.0) for t, w in runs)


def test_embedding_names_become_their_vector_slots(tokenize) -> None:
    sequence = tuple(tokenize("tomtut"))
    matcher = NameMatcher({sequence: (50000, 3)})
    chunks = chunk_prompt("portrait of (tomtut:1.2) as a lego figure", tokenize, matcher)
    assert len(chunks) == 1
    ids, weights = chunks[0].ids, chunks[0].weights
    start = ids.index(50000)
    assert ids[start : start + 3] == [50000, 50001, 50002]
    assert weights[start : start + 3] == [1.2, 1.2, 1.2]
    assert not set(sequence) & set(ids)


def test_names_match_by_tokens_case_insensitively_and_longest_wins(tokenize) -> None:
    short, long = tuple(tokenize("tomtut")), tuple(tokenize("tomtut-200"))
    matcher = NameMatcher({short: (60000, 1), long: (60001, 2)})
    assert chunk_prompt("TomTut-200 smiling", tokenize, matcher)[0].ids[:2] == [60001, 60002]
    assert chunk_prompt("TOMTUT smiling", tokenize, matcher)[0].ids[0] == 60000
    # Part of a longer word is not the name (A1111 matches whole tokens).
    assert 60000 not in chunk_prompt("tomtutish", tokenize, matcher)[0].ids


def test_long_prompts_split_into_75_token_chunks_without_splitting_an_embedding(tokenize) -> None:
    sequence = tuple(tokenize("tomtut"))
    matcher = NameMatcher({sequence: (70000, 4)})
    words = " ".join(["cat"] * 73) + " tomtut dog"
    chunks = chunk_prompt(words, tokenize, matcher)
    assert [len(c.ids) for c in chunks] == [73, 5]
    assert chunks[1].ids[:4] == [70000, 70001, 70002, 70003]
    assert all(len(c.ids) <= CHUNK for c in chunks)


def test_break_starts_a_new_chunk(tokenize) -> None:
    chunks = chunk_prompt("a cat BREAK a dog", tokenize, None)
    assert len(chunks) == 2 and chunks[1].ids == tokenize("a dog")


def test_shipped_templates_load_and_contain_the_name() -> None:
    for name in SHIPPED:
        lines = load_template(name)
        assert lines and all("[name]" in line for line in lines)
    assert len(load_template("subject")) == 27
    assert len(load_template("style_filewords")) == 19


def test_template_filling_follows_a1111_order() -> None:
    assert (
        fill_template("a photo of a [name], [filewords]", "tomtut", "smiling, red hat")
        == "a photo of a tomtut, smiling, red hat"
    )
    assert (
        fill_template("a painting of [filewords], art by [name]", "vgstyle", "a river")
        == "a painting of a river, art by vgstyle"
    )
    # An empty caption leaves no dangling comma.
    assert fill_template("a photo of a [name], [filewords]", "tomtut", "") == "a photo of a tomtut"


def test_tag_dropout_and_shuffle_are_seeded() -> None:
    caption = "one, two, three, four, five"
    first = fill_template("[name], [filewords]", "x", caption, random.Random(3), shuffle_tags=True, tag_dropout=0.3)
    again = fill_template("[name], [filewords]", "x", caption, random.Random(3), shuffle_tags=True, tag_dropout=0.3)
    assert first == again and first.startswith("x")


def test_template_file_without_name_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("a photo\nanother photo\n")
    with pytest.raises(OptionError, match=r"no line contains \[name\]"):
        load_template(str(path))
    with pytest.raises(OptionError, match="not a shipped template"):
        load_template("nonexistent")


def test_preview_prompt_is_the_first_template_line() -> None:
    assert preview_prompt(load_template("subject_filewords"), "tomtut") == "a photo of a tomtut"


def test_tokenizer_is_the_real_clip_vocabulary() -> None:
    tokenizer = load_tokenizer()
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert load_tokenizer(family("sd2").encoders[0].pad_token).pad_token == "!"


def test_a_prompt_past_the_cap_is_refused_before_any_work(tmp_path) -> None:
    """The attention parser is quadratic in the worst case (as A1111's is): "(a" * 16000 took 6 s and held the
    server's worker, so prompts are capped where the worst case stays short."""
    from tistudio.config import MAX_PROMPT_CHARS, GenerateOptions, TrainOptions, check_fields, validate_generate

    for field in ("prompt", "negative_prompt"):
        options = GenerateOptions(**{"model": "demo", "prompt": "a", field: "(a" * 16000})
        with pytest.raises(OptionError, match="at most 8,000 characters") as error:
            validate_generate(options)
        assert error.value.field == field
    with pytest.raises(OptionError):
        check_fields(TrainOptions(model="demo", embedding="x", dataset="d", preview_prompt="x" * 9000))
    validate_generate(GenerateOptions(model="demo", prompt="(a" * (MAX_PROMPT_CHARS // 2)))  # at the cap: taken
