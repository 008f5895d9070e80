"""The operator-facing docs keep up with the code: every error reason has a troubleshooting
section, and the docs link to files that exist."""

from __future__ import annotations

import re

from packaging_chart import REPO

import defender_config

DOCS = REPO / "docs"
# Abstract parents: never raised themselves.
ABSTRACT = {"DefenderConfigError", "EnvelopeError", "CodecError", "StoreError"}


def _reasons() -> set[str]:
    found = set()
    for name in defender_config.__all__:
        obj = getattr(defender_config, name)
        if isinstance(obj, type) and issubclass(obj, defender_config.DefenderConfigError):
            found.add(obj.reason)
    return found - ABSTRACT


def test_every_error_reason_has_a_troubleshooting_section() -> None:
    text = (DOCS / "troubleshooting.md").read_text()
    sections = set(re.findall(r"^### (\w+)$", text, flags=re.MULTILINE))
    reasons = _reasons()
    assert {"UnknownKey", "AuthenticationFailed", "StoreUnavailable"} <= reasons
    missing = sorted(reasons - sections)
    assert not missing, f"docs/troubleshooting.md lacks a `### <reason>` section for {missing}"


def test_relative_links_in_my_docs_point_at_files() -> None:
    for name in ("architecture", "install", "security", "troubleshooting", "key-rotation"):
        text = (DOCS / f"{name}.md").read_text()
        for target in re.findall(r"\]\(([^)#:]+\.md)(?:#[^)]*)?\)", text):
            # etcd-layout.md is the library engineers' page, being written.
            assert (DOCS / target).exists() or target == "etcd-layout.md", (name, target)
