"""Every reason a person meets on a DefenderComponent is explained in docs/troubleshooting.md:
the reason of each Warning Event the operator posts, and of each condition it sets other than
True (a `### <reason>` section, or a row of a table whose first cell quotes it); and every
condition type the docs show (`Type=True`) is one the operator sets. The library's error
reasons have their own check (tests/unit/packaging/test_packaging_docs.py)."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
OPERATOR = REPO / "operator" / "defender_operator"
TROUBLESHOOTING = REPO / "docs" / "troubleshooting.md"

# Reasons that reach an Event or a condition through a variable the walk below cannot follow
# (a decision's `.reason`, a phase, a dict lookup). Each must still be a string the operator
# holds (checked), so a renamed one fails here rather than lingering.
THROUGH_VARIABLES = {
    # ownership decisions: the Conflict condition and a Warning Event
    "NameClaimedElsewhere",
    "NameRetained",
    "OwnerRecordUnreadable",
    # the breaker's trip, posted as its verdict's reason
    "BlastRadiusExceeded",
    # the keyring plan posted when the source Secret is restored, the refusals, and the
    # export warnings on the keyring Secret
    "KeyringRestored",
    "KeyringMissing",
    "SourceLacksKeys",
    "KeyringExportStale",
    "NoKeyringExport",
    # the Rollout condition's phases other than True
    "Aborted",
    "Superseded",
    # the Corrupt condition, named after the kind of value the scrub found failing
    "ActiveCorrupt",
    "MetadataCorrupt",
    "MasterCorrupt",
    "HistoryCorrupt",
    "ValueCorrupt",
    # the restart decision, quoted in the Heartbeating condition's message
    "RestartInProgress",
    "RestartBackoff",
    "RestartsDisabled",
    # refusals without a library reason
    "SpecRefused",
    # the storage budget's refusal: the operator's own error as a refusal's cause
    "StorageBudgetExceeded",
}


def _constants(files: list[Path]) -> dict[str, str]:
    """Module-level `NAME = "..."` strings (and enum members) of the operator package."""
    found: dict[str, str] = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)
            ):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        found[target.id] = node.value.value
    return found


def _value(node: ast.expr, constants: dict[str, str]) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    name = node.id if isinstance(node, ast.Name) else getattr(node, "attr", None)
    return constants.get(name) if name else None


def _is_true(node: ast.expr) -> bool:
    return (isinstance(node, ast.Name) and node.id == "TRUE") or (
        isinstance(node, ast.Attribute) and node.attr == "TRUE"
    )


def reasons_in_code(package: Path = OPERATOR) -> Iterator[tuple[str, str]]:
    """(reason, where) for every Warning Event and every condition other than True whose
    reason the source states: `warning(R, ...)`, `kopf.event(type="Warning", reason=R)`,
    `post_event(ref, "Warning", R, ...)`, `Cond(type, status, R, ...)` and the ConfigSynced
    table (`_CONFIG`)."""
    files = sorted(package.rglob("*.py"))
    constants = _constants(files)
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Dict) and all(
                isinstance(v, ast.Tuple) and len(v.elts) == 3 for v in node.values
            ):
                for v in node.values:
                    assert isinstance(v, ast.Tuple)
                    status, listed = v.elts[0], _value(v.elts[1], constants)
                    if listed and not _is_true(status) and re.fullmatch(r"[A-Z]\w+", listed):
                        yield listed, where
            if not isinstance(node, ast.Call):
                continue
            func = ast.unparse(node.func)
            keywords = {k.arg: k.value for k in node.keywords}
            args = node.args
            reason: str | None = None
            if func == "warning" and args:
                reason = _value(args[0], constants)
            elif func == "kopf.event" and _value(keywords.get("type", ast.Constant("")), {}) == (
                "Warning"
            ):
                reason = _value(keywords["reason"], constants)
            elif func.split(".")[-1] == "Cond" and len(args) >= 3 and not _is_true(args[1]):
                reason = _value(args[2], constants)
            else:
                for i, arg in enumerate(args[:-1]):
                    if isinstance(arg, ast.Constant) and arg.value == "Warning":
                        reason = _value(args[i + 1], constants)
            if reason:
                yield reason, where


def documented(text: str) -> set[str]:
    """Reasons troubleshooting.md explains: `### <Reason>` headings and the names quoted in
    the first cell of a table row."""
    found = set(re.findall(r"^### (\w+)", text, flags=re.MULTILINE))
    for line in text.splitlines():
        if line.startswith("| `"):
            first = line.split(" | ", 1)[0]
            found |= set(re.findall(r"`(\w+)`", first))
    return found


def undocumented(doc: Path = TROUBLESHOOTING) -> list[str]:
    explained = documented(doc.read_text())
    missing: dict[str, str] = {}
    for reason, where in reasons_in_code():
        if reason not in explained:
            missing.setdefault(reason, where)
    for reason in THROUGH_VARIABLES - explained:
        missing.setdefault(reason, "(through a variable)")
    return [f"{reason} ({where})" for reason, where in sorted(missing.items())]


def test_every_warning_event_and_condition_reason_is_in_troubleshooting() -> None:
    missing = undocumented()
    assert not missing, "docs/troubleshooting.md explains none of:\n" + "\n".join(missing)


def test_the_walk_finds_the_reasons_it_should() -> None:
    found = {reason for reason, _ in reasons_in_code()}
    # One of each kind of site: warning(), kopf.event, post_event/_tell, Cond, _CONFIG.
    assert {
        "PodRestarted",
        "ModifierUnverified",
        "KeyringRecordMismatch",
        "MissedHeartbeats",
        "CanaryInProgress",
    } <= found
    assert "AllGood" not in found, "a True condition's reason is no trouble"


def test_the_reasons_reached_through_variables_are_still_the_operators() -> None:
    strings = {
        node.value
        for path in OPERATOR.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }
    assert not sorted(THROUGH_VARIABLES - strings)


def test_a_reason_missing_from_the_doc_is_reported(tmp_path: Path) -> None:
    real = TROUBLESHOOTING.read_text()
    doc = tmp_path / "troubleshooting.md"
    row = next(line for line in real.splitlines() if line.startswith("| `RestartFailed`"))
    doc.write_text(real.replace(row + "\n", ""))
    assert [m.split(" ")[0] for m in undocumented(doc)] == ["RestartFailed"]
    heading = "### ConfigInvalid\n"
    doc.write_text(real.replace(heading, "### Config invalid\n"))
    assert [m.split(" ")[0] for m in undocumented(doc)] == ["ConfigInvalid"]


def condition_types(package: Path = OPERATOR) -> set[str]:
    """Every condition type the operator sets: the first argument of each `Cond(...)`."""
    files = sorted(package.rglob("*.py"))
    constants = _constants(files)
    found = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and ast.unparse(node.func).split(".")[-1] == "Cond"
                and node.args
                and (kind := _value(node.args[0], constants))
            ):
                found.add(kind)
    return found


def condition_drift(docs: list[Path]) -> list[str]:
    """`Type=Status` the docs show whose type the operator never sets."""
    real = condition_types()
    return [
        f"{doc.name}: no condition {kind}"
        for doc in docs
        for kind in sorted(
            set(re.findall(r"\b([A-Z]\w+)=(?:True|False|Unknown)\b", doc.read_text()))
        )
        if kind not in real
    ]


def test_the_condition_types_the_docs_show_exist() -> None:
    docs = [*sorted((REPO / "docs").glob("*.md")), REPO / "README.md"]
    assert {"Ready", "ConfigSynced", "EtcdHealthy", "Rollout"} <= condition_types()
    problems = condition_drift(docs)
    assert not problems, "\n".join(problems)


def test_a_condition_type_the_operator_never_sets_is_reported(tmp_path: Path) -> None:
    doc = tmp_path / "probe.md"
    doc.write_text("`KeyCurrent=False`, `Degraded=True` and `Ready=Unknown`\n")
    assert condition_drift([doc]) == ["probe.md: no condition Degraded"]
