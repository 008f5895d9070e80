"""What someone with etcd write access (no key) can put in front of an operator's terminal
through `kubectl defender`: forged alerts, heartbeats and keys are shown (security.md: "Forge
alerts: add noise"), but never as terminal control sequences."""

from __future__ import annotations

import json
import re
import time
import unicodedata
from datetime import UTC, datetime

import pytest
from cli_e2e_support import Store

pytestmark = pytest.mark.etcd

# Clears the screen, sets the window title, hides what follows, a carriage return and a line
# feed that start a fake row, a C1 CSI and a right-to-left override: each lets a forged record
# rewrite what the operator reads.
HOSTILE = "x\x1b[2J\x1b]0;pwned\x07\x1b[8mhidden\r\nFAKE ROW\x9b31m\u202eevil"
# What the plugin's own colours put on a terminal, and nothing else.
OWN_COLOUR = re.compile(r"\x1b\[[0-9;]*m")


def _raw(text: str) -> list[str]:
    return [
        ch
        for ch in OWN_COLOUR.sub("", text)
        if ch != "\n" and (unicodedata.category(ch) == "Cc" or "\u202a" <= ch <= "\u2069")
    ]


def test_forged_records_print_no_control_characters(store: Store) -> None:
    layout, raw = store.client.layout, store.client.store
    now = datetime.now(UTC).isoformat()
    alert = {
        "kind": "UnknownKey",
        "component": "sniffer",
        "instance": HOSTILE,
        "detail": HOSTILE,
        "time": now,
    }
    raw.put(layout.alert("sniffer", time.time_ns(), "forged"), json.dumps(alert).encode())
    beat = {
        "component": "sniffer",
        "instance": "sniffer-01",
        "pod": HOSTILE,
        "node_id": HOSTILE,
        "status": "RUNNING",
        "time": now,
        "software_version": HOSTILE,
        "key_fingerprint": HOSTILE,
        "last_error": {"reason": HOSTILE, "detail": "d"},
    }
    raw.put(layout.instance("sniffer", "sniffer-01"), json.dumps(beat).encode())
    raw.put(f"{store.prefix}/junk/{HOSTILE}", HOSTILE.encode())
    for args in (["alerts"], ["status"], ["dump"]):
        for colour in (False, True):
            result = store.cli(*args, colour=colour)
            assert result.code == 0, result.err
            assert "hidden" in result.out, "the forged text is shown"
            assert _raw(result.out) == [], f"{args}: {result.out!r}"
            assert "x\\x1b[2J\\x1b]0;pwned\\x07" in result.out, "escaped, visibly"
    as_json = store.cli("alerts", "-o", "json").json()
    assert as_json[0]["detail"] == HOSTILE, "-o json keeps the value (JSON escapes it itself)"
