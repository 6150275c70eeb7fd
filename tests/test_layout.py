"""The package's shape, as the README's "How it is built" describes it: imports flow one way along the pipeline (photos
-> prepared set -> trainer -> files -> generator), no module branches on a model family's name, and no function is
longer than a page."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "tistudio"
STAGES = ("prepare", "models", "embeddings", "generate", "train", "demo", "server")
# What each part may import besides the shared base at the top (config, errors, progress, storage, ...). The trainer
# draws its previews with the generator; the demo and the server use everything; the CLI is the front door.
ALLOWED = {
    "base": set(),
    "prepare": set(),
    "models": set(),
    "embeddings": set(),
    "generate": {"models", "embeddings"},
    "train": {"models", "embeddings", "prepare", "generate"},
    "demo": {"models", "embeddings", "prepare", "generate", "train"},
    "server": {"models", "embeddings", "prepare", "generate", "train", "demo"},
    "cli": set(STAGES),
}
FAMILY_KEYS = {"sd1", "sd2", "sdxl"}
LONGEST_FUNCTION = 100  # lines, signature and docstring included


def part_of(module: str) -> str:
    """The part of the package a dotted module name (tistudio.x.y) belongs to."""
    parts = module.split(".")
    if len(parts) < 2:
        return "base"
    if parts[1] in ("cli", "__main__"):
        return "cli"
    return parts[1] if parts[1] in STAGES else "base"


def modules() -> list[tuple[str, ast.Module]]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        dotted = ".".join(path.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__")
        found.append((dotted, ast.parse(path.read_text("utf-8"))))
    return found


def imported(tree: ast.Module) -> set[str]:
    """The tistudio modules a module imports, anywhere in it (lazy imports too)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tistudio":
            names |= {node.module} if node.module != "tistudio" else {f"tistudio.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.split(".")[0] == "tistudio"}
    return names


def test_imports_flow_one_way() -> None:
    wrong = [
        f"{name} imports {target}"
        for name, tree in modules()
        for target in sorted(imported(tree))
        if part_of(target) not in ALLOWED[part_of(name)] | {part_of(name), "base"}
    ]
    assert not wrong, "\n".join(wrong)


def test_no_module_but_the_families_table_branches_on_a_family_name() -> None:
    allowed = {"tistudio.models.families", "tistudio.models.builtin"}  # the table; the test-model builder
    found = []
    for name, tree in modules():
        if name in allowed:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                constants = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                if FAMILY_KEYS.intersection(v for v in constants if isinstance(v, str)):
                    found.append(f"{name}:{node.lineno}")
    assert not found, found


def test_no_function_is_longer_than_a_page() -> None:
    long = [
        f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for name, tree in modules()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > LONGEST_FUNCTION
    ]
    assert not long, long
