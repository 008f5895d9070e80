"""Field names the docs quote exist, so a renamed field cannot linger in prose: a `spec.x.y` /
`status.x` path must resolve in the DefenderComponent CRD's schema, a chart value path
(`operator.keyring.secretName`) in values.yaml, and a camelCase name in a code span must be a
CRD field, a chart value, a name the chart's templates use, or one of the few outside names
listed here."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging_chart import REPO

CRD = REPO / "crds" / "defendercomponents.yaml"
VALUES = REPO / "charts" / "ml-defender" / "values.yaml"
# The sidecar helper's arguments (`include "ml-defender.agent.*" (dict ...)`) live in templates.
TEMPLATES = REPO / "charts" / "ml-defender" / "templates"
# The example charts (the agent-sidecar workload) have values of their own the docs quote.
EXAMPLES = REPO / "charts" / "ml-defender" / "examples"
DOC_FILES = [*sorted((REPO / "docs").glob("*.md")), REPO / "README.md"]

# camelCase names the docs quote that neither the CRD nor the chart defines: kubelet's
# configuration and CNI (the devcluster node), Kubernetes volume fields and the plugin's
# `-o json` output (`rollback --direct`).
OUTSIDE = {
    "cgroupDriver",
    "cgroupsPerQOS",
    "enforceNodeAllocatable",
    "failCgroupV1",
    "failSwapOn",
    "historyLimitFrom",
    "hostPath",
    "ipMasq",
    "resolvConf",
    "resourceVersion",
    "subPath",
}

_CODE_SPAN = re.compile(r"`([^`\n]+)`")
# A path rooted at spec or status, not part of a file name or a longer dotted name.
_PATH = re.compile(r"(?<![\w./-])((?:spec|status)(?:\.[A-Za-z_][A-Za-z0-9_]*)+)")
# A camelCase name alone in a code span, or as the key of a `name: value` span.
_CAMEL = re.compile(r"^([a-z]+(?:[A-Z][a-z0-9]*)+)(?::.*)?$")
_CAMEL_WORD = re.compile(r"\b[a-z]+(?:[A-Z][a-z0-9]*)+\b")


def _schemas() -> list[dict[str, Any]]:
    crd = yaml.safe_load(CRD.read_text())
    assert crd["spec"]["names"]["kind"] == "DefenderComponent"
    return [v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"]]


def resolves(schema: dict[str, Any], path: str) -> bool:
    """Whether the dotted path names a field of the schema; free-form objects (preserve unknown
    fields, additionalProperties) accept anything below them."""
    node = schema
    for part in path.split("."):
        while node.get("type") == "array" and "items" in node:
            node = node["items"]
        props = node.get("properties", {})
        if part not in props:
            return bool(
                node.get("x-kubernetes-preserve-unknown-fields") or node.get("additionalProperties")
            )
        node = props[part]
    return True


def _property_names(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for name, sub in node.get("properties", {}).items():
            yield name
            yield from _property_names(sub)
        for key in ("items", "additionalProperties"):
            yield from _property_names(node.get(key))


def _value_keys(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for name, sub in node.items():
            yield str(name)
            yield from _value_keys(sub)
    elif isinstance(node, list):
        for sub in node:
            yield from _value_keys(sub)


def quoted(text: str) -> tuple[set[str], set[str]]:
    """(spec/status paths, camelCase names) quoted in code spans of a Markdown text."""
    paths: set[str] = set()
    names: set[str] = set()
    for span in _CODE_SPAN.findall(text):
        paths.update(_PATH.findall(span))
        if m := _CAMEL.match(span.strip()):
            names.add(m.group(1))
    return paths, names


def drift(docs: list[Path]) -> list[str]:
    """Every quoted path or name the CRD (or, for names, the chart values) does not define."""
    schemas = _schemas()
    known = {n for s in schemas for n in _property_names(s)}
    known |= set(_value_keys(yaml.safe_load(VALUES.read_text())))
    for example in EXAMPLES.glob("*/values.yaml"):
        known |= set(_value_keys(yaml.safe_load(example.read_text())))
    for template in TEMPLATES.rglob("*.*"):
        known |= set(_CAMEL_WORD.findall(template.read_text()))
    known |= OUTSIDE
    problems = []
    for doc in docs:
        paths, names = quoted(doc.read_text())
        where = doc.relative_to(REPO) if doc.is_relative_to(REPO) else doc.name
        problems += [
            f"{where}: `{p}` is not a DefenderComponent field"
            for p in sorted(paths)
            if not any(resolves(s, p) for s in schemas)
        ]
        problems += [
            f"{where}: `{n}` is neither a CRD field nor a chart value or argument"
            for n in sorted(names - known)
        ]
    return problems


def test_fields_quoted_in_docs_exist() -> None:
    problems = drift(DOC_FILES)
    assert not problems, "\n".join(problems)


def test_the_docs_quote_fields_at_all() -> None:
    """Guards the extraction itself: if the patterns stopped matching, the check above would
    pass on anything."""
    paths: set[str] = set()
    names: set[str] = set()
    for doc in DOC_FILES:
        p, n = quoted(doc.read_text())
        paths |= p
        names |= n
    assert {"spec.config", "spec.storage.encryption.enabled", "status.lastHeartbeatTime"} <= paths
    assert {"specConfigDigest", "maxRestarts"} <= names


@pytest.mark.parametrize(
    ("text", "reported"),
    [
        ("with `invalidConfigPolicy: RevertToMaster`, rolls back", 1),
        ("the operator reads `spec.rollout.invalidConfigPolicy`", 1),
        ("see `status.noSuchField`", 1),
        ("set `onInvalidConfigs`", 1),
        ("with `spec.rollout.onInvalidConfig: RevertToMaster`", 0),
        ("`spec.rollout.onInvalidConfig`, `spec.config.default_policy`, `status.conditions`", 0),
        ("`onInvalidConfig: Reject` and `docs/status.md`", 0),
    ],
)
def test_misnamed_fields_are_reported_and_real_ones_pass(
    tmp_path: Path, text: str, reported: int
) -> None:
    doc = tmp_path / "probe.md"
    doc.write_text(text + "\n")
    assert len(drift([doc])) == reported


# A dotted path under one of values.yaml's top-level keys, `*` for any key (`etcd.tls.*.enabled`).
_FILE_SUFFIX = re.compile(r"\.(md|ya?ml|py|json|tpl|txt|sh|go|tar|gz|db|crt|key)$")
CHART_README_IN = REPO / "charts" / "ml-defender" / "README.md.in"


def _value_path_pattern(values: dict[str, Any]) -> re.Pattern[str]:
    roots = "|".join(sorted(map(re.escape, values), key=len, reverse=True))
    return re.compile(rf"(?<![\w./<>-])((?:{roots})(?:\.(?:[A-Za-z_][A-Za-z0-9_]*|\*))+)")


def _value_resolves(node: Any, parts: list[str]) -> bool:
    if not parts:
        return True
    if isinstance(node, list):
        # A list of objects (agent.components): its items' keys, or anything if it is empty.
        return not node or any(_value_resolves(item, parts) for item in node)
    if not isinstance(node, dict):
        return False
    head, rest = parts[0], parts[1:]
    if head == "*":
        return any(_value_resolves(sub, rest) for sub in node.values())
    return head in node and _value_resolves(node[head], rest)


def value_drift(docs: list[Path]) -> list[str]:
    """Every chart value path quoted in the docs that values.yaml does not define."""
    values = yaml.safe_load(VALUES.read_text())
    pattern = _value_path_pattern(values)
    problems = []
    for doc in docs:
        where = doc.relative_to(REPO) if doc.is_relative_to(REPO) else doc.name
        for span in _CODE_SPAN.findall(doc.read_text()):
            for path in pattern.findall(span):
                if not _FILE_SUFFIX.search(path) and not _value_resolves(values, path.split(".")):
                    problems.append(f"{where}: `{path}` is not a chart value")
    return problems


def test_chart_value_paths_quoted_in_docs_exist() -> None:
    problems = value_drift([*DOC_FILES, CHART_README_IN])
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("text", "reported"),
    [
        ("the copy (`operator.keyring.fanOutSecretName`)", 1),
        ("set `etcd.tls.client.secretNames`", 1),
        ("`operator.keyring.secretName`, `etcd.tls.*.secretName`, `agent.components`", 0),
        ("`--set etcd.auth.enabled=true` and `config.envelope.cipher=chacha20-poly1305`", 0),
        ("see `operator.md` and `etcd.tar`", 0),
    ],
)
def test_misnamed_value_paths_are_reported_and_real_ones_pass(
    tmp_path: Path, text: str, reported: int
) -> None:
    doc = tmp_path / "probe.md"
    doc.write_text(text + "\n")
    assert len(value_drift([doc])) == reported
