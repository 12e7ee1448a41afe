"""Which test functions start a subprocess, and whether they are marked slow (read from the source)."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def _is_slow(fn: ast.FunctionDef) -> bool:
    return any("slow" in ast.unparse(d) for d in fn.decorator_list)


def _calls_subprocess(node: ast.AST, helpers: set[str]) -> bool:
    for n in ast.walk(node):
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "subprocess":
            return True
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in helpers:
            return True
    return False


def subprocess_tests() -> dict[str, bool]:
    """``file::test`` -> marked slow, for every test that starts a subprocess (directly or via a helper of its
    file that does, or its file that does)."""
    out = {}
    for path in sorted(TESTS.glob("test_*.py")):
        tree = ast.parse(path.read_text())
        funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
        helpers: set[str] = set()
        changed = True
        while changed:  # helpers that (transitively) start subprocesses
            changed = False
            for f in funcs:
                if not f.name.startswith("test_") and f.name not in helpers and _calls_subprocess(f, helpers):
                    helpers.add(f.name)
                    changed = True
        for f in funcs:
            if f.name.startswith("test_") and _calls_subprocess(f, helpers):
                out[f"{path.name}::{f.name}"] = _is_slow(f)
    return out
