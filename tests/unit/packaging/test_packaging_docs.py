"""The operator-facing docs keep up with the code: every error reason has a troubleshooting
section, the docs link to files that exist, and every `docs/<page>.md#<anchor>` the code, the
chart or the docs point at is a heading (or `<a id>`) of that page."""

from __future__ import annotations

import re
from pathlib import Path

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


def anchors(markdown: str) -> set[str]:
    """The fragment ids a Markdown page has: its headings as GitHub makes them (lowercase,
    punctuation dropped, spaces to hyphens) and explicit `<a id="...">`. Fenced code is not
    read: a `# comment` there is no heading."""
    found: set[str] = set(re.findall(r'<a (?:id|name)="([^"]+)"', markdown))
    fenced = False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"^#{1,6}\s+(.+?)\s*$", line)):
            title = re.sub(r"<[^>]+>", "", m.group(1)).strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


def _anchor_references() -> list[tuple[str, Path, str]]:
    """(where, page, anchor) for every link to a docs page with an anchor: `docs/<page>#<id>`
    in the code and the chart, Markdown links in the docs and README (`#<id>` alone: the page
    itself)."""
    refs = []
    sources = [*(REPO / "src").rglob("*.py"), *(REPO / "operator").rglob("*.py")]
    sources += [p for p in (REPO / "charts").rglob("*") if p.suffix in {".yaml", ".tpl", ".txt"}]
    for source in sources:
        for page, anchor in re.findall(r"docs/([\w.-]+\.md)#([\w-]+)", source.read_text()):
            refs.append((str(source.relative_to(REPO)), DOCS / page, anchor))
    for page in [*sorted(DOCS.glob("*.md")), REPO / "README.md"]:
        links = re.findall(r"\]\(([\w./-]+\.md)?#([\w-]+)\)", page.read_text())
        for target, anchor in links:
            refs.append((page.name, (page.parent / target) if target else page, anchor))
    return refs


def test_every_docs_anchor_pointed_at_exists() -> None:
    refs = _anchor_references()
    assert any(where.startswith("src/") for where, _, _ in refs), "the pattern found nothing"
    missing = [
        f"{where}: {page.relative_to(REPO)}#{anchor}"
        for where, page, anchor in refs
        if not page.is_file() or anchor not in anchors(page.read_text())
    ]
    assert not missing, "\n".join(missing)


def test_anchors_are_made_as_github_makes_them() -> None:
    page = (
        "# Top\n## StoreNoSpace\n### Reaching etcd\n"
        '```sh\n# not a heading\n```\n<a id="canary"></a>\n'
    )
    assert anchors(page) == {"top", "storenospace", "reaching-etcd", "canary"}
