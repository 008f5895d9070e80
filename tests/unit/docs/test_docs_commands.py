"""What a reader copies from the docs runs: every `kubectl defender <command> --flag` is a
command and flag of the plugin, every `DEFENDER_*` variable a setting of the library, the agent
or the operator, every agent flag in docs/agent.md's settings table a flag of `defender-agent`
with its real default (and every flag is there), architecture.md lists every plugin command, and
docs/operator.md's settings table names the operator's settings with their real defaults.
(`make <target>`: tests/unit/packaging/test_packaging_files.py.)"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from docs_tables import table_rows
from pydantic import AliasChoices, BaseModel
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings

from defender_agent._settings import AgentSettings
from defender_agent._settings import build_parser as agent_parser
from defender_cli._app import build_parser as plugin_parser
from defender_config import LibrarySettings
from defender_operator._settings import OperatorSettings

REPO = Path(__file__).resolve().parents[3]
DOC_FILES = [
    *sorted((REPO / "docs").glob("*.md")),
    REPO / "README.md",
    REPO / "charts" / "ml-defender" / "README.md.in",
]
# Variables of the build and the local cluster, not of a settings model (each is checked to
# still be read by the code below).
HARNESS_VARIABLES = {
    "DEFENDER_TOOLS_BIN",
    "DEFENDER_TOOLS_DIR",
    "DEFENDER_DEVCLUSTER_RUN_DIR",
    "DEFENDER_PORT_FORWARDS",
}


def commands(text: str) -> Iterator[str]:
    """Command lines a reader may copy: code spans, and the lines of fenced blocks (shell
    continuation lines joined), each cut at a `#` comment."""
    fenced = False
    block: list[str] = []
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            if fenced:
                yield from re.sub(r"\\\n\s*", " ", "\n".join(block)).splitlines()
                block = []
            fenced = not fenced
        elif fenced:
            block.append(re.sub(r"\s#.*$", "", line))
        else:
            yield from re.findall(r"`([^`\n]+)`", line)


def _words(command: str, program: str) -> Iterator[list[str]]:
    """The words after each `program` in a command line (split as a shell does, quotes kept
    together), up to a shell operator."""
    for m in re.finditer(rf"(?<![\w-]){program}((?:[ \t]+[^\s|;&)]+)*)", command):
        try:
            yield shlex.split(m.group(1))
        except ValueError:  # an unbalanced quote cut by the pattern
            yield m.group(1).split()


# --- kubectl defender ---------------------------------------------------------------------


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings}


def plugin_drift(doc: Path) -> list[str]:
    problems = []
    for command in commands(doc.read_text()):
        for words in _words(command, "kubectl defender"):
            parser, path = plugin_parser(), ["kubectl defender"]
            for word in words:
                if word.startswith("-"):
                    flag = word.split("=", 1)[0]
                    if flag not in _flags(parser):
                        problems.append(f"{doc.name}: `{' '.join(path)}` has no flag {flag}")
                elif (subs := _subcommands(parser)) and re.fullmatch(r"[a-z][a-z-]*", word):
                    if word not in subs:
                        problems.append(f"{doc.name}: `{' '.join(path)}` has no command {word}")
                        break
                    parser = subs[word]
                    path.append(word)
    return problems


# --- DEFENDER_* variables -----------------------------------------------------------------


def _model_variables(model: type[BaseModel], prefix: str, nested: str | None) -> set[str]:
    found = set()
    for name, info in model.model_fields.items():
        found.add(f"{prefix}{name}".upper())
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            found |= {c for c in alias.choices if isinstance(c, str) and c.isupper()}
        kind = info.annotation
        if nested and isinstance(kind, type) and issubclass(kind, BaseModel):
            found |= _model_variables(kind, f"{prefix}{name}{nested}", nested)
    return found


def setting_variables() -> set[str]:
    found = set()
    for model in (LibrarySettings, AgentSettings, OperatorSettings):
        assert issubclass(model, BaseSettings)
        config = model.model_config
        prefix, nested = config.get("env_prefix", ""), config.get("env_nested_delimiter")
        found |= _model_variables(model, prefix or "", nested)
    return found


def variable_drift(doc: Path) -> list[str]:
    known = setting_variables() | HARNESS_VARIABLES
    problems = []
    for name in sorted(set(re.findall(r"\bDEFENDER_[A-Z0-9_]*[A-Z0-9_]", doc.read_text()))):
        if name.endswith("_"):  # a family: `DEFENDER_OPERATOR_*`, `DEFENDER_ETCD__*`
            if not any(k.startswith(name) for k in known):
                problems.append(f"{doc.name}: no setting starts with {name}")
        elif name not in known:
            problems.append(f"{doc.name}: {name} is no setting")
    return problems


# --- the settings tables ------------------------------------------------------------------


def _table(text: str, heading: str, first: str) -> list[list[str]]:
    """Rows (cells) of the first table under `heading` whose header's first cell is `first`."""
    rows = table_rows(text.split(f"\n{heading}\n", 1)[1], first)
    assert rows, f"no `{first}` table under {heading}"
    return rows


def shown(value: Any) -> str:
    """A default as docs/operator.md writes it."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if value in (None, ""):
        return "(unset)"
    if value == []:
        return "(all)"
    if isinstance(value, list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def operator_table_drift(doc: Path = REPO / "docs" / "operator.md") -> list[str]:
    fields = OperatorSettings.model_fields
    problems, named = [], set()
    text = doc.read_text()
    for cells in _table(text, "## Settings", "variable"):
        names = re.findall(r"`([A-Z0-9_]+)`", cells[0])
        # `A` / `B` rows give both defaults the same way; "(chart: ...)" notes are not defaults.
        # After the default, in parentheses: the chart's value, or the setting's bounds.
        defaults = re.sub(r"(?<=\S)\s*\([^)]*\)", "", cells[1]).replace("`", "").split(" / ")
        if len(defaults) != len(names):
            defaults = defaults * len(names) if len(defaults) == 1 else defaults
        for name, default in zip(names, defaults, strict=False):
            field = name.lower()
            named.add(field)
            if field not in fields:
                problems.append(f"{doc.name}: {name} is no operator setting")
                continue
            info = fields[field]
            real = info.get_default(call_default_factory=True)
            if default.strip() != shown(real):
                problems.append(f"{doc.name}: {name} default is {shown(real)}, not {default}")
    prose = text.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    for field in fields:
        if field not in named and f"DEFENDER_OPERATOR_{field.upper()}" not in prose:
            problems.append(f"{doc.name}: DEFENDER_OPERATOR_{field.upper()} is not documented")
    return problems


def agent_table_drift(doc: Path = REPO / "docs" / "agent.md") -> list[str]:
    parser = agent_parser()
    cells = " ".join(row[0] for row in _table(doc.read_text(), "## Settings", "flag"))
    quoted = set(re.findall(r"`(--[a-z-]+)`", cells))
    problems = [
        f"{doc.name}: {f} is no defender-agent flag" for f in sorted(quoted - _flags(parser))
    ]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        variable = f"DEFENDER_AGENT_{action.dest.upper()}"
        if not quoted & set(action.option_strings) and f"`{variable}`" not in cells:
            problems.append(f"{doc.name}: {action.option_strings[0]} is not in the table")
    return problems


# An agent setting left unset takes the library's (docs/agent.md: "the agent's own ... flags
# override them"): its documented default is the library's.
AGENT_FALLBACKS = {
    "prefix": "prefix",
    "keyring_poll_seconds": "keyring_poll_seconds",
    "heartbeat_interval_seconds": "heartbeat_interval_seconds",
    "heartbeat_misses": "heartbeat_allowed_misses",
}


def agent_default(field: str) -> str | None:
    """The default the agent runs with, as the table writes it; None when it has no plain one
    (required, unset, or decided at run time)."""
    real = AgentSettings.model_fields[field].get_default(call_default_factory=True)
    if real is None and field in AGENT_FALLBACKS:
        library = LibrarySettings.model_fields[AGENT_FALLBACKS[field]]
        real = library.get_default(call_default_factory=True)
    if field == "file_mode" and isinstance(real, int):
        return f"0{real:o}"
    return None if real in (None, PydanticUndefined) else shown(real)


def agent_default_drift(doc: Path = REPO / "docs" / "agent.md") -> list[str]:
    """Defaults of docs/agent.md's settings table against the agent's (and library's)."""
    problems = []
    for cells in _table(doc.read_text(), "## Settings", "flag"):
        flags = [f.replace("-", "_") for f in re.findall(r"`--([a-z-]+)`", cells[0])]
        defaults = [d.strip().strip("`") for d in cells[1].split(", ")]
        if len(defaults) != len(flags):
            defaults = defaults[:1] * len(flags)
        for field, written in zip(flags, defaults, strict=True):
            real = agent_default(field) if field in AgentSettings.model_fields else None
            if real is not None and written != real:
                problems.append(
                    f"{doc.name}: --{field.replace('_', '-')} default is {real}, not {written}"
                )
    return problems


# --- the tests ----------------------------------------------------------------------------


@pytest.mark.parametrize("check", [plugin_drift, variable_drift])
def test_commands_and_variables_the_docs_show_exist(check: Any) -> None:
    problems = [p for doc in DOC_FILES for p in check(doc)]
    assert not problems, "\n".join(problems)


def plugin_row_drift(doc: Path = REPO / "docs" / "architecture.md") -> list[str]:
    """The commands architecture.md's parts table lists for the plugin, against its parser."""
    row = next(
        line for line in doc.read_text().splitlines() if line.startswith("| `kubectl defender`")
    )
    listed = set(re.findall(r"[a-z][a-z-]+", row.split("kubectl plugin:", 1)[1].split("(", 1)[0]))
    real = set(_subcommands(plugin_parser()))
    return [f"{doc.name}: the plugin row lacks {c}" for c in sorted(real - listed)] + [
        f"{doc.name}: the plugin has no command {c}" for c in sorted(listed - real)
    ]


def test_the_architecture_table_lists_every_plugin_command() -> None:
    problems = plugin_row_drift()
    assert not problems, "\n".join(problems)


def test_a_plugin_command_missing_from_the_architecture_table_is_reported(tmp_path: Path) -> None:
    doc = tmp_path / "architecture.md"
    real = (REPO / "docs" / "architecture.md").read_text()
    doc.write_text(real.replace(" defrag,", "").replace(" dump", " dump, undo"))
    assert plugin_row_drift(doc) == [
        "architecture.md: the plugin row lacks defrag",
        "architecture.md: the plugin has no command undo",
    ]


def test_the_harness_variables_are_still_read() -> None:
    code = " ".join(
        p.read_text()
        for p in [*(REPO / "src").rglob("*.py"), *(REPO / "hack").glob("*.sh"), REPO / "Makefile"]
    )
    assert not {v for v in HARNESS_VARIABLES if v not in code}


def test_the_operator_settings_table_has_every_setting_and_its_default() -> None:
    problems = operator_table_drift()
    assert not problems, "\n".join(problems)


def test_the_agent_settings_table_has_every_flag_and_its_default() -> None:
    problems = agent_table_drift() + agent_default_drift()
    assert not problems, "\n".join(problems)


def test_the_patterns_find_what_the_docs_show() -> None:
    text = "\n".join(doc.read_text() for doc in DOC_FILES)
    lines = list(commands(text))
    assert sum(1 for c in lines for _ in _words(c, "kubectl defender")) > 50
    assert len(set(re.findall(r"\bDEFENDER_[A-Z0-9_]+", text))) > 30


@pytest.mark.parametrize(
    ("snippet", "problems"),
    [
        ("`kubectl defender backup --dir /srv --keep 48`", 0),
        ("`kubectl defender keyring import --raw -f k.json --replace`", 0),
        ("```sh\nkubectl defender restore \\\n  --snapshot F --run-it\n```", 1),
        ("`kubectl defender statuz`", 1),
        ("`kubectl defender history <name> --show 3`, `kubectl defender`", 0),
        ("`DEFENDER_ETCD__ENDPOINTS`, `DEFENDER_OPERATOR_*`, `DEFENDER_AGENT_<FLAG>`", 0),
        ("`DEFENDER_ETCD_ENDPOINTS`", 1),
        ("`DEFENDER_OPERATOR_MONITOR_INTERVAL`", 1),
        ("`DEFENDER_NOPE_*`", 1),
    ],
)
def test_drift_is_reported_and_real_commands_pass(
    tmp_path: Path, snippet: str, problems: int
) -> None:
    doc = tmp_path / "probe.md"
    doc.write_text(snippet + "\n")
    found = plugin_drift(doc) + variable_drift(doc)
    assert len(found) == problems, found


def test_a_wrong_default_or_a_missing_setting_in_the_operator_table_is_reported(
    tmp_path: Path,
) -> None:
    real = (REPO / "docs" / "operator.md").read_text()
    doc = tmp_path / "operator.md"
    doc.write_text(
        real.replace("| `MONITOR_INTERVAL_SECONDS` | 30 (", "| `MONITOR_INTERVAL_SECONDS` | 10 (")
    )
    assert operator_table_drift(doc) == [
        "operator.md: MONITOR_INTERVAL_SECONDS default is 30, not 10"
    ]
    row = next(line for line in real.splitlines() if line.startswith("| `SCRUB_INTERVAL_SECONDS`"))
    doc.write_text(real.replace(row + "\n", ""))
    assert operator_table_drift(doc) == [
        "operator.md: DEFENDER_OPERATOR_SCRUB_INTERVAL_SECONDS is not documented"
    ]


def test_a_wrong_default_in_the_agent_table_is_reported(tmp_path: Path) -> None:
    real = (REPO / "docs" / "agent.md").read_text()
    doc = tmp_path / "agent.md"
    doc.write_text(
        real.replace("| `--heartbeat-misses` | 3 |", "| `--heartbeat-misses` | 5 |").replace(
            "| —, POST, 5, 3, 0.2 |", "| —, POST, 5, 2, 0.2 |"
        )
    )
    assert agent_default_drift(doc) == [
        "agent.md: --reload-retries default is 3, not 2",
        "agent.md: --heartbeat-misses default is 3, not 5",
    ]


def test_a_flag_missing_from_the_agent_table_is_reported(tmp_path: Path) -> None:
    real = (REPO / "docs" / "agent.md").read_text()
    doc = tmp_path / "agent.md"
    row = next(line for line in real.splitlines() if line.startswith("| `--file-mode`"))
    doc.write_text(real.replace(row, row.replace("--file-mode", "--file-mod")))
    assert agent_table_drift(doc) == [
        "agent.md: --file-mod is no defender-agent flag",
        "agent.md: --file-mode is not in the table",
    ]
