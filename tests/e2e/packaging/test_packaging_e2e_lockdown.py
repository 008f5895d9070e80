"""The chart's default lock-down, run for real: three etcd members started from the chart's
ETCD_* settings with the certificates it generated (client and peer TLS), the access plan applied
by exactly the command of the operator pod's init container, then who may do what with the
credentials the chart put in its Secrets.

The NetworkPolicy half of "a pod without the agent's credentials cannot reach etcd" needs a real
node with an enforcing CNI; these processes have no pod network. What is tested here is the
etcd side: no credentials, or another component's, are refused by etcd itself.
"""

from __future__ import annotations

import base64
import re
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from chart_processes import (
    client_urls,
    lock_down,
    operator_pod,
    operator_settings,
    run_init_container,
    start_members,
    write_member_tls,
    write_operator_mounts,
)
from packaging_chart import find, render_chart
from prometheus_client import CollectorRegistry

from defender_config import (
    ConfigStore,
    DefenderClient,
    EnvelopeOptions,
    EtcdSettings,
    Heartbeater,
    Keyring,
    LibrarySettings,
    StoreAuthError,
)
from defender_config.store import EtcdStore, StoredValue
from defender_devcluster import ToolNotFoundError, free_ports, tool, wait_for
from defender_devcluster.pytest_plugin import missing_tool

COMPONENTS = {"firewall": "edge", "sniffer": "edge"}
PREFIX = "/ml-defender"
SCHEMA = {"type": "object", "properties": {"limit": {"type": "integer"}}}


def _tool(name: str) -> Path:
    try:
        return tool(name)
    except ToolNotFoundError as exc:
        missing_tool(exc)


def _values() -> list[str]:
    sets = []
    for i, (name, ns) in enumerate(COMPONENTS.items()):
        sets += [f"agent.components[{i}].name={name}", f"agent.components[{i}].namespace={ns}"]
    return ["--set", ",".join(sets)]


@pytest.fixture(scope="module")
def chart(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The chart rendered with default values plus two agent components, and the files its
    pods mount, laid out under root."""
    root = tmp_path_factory.mktemp("lockdown")
    objects = render_chart(_tool("helm"), *_values())
    write_member_tls(objects, root)
    write_operator_mounts(objects, root)
    return {"objects": objects, "root": root, "deployment": operator_pod(objects)}


@pytest.fixture(scope="module")
def members(chart: dict[str, Any]) -> Iterator[list[dict[str, Any]]]:
    with start_members(_tool("etcd"), chart["objects"], chart["root"], free_ports(9)) as procs:
        yield procs


def _init_step(
    chart: dict[str, Any], members: list[dict[str, Any]], plan_edit: Any = None
) -> subprocess.CompletedProcess[str]:
    return run_init_container(chart["objects"], chart["root"], members, plan_edit)


@pytest.fixture(scope="module")
def locked(chart: dict[str, Any], members: list[dict[str, Any]]) -> dict[str, Any]:
    lock_down(chart["objects"], chart["root"], members)
    settings = operator_settings(chart["objects"], chart["root"], members)
    settings["etcd"].update(timeout_seconds=5, retries=2)
    return {"settings": settings}


def _password(chart: dict[str, Any], secret: str, key: str) -> str:
    return base64.b64decode(find(chart["objects"], "Secret", secret)["data"][key]).decode()


def _store(locked: dict[str, Any], user: str | None, password: str | None) -> EtcdStore:
    etcd = {**locked["settings"]["etcd"], "user": user, "password": password}
    return EtcdStore(EtcdSettings(**etcd), registry=CollectorRegistry())


def _operator_env(chart: dict[str, Any]) -> tuple[str, str]:
    env = {e["name"]: e for e in chart["deployment"]["containers"][0]["env"]}
    ref = env["DEFENDER_ETCD__PASSWORD"]["valueFrom"]["secretKeyRef"]
    return env["DEFENDER_ETCD__USER"]["value"], _password(chart, ref["name"], ref["key"])


def _agent_credentials(chart: dict[str, Any], component: str) -> tuple[str, str]:
    secret = find(chart["objects"], "Secret", f"rel-ml-defender-etcd-agent-{component}")
    assert secret["metadata"]["namespace"] == COMPONENTS[component]
    data = secret["data"]
    return base64.b64decode(data["username"]).decode(), base64.b64decode(data["password"]).decode()


def _client(
    locked: dict[str, Any], keyring: Keyring, user: str, password: str, instance: str
) -> DefenderClient:
    settings = LibrarySettings(
        etcd=EtcdSettings(**{**locked["settings"]["etcd"], "user": user, "password": password}),
        envelope=EnvelopeOptions(),
        prefix=PREFIX,
    )
    return DefenderClient(settings, keyring, registry=CollectorRegistry(), instance=instance)


def test_operator_credentials_read_and_write_the_prefix(
    chart: dict[str, Any], locked: dict[str, Any]
) -> None:
    user, password = _operator_env(chart)
    with _store(locked, user, password) as store:
        store.put(f"{PREFIX}/components/anything/status", b"{}")
        got = store.get(f"{PREFIX}/components/anything/status")
        assert isinstance(got, StoredValue) and got.value == b"{}"
        assert store.delete(f"{PREFIX}/components/anything/status")
        # The operator's health view of etcd works under its own (non-root) user.
        report = store.health()
        assert report.quorum and report.healthy_count == 3, report
        # Nothing outside the prefix.
        with pytest.raises(StoreAuthError):
            store.put("/elsewhere", b"x")


def test_no_credentials_are_refused(locked: dict[str, Any]) -> None:
    # etcd answers INVALID_ARGUMENT "user name is empty"; the library types it as the auth
    # refusal it is.
    with _store(locked, None, None) as store:
        with pytest.raises(StoreAuthError, match="user name is empty"):
            store.get(f"{PREFIX}/components/firewall/active_config")
        with pytest.raises(StoreAuthError, match="user name is empty"):
            store.put(f"{PREFIX}/components/firewall/active_config", b"{}")
        assert not store.health().quorum


def test_wrong_password_is_refused(locked: dict[str, Any]) -> None:
    with pytest.raises(StoreAuthError, match="authentication as"):
        _store(locked, "ml-defender-agent-firewall", "not-the-password-at-all")


def test_agent_runs_with_its_credentials_and_nothing_more(
    chart: dict[str, Any], locked: dict[str, Any]
) -> None:
    keyring = Keyring.generate()
    op_user, op_password = _operator_env(chart)
    with _client(locked, keyring, op_user, op_password, "operator") as operator:
        for component in COMPONENTS:
            ConfigStore(operator).seed(
                component, {"limit": 1}, "custom", by="test-operator", json_schema=SCHEMA
            )
    user, password = _agent_credentials(chart, "firewall")
    assert user == "ml-defender-agent-firewall"
    with _client(locked, keyring, user, password, "fw-0") as agent:
        configs = ConfigStore(agent)
        # What the agent does: read ACTIVE and its metadata, watch it, heartbeat, report status,
        # write alerts.
        assert configs.get_active("firewall").config == {"limit": 1}
        assert configs.get_metadata("firewall") is not None
        seen: list[Any] = []
        handle = configs.watch_active("firewall", seen.append, initial=True)
        try:
            wait_for("the initial ACTIVE", lambda: seen, timeout=20)
        finally:
            handle.cancel()
        beat = Heartbeater(agent, "firewall", "fw-0", interval_seconds=1).start()
        beat.set_status("RUNNING")
        agent.alerter.event("LockdownProbe", "firewall", "written with the agent's user")
        beat.stop()
        assert agent.alerter.failed == 0

        store = agent.store
        layout = agent.layout
        for key in (
            layout.active_config("firewall"),
            layout.master_config("firewall"),
            layout.metadata("firewall"),
            layout.history("firewall", 1),
            layout.freeze("firewall"),
            layout.instance("sniffer", "s-0"),
            layout.active_config("sniffer"),
            layout.alert("sniffer", 1, "abcd"),
        ):
            with pytest.raises(StoreAuthError):
                store.put(key, b'{"default_policy": "allow"}')
        for key in (layout.active_config("sniffer"), layout.metadata("sniffer")):
            with pytest.raises(StoreAuthError):
                store.get(key)

    # What the agent wrote is there, read back with the operator's user.
    with _store(locked, op_user, op_password) as store:
        alerts = store.list_prefix(f"{PREFIX}/alerts/firewall/")
        assert any(b"LockdownProbe" in a.value for a in alerts)
        status = store.get(f"{PREFIX}/components/firewall/status")
        assert status is not None and b"STOPPED" in status.value


def test_the_init_step_is_idempotent_and_takes_back_extra_rights(
    chart: dict[str, Any], locked: dict[str, Any], members: list[dict[str, Any]]
) -> None:
    # Every operator start runs it again (two replicas may run it at once): a right granted by
    # hand, or left by an older chart, is revoked; what the plan grants stays.
    root = _password(chart, "rel-ml-defender-etcd-auth", "root")
    active = f"{PREFIX}/components/firewall/active_config"
    etcdctl = [
        str(_tool("etcdctl")),
        f"--endpoints={client_urls(members, 'https')[0]}",
        f"--cacert={chart['root'] / 'ca' / 'ca.crt'}",
        f"--user=root:{root}",
    ]
    subprocess.run(
        [*etcdctl, "role", "grant-permission", "ml-defender-agent-firewall", "readwrite", active],
        capture_output=True,
        timeout=30,
        check=True,
    )
    user, password = _agent_credentials(chart, "firewall")
    with _store(locked, user, password) as store:
        store.put(f"{PREFIX}/components/firewall/instances/fw-1", b"{}")
        before = store.get(active)
    # Two operator replicas starting together.
    with ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(lambda _: _init_step(chart, members), range(2)))
    assert [p.returncode for p in procs] == [0, 0], [p.stderr[-2000:] for p in procs]
    with _store(locked, user, password) as store:
        with pytest.raises(StoreAuthError):
            store.put(active, before.value if before else b"{}")
        store.put(f"{PREFIX}/components/firewall/instances/fw-1", b"{}")


def test_init_step_refuses_a_root_password_etcd_does_not_know(
    chart: dict[str, Any], locked: dict[str, Any], members: list[dict[str, Any]]
) -> None:
    wrong = chart["root"] / "wrong-root"
    wrong.write_text("w" * 32)
    proc = _init_step(chart, members, lambda plan: plan.update(root_password_file=str(wrong)))
    assert proc.returncode == 1
    # At once, not after the whole wait: a wrong password does not heal by retrying.
    assert "refused the root password" in proc.stderr and "retrying" not in proc.stderr
    assert "w" * 32 not in proc.stderr


def test_init_step_reports_what_etcd_refuses(
    chart: dict[str, Any], locked: dict[str, Any], members: list[dict[str, Any]]
) -> None:
    def empty_user(plan: dict[str, Any]) -> None:
        plan["agents"][0]["user"] = ""

    proc = _init_step(chart, members, empty_user)
    assert proc.returncode == 1
    # The call etcd refused is named, with its status; never the request (it may hold a password).
    assert re.search(r"etcd refused \w+: INVALID_ARGUMENT", proc.stderr), proc.stderr[-2000:]


def test_helm_test_pod_passes_with_ca_only_and_a_user_without_rights(
    chart: dict[str, Any], locked: dict[str, Any], members: list[dict[str, Any]]
) -> None:
    pod = find(render_chart(_tool("helm"), *_values()), "Pod", "rel-ml-defender-test-etcd")
    [container] = pod["spec"]["containers"]
    assert pod["metadata"]["labels"]["mldefender.io/etcd-client"] == "true"
    local = ",".join(client_urls(members, "https"))
    args = [
        f"--endpoints={local}"
        if a.startswith("--endpoints=")
        else a.replace("/etc/etcd/tls/client/", f"{chart['root']}/ca/")
        for a in container["args"]
    ]
    assert not [a for a in args if a.startswith(("--cert=", "--key=", "--user"))]
    env = {"PATH": "/usr/bin:/bin"}
    for var in container["env"]:
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        env[var["name"]] = _password(chart, ref["name"], ref["key"]) if ref else var["value"]
    assert env["ETCDCTL_USER"] == "ml-defender-health"
    etcdctl = [str(_tool("etcdctl")), *args]
    proc = subprocess.run(etcdctl, capture_output=True, text=True, timeout=60, check=False, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (proc.stdout + proc.stderr).count("is healthy") == 3
    # That user can do nothing else.
    user, password = env["ETCDCTL_USER"], env["ETCDCTL_PASSWORD"]
    with _store(locked, user, password) as store:
        with pytest.raises(StoreAuthError):
            store.get(f"{PREFIX}/components/firewall/active_config")
        with pytest.raises(StoreAuthError):
            store.put(f"{PREFIX}/components/firewall/instances/x", b"{}")
