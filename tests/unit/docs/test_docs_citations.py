"""What the docs cite exists: every repository path they name (`src/...`, `hack/...`,
`charts/...`: from the repository's root; a Markdown link's target from the page), every test
file, every test function named with its file (`tests/x.py::test_y`, or `::test_y` after a
file), every bare `test_y` somewhere under tests/, and the bare names of docs/security.md's
threat table in the file the table says they are in. A renamed or deleted file or test otherwise
lingers as a claim nobody backs."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
DOC_FILES = [
    *sorted((REPO / "docs").glob("*.md")),
    REPO / "README.md",
    REPO / "charts" / "ml-defender" / "README.md.in",
]
SECURITY = REPO / "docs" / "security.md"
# The threat table's default file: "... `<file>` unless another file is named".
_TABLE_DEFAULT = re.compile(r"`(tests/[\w/.-]+\.py)` unless another file is named")

# A cited file, a `::name` after it (or alone: the file named last), or a bare test name; an
# elided name (`…_suffix`, `…_middle_…`) stands for a test of the file named last.
_CITATION = re.compile(
    r"(?P<file>(?<![\w/.-])tests/[\w/.-]+\.py)?"
    r"(?:::(?P<member>test_\w+))?"
    r"|(?P<elided>…_[\w…]+)"
    r"|(?<![\w/.:-])(?P<bare>test_\w+)"
)


@cache
def defined(path: Path) -> frozenset[str]:
    """Test functions and classes defined in a test file (at any depth: class members too)."""
    tree = ast.parse(path.read_text())
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    return frozenset(n.name for n in ast.walk(tree) if isinstance(n, kinds))


@cache
def every_test() -> frozenset[str]:
    """Every test function anywhere under tests/, and every test module's name."""
    files = sorted((REPO / "tests").rglob("*.py"))
    return frozenset().union(*(defined(f) for f in files), (f.stem for f in files))


def _examples(text: str) -> set[str]:
    """Names a doc defines itself in an example (`def test_seed(...)`), and the placeholder
    `test_x`: not citations."""
    return {*re.findall(r"\bdef (test_\w+)", text), "test_x"}


def citation_drift(doc: Path, repo: Path = REPO) -> list[str]:
    """Every citation of `doc` that names a test file or test that does not exist."""
    text = doc.read_text()
    examples = _examples(text)
    where = doc.relative_to(repo) if doc.is_relative_to(repo) else doc.name
    problems: list[str] = []
    last: Path | None = None
    for m in _CITATION.finditer(text):
        file, member, elided, bare = m.group("file", "member", "elided", "bare")
        if file:
            last = repo / file
            if not last.is_file():
                problems.append(f"{where}: {file} does not exist")
                last = None
                continue
        if member:
            if last is None:
                problems.append(f"{where}: ::{member} follows no test file")
            elif member not in defined(last):
                problems.append(f"{where}: {member} is not in {last.relative_to(repo)}")
        elif elided:
            parts = [p for p in elided.split("…") if p]
            if last is None or not any(all(p in name for p in parts) for name in defined(last)):
                problems.append(f"{where}: no test matches {elided} in {last}")
        elif bare and bare not in examples and bare not in every_test():
            problems.append(f"{where}: no test is named {bare}")
    return problems


def table_drift(doc: Path = SECURITY, repo: Path = REPO) -> list[str]:
    """Bare test names in the threat table's rows that are not in the table's default file."""
    text = doc.read_text()
    head = _TABLE_DEFAULT.search(text)
    assert head, f"{doc.name}: the sentence naming the threat table's default file is gone"
    default = repo / head.group(1)
    rows = [line for line in text[head.end() :].splitlines() if line.startswith("| **")]
    assert rows, f"{doc.name}: no threat table rows after the default file's sentence"
    problems = []
    for row in rows:
        proof = row.rstrip(" |").rsplit("|", 1)[-1]
        for name in re.findall(r"(?<![\w/.:…-])(test_\w+)`", proof):
            if name not in defined(default):
                problems.append(f"{doc.name}: {name} is not in {head.group(1)}; name its file")
    return problems


# A path from the repository's root: not part of a longer path, a URL or a placeholder.
_REPO_PATH = re.compile(
    r"(?<![\w/.~$<>-])((?:src|operator|tests|hack|charts|crds|manifests|bench|requirements"
    r"|docs|\.ci)/[\w./-]*[\w/])(?![\w<{*…])"
)


def path_drift(doc: Path, repo: Path = REPO) -> list[str]:
    """Repository paths `doc` names that do not exist."""
    text = doc.read_text()
    problems = []
    for m in _REPO_PATH.finditer(text):
        path, start, end = m.group(1), m.start(), m.end()
        if text[start - 2 : start] == "](":  # a link's target: relative to the page
            exists = (doc.parent / path).exists()
        elif text[start - 1 : start] == "[" and text[end : end + 2] == "](":
            continue  # a link's text: its target is checked
        else:
            exists = (repo / path.rstrip(".")).exists()
        if not exists:
            problems.append(f"{doc.name}: {path} does not exist")
    return problems


def test_every_path_the_docs_name_exists() -> None:
    problems = [p for doc in DOC_FILES for p in path_drift(doc)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("snippet", "problems"),
    [
        ("`hack/chart-schema.py`, `src/defender_cli/`, see charts/ml-defender/values.yaml.", 0),
        ("`hack/chart_schema.py`", 1),
        ("`tests/<suite>/x.py`, `~/src/x`, https://github.com/o/r/tree/main/src/gone", 0),
        ("[bench/library.json](bench/library.json) from docs/", 0),
        ("[the bench](bench/gone.json)", 1),
    ],
)
def test_a_path_that_is_gone_is_reported(tmp_path: Path, snippet: str, problems: int) -> None:
    page = tmp_path / "docs" / "probe.md"
    page.parent.mkdir()
    (tmp_path / "docs" / "bench").mkdir()
    (tmp_path / "docs" / "bench" / "library.json").write_text("{}")
    page.write_text(snippet + "\n")
    assert len(path_drift(page)) == problems, path_drift(page)


def test_every_test_the_docs_cite_exists() -> None:
    problems = [p for doc in DOC_FILES for p in citation_drift(doc)]
    assert not problems, "\n".join(problems)


def test_bare_names_in_the_threat_table_are_in_its_default_file() -> None:
    problems = table_drift()
    assert not problems, "\n".join(problems)


def test_the_docs_cite_tests_at_all() -> None:
    text = SECURITY.read_text()
    assert len(re.findall(r"::test_\w+", text)) > 20, "the citation pattern found nothing"


_REAL = "tests/unit/docs/test_docs_citations.py"


@pytest.mark.parametrize(
    ("snippet", "problems"),
    [
        (f"`{_REAL}::test_every_test_the_docs_cite_exists`", 0),
        (f"`{_REAL}::test_every_test_the_docs_cite_exists_renamed`", 1),
        (f"`{_REAL}`, `::test_the_docs_cite_tests_at_all`, `::test_gone`", 1),
        ("`tests/unit/docs/test_no_such_file.py`", 1),
        ("`test_the_docs_cite_tests_at_all`, `test_never_written`", 1),
        (f"`{_REAL}` (`…_cite_tests_at_…`, `…_no_such_suffix`)", 1),
        ("`def test_seed(x): ...` and `test_seed`, `test_x-3f2a`", 0),
    ],
)
def test_stale_citations_are_reported_and_real_ones_pass(
    tmp_path: Path, snippet: str, problems: int
) -> None:
    doc = tmp_path / "probe.md"
    doc.write_text(f"Proof: {snippet}.\n")
    assert len(citation_drift(doc)) == problems, citation_drift(doc)


def test_a_bare_name_from_another_file_in_the_threat_table_is_reported(tmp_path: Path) -> None:
    doc = tmp_path / "security.md"
    doc.write_text(
        f"Proofs: `{_REAL}` unless another file is named.\n\n"
        "| threat | can | cannot | tests |\n|---|---|---|---|\n"
        "| **a** | x | y | `test_the_docs_cite_tests_at_all`; `tests/x.py::test_elsewhere` |\n"
        "| **b** | x | y | `test_bare_names_in_the_threat_table_are_in_its_default_file` |\n"
        "| **c** | x | y | `test_anchors_are_made_as_github_makes_them` |\n"
    )
    assert len(table_drift(doc)) == 1
