"""The defaults the docs state are the real ones: the chart values docs/install.md's table
names (`etcd.replicaCount` 3, `networkPolicy.enabled` on, ...) against values.yaml, and the
DefenderComponent example of docs/operator.md against the CRD's defaults. That the value paths
exist at all is tests/unit/packaging/test_packaging_docs_fields.py's check."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from docs_tables import table_rows

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
    rows = table_rows(text, "value")
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


OPERATOR = REPO / "docs" / "operator.md"
CRD = REPO / "crds" / "defendercomponents.yaml"


def _example_spec(doc: Path) -> dict[str, Any]:
    """The `spec` of the DefenderComponent example under "## The resource"."""
    section = doc.read_text().split("\n## The resource\n", 1)[1]
    spec: dict[str, Any] = yaml.safe_load(section.split("```yaml\n", 1)[1].split("```", 1)[0])[
        "spec"
    ]
    return spec


def example_drift(doc: Path = OPERATOR, crd: Path = CRD) -> list[str]:
    """Scalars of the example whose field has a CRD default the example does not show."""
    schema = yaml.safe_load(crd.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    problems = []

    def walk(shown: Any, node: dict[str, Any], path: str) -> None:
        if isinstance(shown, dict):
            for key, sub in shown.items():
                if key in node.get("properties", {}):
                    walk(sub, node["properties"][key], f"{path}.{key}")
        elif "default" in node and shown != node["default"]:
            problems.append(
                f"{doc.name}: {path} is {shown!r}, the CRD's default {node['default']!r}"
            )

    walk(_example_spec(doc), schema["properties"]["spec"], "spec")
    return problems


def test_the_resource_example_shows_the_crds_defaults() -> None:
    problems = example_drift()
    assert not problems, "\n".join(problems)
    assert _example_spec(OPERATOR)["heartbeat"]["intervalSeconds"] == 30


def test_a_default_the_example_gets_wrong_is_reported(tmp_path: Path) -> None:
    doc = tmp_path / "operator.md"
    doc.write_text(OPERATOR.read_text().replace("windowSeconds: 1800", "windowSeconds: 3600"))
    assert example_drift(doc) == [
        "operator.md: spec.restartBudget.windowSeconds is 3600, the CRD's default 1800"
    ]
