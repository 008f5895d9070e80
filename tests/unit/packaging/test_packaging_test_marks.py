"""pytest ignores a mark on a function it does not collect: a ``timeout`` put above a helper
instead of the test it was meant for silently gives that test the suite's default (CI stop 31
failed on exactly that after a helper was inserted between a mark and its test)."""

from __future__ import annotations

import ast
from pathlib import Path

from packaging_chart import REPO


def _is_mark(decorator: ast.expr) -> bool:
    node = decorator.func if isinstance(decorator, ast.Call) else decorator
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return list(reversed(parts))[:2] == ["pytest", "mark"]


def misplaced_marks(source: str, filename: str = "<test>") -> list[str]:
    """``file:line name`` of each function with a ``pytest.mark`` that pytest does not collect."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if node.name.startswith("test"):
            continue
        if any(_is_mark(d) for d in node.decorator_list):
            found.append(f"{filename}:{node.lineno} {node.name}")
    return found


def test_a_mark_above_a_helper_is_reported() -> None:
    source = (
        "import pytest\n"
        "@pytest.mark.timeout(2400)\n"
        "def _helper():\n    pass\n"
        "def test_it():\n    pass\n"
        "@pytest.mark.parametrize('x', [1])\n"
        "def test_fine(x):\n    pass\n"
        "@pytest.fixture\n"
        "def fixture_fine():\n    pass\n"
    )
    assert misplaced_marks(source) == ["<test>:3 _helper"]


def test_every_mark_in_the_suite_is_on_a_test() -> None:
    found = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        found += misplaced_marks(path.read_text(), str(Path(path).relative_to(REPO)))
    assert found == []
