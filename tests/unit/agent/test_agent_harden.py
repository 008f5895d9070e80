"""A component sharing the agent's process namespace under the agent's UID cannot read the
agent's environment (the etcd password) or its files (the mounted keyring) through /proc: the
agent makes itself not dumpable (defender_agent._harden). Each test starts a stand-in agent and
a stand-in component as one unprivileged UID (root could read anything) and has the component
try; the first test shows the attack works on a process that did not harden itself."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SECRET = "etcd-password-for-the-test"
NOBODY = 65534

# The stand-in agent: started as whoever runs the tests; as root it first becomes the
# unprivileged user (which the kernel marks not dumpable: a plain agent, started as that user,
# is dumpable, so that is restored), then hardens itself or not.
AGENT = f"""
import ctypes, os, sys, time
from defender_agent._harden import forbid_inspection
if os.geteuid() == 0:
    os.setgid({NOBODY})
    os.setuid({NOBODY})
    ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE 1
if sys.argv[1] == "hardened" and not forbid_inspection():
    sys.exit("not hardened")
print("ready", flush=True)
time.sleep(60)
"""


def _as_the_agents_user() -> None:
    if os.geteuid() == 0:
        os.setgid(NOBODY)
        os.setuid(NOBODY)


def _component_reads(mode: str) -> str:
    """What the stand-in component (`cat`, `ls` as the agent's user) gets of the agent."""
    agent = subprocess.Popen(
        [sys.executable, "-c", AGENT, mode],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "DEFENDER_ETCD_PASSWORD": SECRET},
        stdout=subprocess.PIPE,
    )
    try:
        assert agent.stdout is not None
        assert agent.stdout.readline() == b"ready\n"
        seen = []
        for what, argv in (
            ("environ", ["cat", f"/proc/{agent.pid}/environ"]),
            ("root", ["ls", f"/proc/{agent.pid}/root/"]),
        ):
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=30, preexec_fn=_as_the_agents_user
            )
            refused = done.returncode != 0 and "Permission denied" in done.stderr
            seen.append(f"{what} refused" if refused else f"{what} read: {done.stdout}")
        return "\n".join(seen)
    finally:
        agent.kill()
        agent.wait()


pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="/proc and prctl are Linux's")


def test_without_hardening_the_component_reads_the_agents_secrets() -> None:
    seen = _component_reads("plain")
    assert SECRET in seen and "root read:" in seen


def test_the_agent_hardened_refuses_the_component_its_environment_and_files() -> None:
    seen = _component_reads("hardened")
    assert "environ refused" in seen and "root refused" in seen
    assert SECRET not in seen


def test_the_agent_hardens_itself_before_it_reads_its_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from defender_agent import __main__ as entry
    from defender_agent import _settings
    from defender_agent._errors import AgentSettingsError

    order: list[str] = []

    def settings(argv: object) -> None:
        order.append("settings")
        raise AgentSettingsError("stop here")

    monkeypatch.setattr(entry, "forbid_inspection", lambda: order.append("harden") or True)
    monkeypatch.setattr(_settings, "load_agent_settings", settings)
    assert entry.main([]) == entry.EXIT_SETTINGS
    assert order == ["harden", "settings"]
