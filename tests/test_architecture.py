"""The structure rules of prvr/ that import-linter does not check (it checks the layers and
cycles: `lint-imports`, run by `make test`): short functions, argparse only in the CLI, one
fuse formula, and module-level imports except for the optional heavy libraries."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "prvr"
FILES = sorted(PKG.rglob("*.py"))
MAX_FUNCTION_LINES = 80
# Imported inside the function that needs them, each with a comment saying why.
LAZY_OK = {"pymilvus", "ts"}
FUSE = re.compile(r"alpha\s*\*.*\(\s*1(\.0)?\s*-\s*alpha\s*\)")


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _rel(path: Path) -> str:
    return str(path.relative_to(PKG.parent))


def test_the_package_has_its_layers():
    names = {_rel(p) for p in FILES}
    assert {"prvr/config.py", "prvr/model.py", "prvr/encoding.py", "prvr/search/exact.py",
            "prvr/cli/app.py", "prvr/serving/request.py", "prvr/registry/stores.py"} <= names


@pytest.mark.parametrize("path", FILES, ids=_rel)
def test_functions_fit_on_a_screen(path: Path):
    long = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(_tree(path))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []


@pytest.mark.parametrize("path", FILES, ids=_rel)
def test_imports_sit_at_module_level(path: Path):
    tree = _tree(path)
    top = set(map(id, tree.body))
    inner = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            inner += [n for n in names if n.split(".")[0] not in LAZY_OK]
    assert inner == []


def test_argparse_only_in_the_cli():
    users = [_rel(p) for p in FILES if re.search(r"^\s*(import argparse|from argparse)", p.read_text(), re.M)]
    assert users and all(u.startswith("prvr/cli/") for u in users), users


def test_the_fused_score_is_written_once():
    places = [f"{_rel(p)}:{i}" for p in FILES for i, line in enumerate(p.read_text().splitlines(), 1)
              if FUSE.search(line) and not line.lstrip().startswith("#")]
    assert len(places) == 1 and places[0].startswith("prvr/model.py:"), places
