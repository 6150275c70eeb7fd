"""The library's messages in the page's words. The library speaks to a terminal ("pass --overwrite", "raise
--max-steps", "max_steps=350", "/home/ann/ws/runs/tomtut/report.html"); a person in the page has fields with labels
and buttons, and the server's folders are none of their business. Every message the server sends (an error, a
job's failure or result) goes through :func:`for_page`."""

from __future__ import annotations

import dataclasses
import re
from functools import cache
from pathlib import Path
from typing import Any

# what a CLI verb asks for, said for a form: a flag that is a checkbox is ticked, a number is raised or lowered
VERBS = {"pass": "tick", "use": "choose", "set": "set"}
FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9]*(?:-[a-z0-9]+)*)(?:[ =]([A-Za-z0-9._:+-]+))?")
ASSIGNED = re.compile(r"(?<![\w.])([a-z][a-z0-9]*(?:_[a-z0-9]+)+|[a-z]+)=('[^']*'|[^\s,;)]+)")
VERB_BEFORE = re.compile(r"\b(pass|use|set)\s+$")


def label(name: str) -> str:
    """A field's label as the page shows it (the schema's): max_steps -> "Max steps", cfg -> "CFG scale"."""
    return form_fields()[name][2]


@cache
def form_fields() -> dict[str, tuple[type, tuple[str, ...], str]]:
    """Every option a page form has (not the server's own), by name: its type (bool fields are checkboxes), its
    named choices and its label."""
    from tistudio.config import CreateOptions, GenerateOptions, PrepareOptions, TrainOptions
    from tistudio.server.context import SERVER_FIELDS

    fields: dict[str, tuple[type, tuple[str, ...], str]] = {}
    for cls in (PrepareOptions, CreateOptions, TrainOptions, GenerateOptions):
        for f in dataclasses.fields(cls):
            if f.name in SERVER_FIELDS:
                continue  # how the server was started: its flags are the right words
            choices = f.metadata.get("choices") or f.metadata.get("suggestions") or ()
            fields.setdefault(
                f.name,
                (
                    type(f.default),
                    tuple(str(c) for c in choices),
                    f.metadata.get("label") or f.name.replace("_", " ").capitalize(),
                ),
            )
    return fields


def for_page(text: str, workspace: Path | None = None) -> str:
    """`text` for the page: workspace paths relative to it, CLI flags and field=value as the form's labels."""
    if workspace is not None:
        root = str(Path(workspace))
        text = text.replace(root + "/", "").replace(root, "the workspace")
    return _fields(_flags(text))


def sentences(*parts: str) -> str:
    """Messages that are each a sentence of their own, said one after another: each begins with a capital and
    ends with a full stop. The library's messages are clauses ("stopped at step 12 of 40; saved"), and two of
    them joined as they are run together ("... then go on stopped at step 12")."""
    said = []
    for part in filter(None, (p.strip() for p in parts)):
        part = part[0].upper() + part[1:]
        said.append(part if part.endswith((".", "!", "?")) else part + ".")
    return " ".join(said)


def model_name(spec: str) -> str:
    """How a page names the served model: a file's or folder's name, never its path; a Hub id or demo as given."""
    if spec.startswith(("/", "~", ".")) or "\\" in spec or Path(spec).expanduser().exists():
        return Path(spec.replace("\\", "/")).name or spec
    return spec


def without_paths(value: Any, workspace: Path, model: str) -> Any:
    """`value` (JSON-like) with the server's paths taken out of every string: the workspace's relative to it,
    the model's as its name. For what a run folder records (options.json) before a client sees it."""
    if isinstance(value, dict):
        return {key: without_paths(item, workspace, model) for key, item in value.items()}
    if isinstance(value, list):
        return [without_paths(item, workspace, model) for item in value]
    if isinstance(value, str):
        root = str(Path(workspace))
        if model and model not in ("", ".") and model in value and model != model_name(model):
            value = value.replace(model, model_name(model))
        return value.replace(root + "/", "").replace(root, ".")
    return value


def _flag_value(value: str | None, kind: type, choices: tuple[str, ...]) -> str:
    """The value written after a flag, where it is one (a number, or one of the field's choices)."""
    if value is None or kind is bool:
        return ""
    if value in choices or re.fullmatch(r"[0-9][0-9.e+-]*", value):
        return value
    return ""


def _flags(text: str) -> str:
    fields = form_fields()
    out, last = [], 0
    for match in FLAG.finditer(text):
        name = match.group(1).replace("-", "_")
        if name not in fields:
            continue
        kind, choices, _ = fields[name]
        value = _flag_value(match.group(2), kind, choices)
        before = text[last : match.start()]
        verb = VERB_BEFORE.search(before)
        if verb is not None:
            before = before[: verb.start()] + ("tick " if kind is bool else VERBS[verb.group(1)] + " ")
        out.append(before + f"“{label(name)}”" + (f" {value}" if value else ""))
        last = match.end() if value or match.group(2) is None else match.start(2) - 1
    return "".join(out) + text[last:]


def _fields(text: str) -> str:
    fields = form_fields()

    def said(match: re.Match) -> str:
        name, value = match.group(1), match.group(2).strip("'")
        return f"“{label(name)}” {value}" if name in fields else match.group(0)

    return ASSIGNED.sub(said, text)
