"""Key layout: the exact keys of CONTRACT.md, parsing back, and names that would break it."""

from __future__ import annotations

import pytest

from defender_config import Layout, ParsedKey, viewed_component
from defender_config._layout import check_name


def test_keys_match_the_contract() -> None:
    lay = Layout("/ml-defender")
    assert lay.master_config("sniffer") == "/ml-defender/components/sniffer/master_config"
    assert lay.active_config("sniffer") == "/ml-defender/components/sniffer/active_config"
    assert lay.metadata("sniffer") == "/ml-defender/components/sniffer/metadata"
    assert lay.status("sniffer") == "/ml-defender/components/sniffer/status"
    assert lay.history("sniffer", 7) == "/ml-defender/components/sniffer/history/0000000007"
    assert lay.instance("sniffer", "pod-1") == "/ml-defender/components/sniffer/instances/pod-1"
    assert lay.freeze("sniffer") == "/ml-defender/control/sniffer/freeze"
    assert lay.owner("sniffer") == "/ml-defender/control/sniffer/owner"
    assert lay.cadence("sniffer") == "/ml-defender/control/sniffer/heartbeat"
    assert lay.alert("rag", 12, "ab12") == "/ml-defender/alerts/rag/0000000000000000012-ab12"
    assert lay.components_dir == "/ml-defender/components/"
    assert lay.instances_dir("rag") == "/ml-defender/components/rag/instances/"


def test_history_keys_sort_in_version_order() -> None:
    lay = Layout()
    keys = [lay.history("c", v) for v in (1, 2, 9, 10, 99, 100, 12345)]
    assert sorted(keys) == keys
    with pytest.raises(ValueError):
        lay.history("c", 0)
    with pytest.raises(ValueError):
        lay.history("c", 10**10)


def test_alert_keys_sort_by_time() -> None:
    lay = Layout()
    assert lay.alert("c", 9, "z") < lay.alert("c", 10, "a")
    with pytest.raises(ValueError):
        lay.alert("c", -1, "a")


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("/p/components/rag/master_config", ParsedKey("master_config", "rag")),
        ("/p/components/rag/active_config", ParsedKey("active_config", "rag")),
        ("/p/components/rag/metadata", ParsedKey("metadata", "rag")),
        ("/p/components/rag/status", ParsedKey("status", "rag")),
        ("/p/components/rag/history/0000000003", ParsedKey("history", "rag", version=3)),
        ("/p/components/rag/instances/rag-0", ParsedKey("instance", "rag", instance="rag-0")),
        ("/p/alerts/rag/0000000000000000012-ab", ParsedKey("alert", "rag")),
        ("/p/control/rag/freeze", ParsedKey("freeze", "rag")),
        ("/p/control/rag/owner", ParsedKey("owner", "rag")),
        ("/p/control/rag/heartbeat", ParsedKey("cadence", "rag")),
        (b"/p/components/rag/status", ParsedKey("status", "rag")),
        ("/p/components/rag/unknown_leaf", None),
        ("/p/components/rag/history/3", None),  # not zero-padded: not ours
        ("/p/components/rag/history/0000000000", None),
        ("/other/components/rag/status", None),
        ("/p/components/rag/instances/a/b", None),
        ("/p", None),
    ],
)
def test_parse(key: str | bytes, expected: ParsedKey | None) -> None:
    assert Layout("/p").parse(key) == expected


def test_parse_round_trips_every_builder() -> None:
    lay = Layout("/a/b")
    assert lay.parse(lay.instance("x", "y")) == ParsedKey("instance", "x", instance="y")
    assert lay.parse(lay.history("x", 42)) == ParsedKey("history", "x", version=42)
    assert lay.parse(lay.freeze("x")) == ParsedKey("freeze", "x")
    assert lay.parse(lay.owner("x")) == ParsedKey("owner", "x")
    assert lay.parse(lay.cadence("x")) == ParsedKey("cadence", "x")


@pytest.mark.parametrize(
    "name", ["", "a/b", "-lead", "trail-", "spa ce", "ü", "x" * 254, "..a/", "fw\n", "fw\r"]
)
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="not a valid key segment"):
        Layout().active_config(name)
    with pytest.raises(ValueError, match="not a valid key segment"):
        check_name(name)


def test_a_key_with_a_name_ending_in_a_newline_is_not_ours() -> None:
    # `$` with `match` also matches before a final newline: "fw\n" passed as a name.
    lay = Layout("/p")
    assert lay.parse("/p/components/fw\n/status") is None
    assert lay.parse("/p/components/fw/instances/fw-0\n") is None
    assert lay.parse("/p/control/fw/freeze") == ParsedKey("freeze", "fw")


@pytest.mark.parametrize("prefix", ["", "no-slash", "/trailing/", "/sp ace", "/", "/p\n"])
def test_bad_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        Layout(prefix)


def test_names_as_used_by_kubernetes_fit() -> None:
    lay = Layout()
    assert lay.instance("ml-detector", "ml-detector-7c9f8d6b5-x2x9q").endswith("x2x9q")
    assert lay.instance("rag", "node.example.com").endswith("node.example.com")


def test_a_key_belongs_to_the_view_of_the_component_whose_view_reads_it() -> None:
    lay = Layout("/ml-defender")
    read = [
        lay.metadata("sniffer"),
        lay.master_config("sniffer"),
        lay.freeze("sniffer"),
        lay.cadence("sniffer"),
        lay.rollout("sniffer"),
        lay.alert("sniffer", 12, "ab12"),
        # The view lists the whole alerts prefix: odd keys under it are read (and skipped) too.
        lay.component_alerts_dir("sniffer") + "garbage",
        lay.component_alerts_dir("sniffer") + "deeper/still",
    ]
    for key in read:
        assert viewed_component(lay, key) == "sniffer", key
        assert viewed_component(lay, key.encode()) == "sniffer", key


def test_keys_no_view_reads_belong_to_no_component() -> None:
    lay = Layout("/ml-defender")
    unread = [
        lay.active_config("sniffer"),
        lay.status("sniffer"),
        lay.history("sniffer", 3),
        lay.candidate("sniffer"),
        lay.instance("sniffer", "pod-1"),  # heartbeats change often and are watched apart
        lay.owner("sniffer"),
        lay.keyring_record,
        lay.alerts_dir + "sniffer",  # not under a component's alerts prefix
        lay.alerts_dir + "not a name/x",
        "/ml-defender-other/components/sniffer/metadata",  # another deployment's prefix
        "/elsewhere",
    ]
    for key in unread:
        assert viewed_component(lay, key) is None, key
