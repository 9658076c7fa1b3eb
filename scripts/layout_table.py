#!/usr/bin/env python3
"""The layout table of DEVELOPERS.md, drawn from the code: one row per module of ``src/preftune``
(its path, its layer in the import graph and the first sentence of its docstring).

    python3 scripts/layout_table.py            # print the table
    python3 scripts/layout_table.py --write    # replace the table between the markers in DEVELOPERS.md

``tests/test_layout.py`` fails when DEVELOPERS.md's table differs from what this prints, so the
table follows the tree. Reads the files with ``ast`` only (no import of preftune).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "preftune"
BEGIN = "<!-- layout:begin (scripts/layout_table.py --write) -->"
END = "<!-- layout:end -->"


def _first_sentence(doc: str) -> str:
    words = " ".join(doc.strip().split("\n\n")[0].split()).split(" ")
    out = []
    for word in words:
        out.append(word)
        if word.endswith(".") and word.rstrip(".").lower() not in ("al", "e.g", "i.e", "vs", "cf", "eq"):
            break
    return " ".join(out).replace("|", "\\|")


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(tree: ast.Module, name: str, is_package: bool, known: set[str]) -> set[str]:
    """preftune modules imported anywhere in ``tree`` (lazy imports too)."""
    base = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                prefix = base
                for _ in range(node.level - 1):
                    prefix = prefix.rpartition(".")[0]
                module = f"{prefix}.{module}" if module else prefix
            # ``from pkg import sub`` depends on the submodule ``pkg.sub`` (as the project's arch check
            # counts it), ``from pkg import name`` on ``pkg``
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    """Module name → the preftune modules it imports (every import statement: top-level, lazy, TYPE_CHECKING)."""
    info = {_module_name(p): (p, ast.parse(p.read_text())) for p in sorted(PACKAGE.rglob("*.py"))}
    return {name: _imports(tree, name, path.name == "__init__.py", set(info)) for name, (path, tree) in info.items()}


def cycles() -> list[list[str]]:
    """The import cycles of ``src/preftune``: strongly connected groups of more than one module (Tarjan)."""
    deps = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(deps[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(deps):
        if v not in index:
            visit(v)
    return found


def long_modules(limit: int = 400) -> list[tuple[str, int]]:
    """``(path, lines)`` of the modules over ``limit`` lines."""
    out = []
    for p in sorted(PACKAGE.rglob("*.py")):
        n = len(p.read_text().splitlines())
        if n > limit:
            out.append((p.relative_to(PACKAGE).as_posix(), n))
    return out


def rows() -> list[tuple[str, int, str]]:
    """``(path, layer, summary)`` for every module, by path; ``layer`` is 0 for a module that imports
    nothing from preftune, else one more than the highest layer it imports (lazy imports count)."""
    files = sorted(PACKAGE.rglob("*.py"))
    info = {}
    for path in files:
        tree = ast.parse(path.read_text())
        info[_module_name(path)] = (path, tree)
    known = set(info)
    deps = {name: _imports(tree, name, path.name == "__init__.py", known) for name, (path, tree) in info.items()}
    layer: dict[str, int] = {}
    while len(layer) < len(info):
        ready = [n for n in info if n not in layer and deps[n] <= set(layer)]
        if not ready:  # a cycle (tests/test_layout.py forbids them): the rest on one layer
            ready = [n for n in info if n not in layer]
            top = max(layer.values(), default=-1) + 1
            layer.update({n: top for n in ready})
            break
        for n in ready:
            layer[n] = 1 + max((layer[d] for d in deps[n]), default=-1)
    out = []
    for name, (path, tree) in sorted(info.items(), key=lambda item: item[1][0]):
        doc = ast.get_docstring(tree) or ""
        out.append((path.relative_to(PACKAGE).as_posix(), layer[name],
                    _first_sentence(doc) if doc else "(no docstring)"))
    return out


def table() -> str:
    lines = ["| module (`src/preftune/`) | layer | what |", "| --- | ---: | --- |"]
    lines += [f"| `{path}` | {level} | {summary} |" for path, level, summary in rows()]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    text = table()
    if "--write" not in argv:
        print(text)
        return 0
    dev = ROOT / "DEVELOPERS.md"
    doc = dev.read_text()
    if BEGIN not in doc or END not in doc:
        print(f"{dev}: markers {BEGIN} ... {END} not found", file=sys.stderr)
        return 1
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    dev.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
