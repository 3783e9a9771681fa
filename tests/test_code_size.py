"""Rooms small enough to live in: no class in eep/ over 350 lines, no function over 80, and
docs/architecture.md names only code that exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_CLASS, MAX_FUNCTION = 350, 80
# argparse's parser is one flat list of flags, read top to bottom: splitting it only scatters them
EXEMPT = {("eep/cli.py", "build_parser")}


def _sizes() -> list[tuple[str, str, str, int]]:
    found = []
    for path in sorted((ROOT / "eep").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), rel)):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                kind = "class" if isinstance(node, ast.ClassDef) else "function"
                found.append((rel, kind, node.name, node.end_lineno - node.lineno + 1))  # type: ignore[operator]
    return found


def test_no_class_over_350_lines_and_no_function_over_80() -> None:
    too_long = [f"{rel}: {kind} {name} has {n} lines" for rel, kind, name, n in _sizes()
                if (rel, name) not in EXEMPT and n > (MAX_CLASS if kind == "class" else MAX_FUNCTION)]
    assert not too_long, "\n".join(too_long)


def test_the_size_check_sees_what_it_should() -> None:
    sizes = {(rel, name): n for rel, _, name, n in _sizes()}
    assert sizes[("eep/cli.py", "build_parser")] > MAX_FUNCTION  # the exemption is still needed, and seen
    assert sizes[("eep/control/executor.py", "EPExecutor")] > 100


_CODE = re.compile(r"`([A-Za-z_][A-Za-z0-9_.]*(?:\(\))?)`")


def _names_in_eep() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "eep").rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        names.add(".".join(parts))  # the module
        names.update(parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif isinstance(node, ast.Name):
                names.add(node.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.keyword) and node.arg:
                names.add(node.arg)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
                names.add(node.value)  # event kinds, JSON keys, metric names
                names.add(node.value + "_total")  # a Prometheus counter's sample
    return names


def _looks_like_code(token: str) -> bool:
    bare = token.removesuffix("()")
    return "_" in bare or "." in bare or bare[:1].isupper() and any(c.islower() for c in bare[1:])


def test_architecture_doc_names_only_code_that_exists() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    names = _names_in_eep()
    missing = []
    for token in sorted({m.group(1) for m in _CODE.finditer(text)}):
        if not _looks_like_code(token) or "/" in token:
            continue
        parts = token.removesuffix("()").split(".")
        if token.endswith(".py"):  # a file of eep/
            if not any((ROOT / "eep").rglob(token)):
                missing.append(token)
        elif parts[0] in ("eep", "tests", "docs", "scripts"):  # a module path: every part must exist
            if ".".join(parts) not in names and not all(p in names for p in parts[1:]):
                missing.append(token)
        elif parts[-1] not in names:
            missing.append(token)
    assert not missing, f"docs/architecture.md names what eep/ does not have: {missing}"
