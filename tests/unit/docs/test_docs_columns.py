"""`kubectl get dfc` as the docs show it has the CRD's printer columns: every table the docs
print under a `NAME  TYPE  READY ...` header names the CRD's columns in their order (`-o wide`
ones after the default ones), and operator.md names exactly the columns `-o wide` adds."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[3]
CRD = REPO / "crds" / "defendercomponents.yaml"
DOC_FILES = [
    *sorted((REPO / "docs").glob("*.md")),
    REPO / "README.md",
    REPO / "charts" / "ml-defender" / "README.md.in",
]


def printer_columns(crd: Path = CRD) -> tuple[list[str], list[str]]:
    """(default columns, `-o wide` columns) as kubectl prints their names."""
    versions = yaml.safe_load(crd.read_text())["spec"]["versions"]
    served = next(v for v in versions if v.get("storage"))
    columns = served["additionalPrinterColumns"]
    default = ["NAME", *(c["name"].upper() for c in columns if not c.get("priority"))]
    wide = [c["name"].upper() for c in columns if c.get("priority")]
    return default, wide


def headers(text: str) -> list[list[str]]:
    """The header rows of `kubectl get dfc` output the text shows."""
    return [
        line.split()
        for line in text.splitlines()
        if re.match(r"^(NAMESPACE\s+)?NAME\s+TYPE\s+READY\b", line)
    ]


def column_drift(doc: Path) -> list[str]:
    default, wide = printer_columns()
    problems = []
    for header in headers(doc.read_text()):
        shown = header[1:] if header[0] == "NAMESPACE" else header
        if shown not in (default, default + wide):
            problems.append(f"{doc.name}: {' '.join(header)} is not {' '.join(default)} (+ wide)")
    return problems


def test_the_dfc_tables_the_docs_show_have_the_crds_columns() -> None:
    problems = [p for doc in DOC_FILES for p in column_drift(doc)]
    assert not problems, "\n".join(problems)
    assert any(headers(doc.read_text()) for doc in DOC_FILES), "the pattern found no table"


def test_the_wide_columns_the_operator_doc_names_exist() -> None:
    _, wide = printer_columns()
    text = (REPO / "docs" / "operator.md").read_text()
    said = re.search(r"`kubectl get dfc -o wide` adds ([^.]+)\.", text)
    assert said, "operator.md no longer says what -o wide adds"
    named = re.findall(r"\(([A-Z, ]+)[;)]", said.group(1))
    assert named, said.group(1)
    assert {n.strip() for group in named for n in group.split(",")} == set(wide)


def test_a_table_with_a_renamed_column_is_reported(tmp_path: Path) -> None:
    default, _ = printer_columns()
    doc = tmp_path / "probe.md"
    doc.write_text("```\n" + "   ".join(default) + "\nsniffer  sniffer  True ...\n```\n")
    assert column_drift(doc) == []
    doc.write_text("```\n" + "   ".join(default).replace("HEARTBEAT", "LAST-SEEN") + "\n```\n")
    assert len(column_drift(doc)) == 1
