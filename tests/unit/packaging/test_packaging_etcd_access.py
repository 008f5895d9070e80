"""The etcd access plan the chart's init step applies: which keys each role may touch (pure, no
etcd; tests/e2e/packaging/test_packaging_e2e_lockdown.py applies it to a real cluster)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from defender_config import EtcdSettings, Layout
from defender_operator.etcd_access import (
    AccessPlan,
    EtcdAccessError,
    Grant,
    apply_plan,
    main,
    role_grants,
)


def _allowed(grants: frozenset[Grant], key: str, write: bool) -> bool:
    """etcd's check: some grant of the right kind covers the key (prefix = [key, range_end))."""
    for g in grants:
        if write and g.right == "read":
            continue
        if not write and g.right == "write":
            continue
        raw = key.encode()
        if (g.prefix and g.key.encode() <= raw < g.range_end) or raw == g.key.encode():
            return True
    return False


LAYOUT = Layout("/ml-defender")
AGENT = role_grants(LAYOUT, "firewall")
OPERATOR = role_grants(LAYOUT, None)


# The records that decide what the component runs.
STEERING = [
    LAYOUT.active_config("firewall"),
    LAYOUT.master_config("firewall"),
    LAYOUT.metadata("firewall"),
    LAYOUT.history("firewall", 3),
    LAYOUT.freeze("firewall"),
]
OWN = [LAYOUT.status("firewall"), LAYOUT.instance("firewall", "fw-0")]


@pytest.mark.parametrize("key", STEERING + OWN)
def test_agent_reads_its_component(key: str) -> None:
    assert _allowed(AGENT, key, write=False)


@pytest.mark.parametrize("key", [*OWN, LAYOUT.alert("firewall", 1, "abcd")])
def test_agent_writes_only_its_heartbeats_status_and_alerts(key: str) -> None:
    assert _allowed(AGENT, key, write=True)


@pytest.mark.parametrize(
    "key",
    [
        *STEERING,
        LAYOUT.active_config("firewall-2"),
        LAYOUT.instance("sniffer", "s-0"),
        LAYOUT.alert("sniffer", 1, "abcd"),
        "/ml-defender/keyring",
        "/other/components/firewall/instances/x",
    ],
)
def test_agent_cannot_write_what_steers_it_or_others(key: str) -> None:
    assert not _allowed(AGENT, key, write=True)


@pytest.mark.parametrize(
    "key",
    [
        LAYOUT.active_config("sniffer"),
        LAYOUT.metadata("firewall-2"),  # a name sharing the prefix "firewall"
        LAYOUT.alert("sniffer", 1, "abcd"),
        "/ml-defender/components/",
    ],
)
def test_agent_cannot_read_other_components(key: str) -> None:
    assert not _allowed(AGENT, key, write=False)


def test_operator_reads_and_writes_the_whole_prefix_only() -> None:
    assert _allowed(OPERATOR, LAYOUT.active_config("x"), write=True)
    assert _allowed(OPERATOR, LAYOUT.alert("x", 1, "a"), write=False)
    assert not _allowed(OPERATOR, "/ml-defender-other/x", write=True)
    assert not _allowed(OPERATOR, "/kubernetes/x", write=False)


def test_prefix_range_end_is_the_next_key() -> None:
    assert Grant("/a/b/", True, "read").range_end == b"/a/b0"
    assert Grant("/a/b", False, "read").range_end == b""


def _plan(tmp_path: Path, **changes: object) -> AccessPlan:
    for name in ("root", "operator", "agent-firewall"):
        (tmp_path / name).write_text("p" * 32)
    data: dict[str, object] = {
        "prefix": "/ml-defender",
        "root_password_file": str(tmp_path / "root"),
        "operator_user": "op",
        "operator_password_file": str(tmp_path / "operator"),
        "agents": [
            {
                "component": "firewall",
                "user": "agent-firewall",
                "password_file": str(tmp_path / "agent-firewall"),
            }
        ],
    }
    data.update(changes)
    return AccessPlan.model_validate(data)


def test_a_missing_password_file_is_a_clear_error(tmp_path: Path) -> None:
    plan = _plan(tmp_path, operator_password_file=str(tmp_path / "nope"))
    with pytest.raises(EtcdAccessError, match="cannot read the password file"):
        apply_plan(plan, EtcdSettings(endpoints=["http://127.0.0.1:1"]))


def test_a_short_password_is_refused(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    Path(plan.root_password_file).write_text("short\n")
    with pytest.raises(EtcdAccessError, match="shorter than 12"):
        apply_plan(plan, EtcdSettings(endpoints=["http://127.0.0.1:1"]))


def test_a_user_named_twice_is_refused(tmp_path: Path) -> None:
    plan = _plan(tmp_path, operator_user="agent-firewall")
    with pytest.raises(EtcdAccessError, match="appears twice"):
        apply_plan(plan, EtcdSettings(endpoints=["http://127.0.0.1:1"]))


def test_main_reports_an_unreachable_etcd_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = _plan(tmp_path)
    (tmp_path / "plan.json").write_text(plan.model_dump_json())
    (tmp_path / "settings.json").write_text(
        json.dumps({"etcd": {"endpoints": ["http://127.0.0.1:1"], "timeout_seconds": 0.5}})
    )
    code = main(
        [
            "--plan",
            str(tmp_path / "plan.json"),
            "--settings",
            str(tmp_path / "settings.json"),
            "--wait-seconds",
            "0",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "no etcd member answered: http://127.0.0.1:1: UNAVAILABLE" in err
    assert "p" * 32 not in err


def test_main_refuses_an_unknown_plan_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "plan.json").write_text(json.dumps({"root_password_file": "x", "oops": 1}))
    assert main(["--plan", str(tmp_path / "plan.json"), "--wait-seconds", "0"]) == 1
    assert "oops" in capsys.readouterr().err


def test_a_health_user_needs_its_password_file(tmp_path: Path) -> None:
    plan = _plan(tmp_path, health_user="health")
    with pytest.raises(EtcdAccessError, match="health_user needs health_password_file"):
        apply_plan(plan, EtcdSettings(endpoints=["http://127.0.0.1:1"]))
