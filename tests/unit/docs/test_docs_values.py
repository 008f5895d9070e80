"""The chart values docs/install.md's table of useful values names have the defaults it states
(`etcd.replicaCount` 3, `networkPolicy.enabled` on, ...), read from values.yaml. That the
paths exist at all is tests/unit/packaging/test_packaging_docs_fields.py's check."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[3]
INSTALL = REPO / "docs" / "install.md"
VALUES = REPO / "charts" / "ml-defender" / "values.yaml"
# How the table writes a default that is no plain number or word.
WORDS: dict[str, Any] = {
    "on": True,
    "off": False,
    "none": [],
    "all": [],
    "cluster default": "",
}


def _rows(text: str) -> list[list[str]]:
    """The cells of the `| value | default | ... |` table's rows."""
    rows, inside = [], False
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("| value | default |"):
            inside = True
        elif inside and line.startswith("|"):
            if not set(line) <= set("|-: "):
                rows.append(cells)
        elif inside:
            break
    assert rows, "docs/install.md has no `| value | default |` table"
    return rows


def _lookup(values: dict[str, Any], path: str) -> Any:
    node: Any = values
    for part in path.split("."):
        node = node[part]
    return node


def _paths(cell: str) -> list[str]:
    """Value paths of a first cell: `a.b`, then `.c` relative to it; `a.*` is `a.enabled`."""
    paths: list[str] = []
    for quoted in re.findall(r"`([\w.*]+)`", cell):
        if quoted.startswith(".") and paths:
            quoted = paths[-1].rsplit(".", 1)[0] + quoted
        paths.append(quoted.replace(".*", ".enabled"))
    return paths


def _written(cell: str) -> list[Any]:
    """The defaults a cell states, one per comma-separated part, parentheses and notes
    ("certificates generated") dropped."""
    out: list[Any] = []
    for part in cell.split(", "):
        word = re.sub(r"\s*\(.*?\)", "", part).strip().strip("`")
        if not word.startswith("certificates"):
            out.append(WORDS.get(word, word))
    return out


def _image(values: dict[str, Any]) -> str:
    """The image the chart runs by default, as the table writes it."""
    image = values["image"]
    return f"{image['registry']}/{image['repository']}:{image['tag'] or '<appVersion>'}"


def default_drift(doc: Path = INSTALL, values_file: Path = VALUES) -> list[str]:
    values = yaml.safe_load(values_file.read_text())
    problems = []
    for cells in _rows(doc.read_text()):
        paths, written = _paths(cells[0]), _written(cells[1])
        if paths and paths[0].startswith("image."):
            pairs = [("image", _image(values), written[0])]
        else:
            # One default for several paths states it for each.
            stated = written * len(paths) if len(written) == 1 else written
            pairs = [(p, _lookup(values, p), w) for p, w in zip(paths, stated, strict=True)]
        for path, real, said in pairs:
            shown = str(real) if isinstance(said, str) and not isinstance(real, str) else real
            if shown != said:
                problems.append(f"{doc.name}: {path} defaults to {shown!r}, not {said!r}")
    return problems


def test_the_install_table_states_the_charts_defaults() -> None:
    problems = default_drift()
    assert not problems, "\n".join(problems)
    assert len(_rows(INSTALL.read_text())) > 8


def test_a_wrong_default_in_the_install_table_is_reported(tmp_path: Path) -> None:
    real = INSTALL.read_text()
    doc = tmp_path / "install.md"
    doc.write_text(
        real.replace("| `etcd.replicaCount` | 3 |", "| `etcd.replicaCount` | 5 |")
        .replace("| `networkPolicy.enabled` | on |", "| `networkPolicy.enabled` | off |")
        .replace("ml-defender-config:<appVersion>` |", "ml-defender-config:latest` |")
    )
    assert default_drift(doc) == [
        "install.md: image defaults to 'ghcr.io/ml-defender/ml-defender-config:<appVersion>',"
        " not 'ghcr.io/ml-defender/ml-defender-config:latest'",
        "install.md: etcd.replicaCount defaults to '3', not '5'",
        "install.md: networkPolicy.enabled defaults to True, not False",
    ]
