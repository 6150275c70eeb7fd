"""Prompt styles as A1111 keeps them: a ``styles.csv`` with the columns name, prompt, negative_prompt, applied to a
prompt by A1111's rule (a style's ``{prompt}`` is replaced by the prompt; otherwise the style is appended after
", ")."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from tistudio.errors import OptionError

MAX_STYLES_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str = ""
    negative_prompt: str = ""


def read_styles(path: Path) -> dict[str, Style]:
    """The styles of a styles.csv (none if the file is absent); a malformed file is an error naming it."""
    if not path.is_file():
        return {}
    if path.stat().st_size > MAX_STYLES_BYTES:
        raise OptionError("styles", path.name, f"the file is larger than {MAX_STYLES_BYTES // 1024 // 1024} MB")
    try:
        text = path.read_text(encoding="utf-8-sig")
        rows = list(csv.DictReader(io.StringIO(text)))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise OptionError("styles", path.name, f"cannot be read as A1111's styles.csv ({exc})") from exc
    styles = {}
    for row in rows:
        name = (row.get("name") or "").strip()
        if name:
            styles[name] = Style(name, row.get("prompt") or "", row.get("negative_prompt") or "")
    return styles


def merge(style_text: str, prompt: str) -> str:
    """A1111's merge of one style's text into a prompt."""
    if "{prompt}" in style_text:
        return style_text.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt.strip(), style_text.strip()) if part)


def apply_styles(
    prompt: str, negative_prompt: str, names: list[str], styles: dict[str, Style], field: str = "styles"
) -> tuple[str, str]:
    """The prompt and negative prompt with the named styles applied in order; an unknown name is an error (A1111
    skips it silently, and the picture then lacks what the client asked for)."""
    for name in names:
        style = styles.get(name)
        if style is None:
            known = ", ".join(sorted(styles)) or "none (the server has no styles.csv)"
            raise OptionError(field, name, f"no style of this name; the styles are: {known}")
        prompt, negative_prompt = merge(style.prompt, prompt), merge(style.negative_prompt, negative_prompt)
    return prompt, negative_prompt
