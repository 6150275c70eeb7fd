"""Prompt templates and their filling: ``[name]`` is the embedding, ``[filewords]`` the image's caption.

The shipped templates are A1111's (``subject``, ``subject_filewords``, ``style``, ``style_filewords``) plus
``none``, which here is the bare name: A1111's ``none.txt`` ("picture") never puts the embedding in the
prompt, so an embedding trained with it learns nothing.
"""

from __future__ import annotations

import logging
import random
import re
from importlib import resources
from pathlib import Path

from tistudio.errors import OptionError

log = logging.getLogger(__name__)

SHIPPED = ("subject", "subject_filewords", "style", "style_filewords", "none")
MAX_TEMPLATE_BYTES = 1_000_000


def load_template(spec: str) -> tuple[str, ...]:
    """The lines of a shipped template (by name) or of a template file; refuses templates without [name]."""
    if spec in SHIPPED:
        text = resources.files("tistudio").joinpath("data", "templates", f"{spec}.txt").read_text("utf-8")
    else:
        path = Path(spec)
        if not path.is_file():
            raise OptionError("template", spec, f"not a shipped template ({', '.join(SHIPPED)}) nor a file")
        if path.stat().st_size > MAX_TEMPLATE_BYTES:
            raise OptionError("template", spec, "the file is over 1 MB; a template is a few lines of text")
        try:
            text = path.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise OptionError("template", spec, f"cannot read it as UTF-8 text ({exc})") from None
    lines = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not lines:
        raise OptionError("template", spec, "the template has no lines; write one prompt per line with [name]")
    with_name = [line for line in lines if "[name]" in line]
    if not with_name:
        raise OptionError(
            "template",
            spec,
            "no line contains [name], so the embedding would never be in the "
            "prompt and could learn nothing; add [name] where the subject goes",
        )
    if len(with_name) < len(lines):
        log.warning(
            "template %s: %d of %d lines have no [name]; those samples teach the embedding nothing",
            spec,
            len(lines) - len(with_name),
            len(lines),
        )
    return lines


def split_tags(caption: str) -> list[str]:
    return [tag for tag in caption.split(",") if tag.strip()]


def fill_template(
    line: str,
    name: str,
    caption: str,
    rng: random.Random | None = None,
    shuffle_tags: bool = False,
    tag_dropout: float = 0.0,
) -> str:
    """Fill one template line as A1111 does: [filewords] first (tags optionally dropped/shuffled), then [name]."""
    tags = split_tags(caption)
    if rng is not None and tag_dropout > 0:
        tags = [tag for tag in tags if rng.random() > tag_dropout]
    if rng is not None and shuffle_tags:
        rng.shuffle(tags)
    filewords = ",".join(tags).strip()
    text = line.replace("[filewords]", filewords).replace("[name]", name)
    # An empty caption leaves ", ," or a trailing comma behind; tidy them.
    text = re.sub(r"\s*,(\s*,)+", ",", text)
    text = re.sub(r"^\s*,\s*|\s*,\s*$", "", text)
    return re.sub(r"\s{2,}", " ", text).strip()


def preview_prompt(lines: tuple[str, ...], name: str) -> str:
    """Default preview prompt: the first template line with [name] and no caption."""
    first = next(line for line in lines if "[name]" in line)
    return fill_template(first, name, "")
