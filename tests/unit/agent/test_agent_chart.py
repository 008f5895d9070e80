"""The agent sidecar helpers (charts/ml-defender/templates/_agent.tpl) rendered by real helm.

The example chart charts/ml-defender/examples/agent-sidecar uses the helpers exactly as a
component chart would; its rendered env must be accepted by the agent's own settings parser.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from defender_agent import AgentSettingsError, load_agent_settings
from defender_devcluster import ToolNotFoundError, tool
from defender_devcluster.pytest_plugin import missing_tool

REPO = Path(__file__).resolve().parents[3]
EXAMPLE = REPO / "charts" / "ml-defender" / "examples" / "agent-sidecar"


@pytest.fixture(scope="module")
def helm() -> Path:
    try:
        return tool("helm")
    except ToolNotFoundError as exc:
        missing_tool(exc)


def render(helm: Path, *sets: str) -> subprocess.CompletedProcess[str]:
    args = [str(helm), "template", "demo", str(EXAMPLE)]
    for item in sets:
        args += ["--set", item]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


def deployment(helm: Path, *sets: str) -> dict[str, Any]:
    proc = render(helm, *sets)
    assert proc.returncode == 0, proc.stderr
    # Nothing to warn about either (helm warns about symlinked files in a chart).
    assert proc.stderr == "", proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    [dep] = [d for d in docs if d["kind"] == "Deployment"]
    return dep


def containers(dep: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in dep["spec"]["template"]["spec"]["containers"]}


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_example_pod_has_agent_beside_component(helm: Path) -> None:
    dep = deployment(helm)
    pod = dep["spec"]["template"]["spec"]
    assert pod["shareProcessNamespace"] is True
    by_name = containers(dep)
    assert set(by_name) == {"sniffer", "defender-agent"}
    agent, component = by_name["defender-agent"], by_name["sniffer"]
    env = env_of(agent)
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["DEFENDER_AGENT_RELOAD_PROCESS"] == "sniffer"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["defender-shared"]["emptyDir"]["medium"] == "Memory"
    assert volumes["defender-shared-keyring"]["secret"]["secretName"] == "ml-defender-keyring"
    agent_mounts = {m["name"]: m for m in agent["volumeMounts"]}
    comp_mounts = {m["name"]: m for m in component["volumeMounts"]}
    # Same shared directory in both containers; only the agent may write it.
    assert (
        agent_mounts["defender-shared"]["mountPath"] == comp_mounts["defender-shared"]["mountPath"]
    )
    assert comp_mounts["defender-shared"]["readOnly"] is True
    assert not agent_mounts["defender-shared"].get("readOnly", False)
    assert agent_mounts["defender-shared-keyring"]["readOnly"] is True
    assert (
        env["DEFENDER_AGENT_KEYRING_PATH"] == agent_mounts["defender-shared-keyring"]["mountPath"]
    )
    assert env["DEFENDER_AGENT_OUTPUT_PATH"].startswith(
        agent_mounts["defender-shared"]["mountPath"] + "/"
    )
    # The key never reaches the component container.
    assert all("keyring" not in m["name"] for m in component["volumeMounts"])


def test_rendered_env_is_valid_agent_settings(helm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = env_of(containers(deployment(helm))["defender-agent"])
    for key, value in env.items():
        # The kubelet fills valueFrom fields; use a plausible pod name for the downward API.
        monkeypatch.setenv(key, value if isinstance(value, str) else "sniffer-6c9d-x2")
    settings = load_agent_settings([])
    assert settings.component == "sniffer"
    assert settings.component_type == "sniffer"
    assert settings.instance == "sniffer-6c9d-x2"
    assert settings.reload_method == "signal"
    assert settings.etcd_endpoints is not None and len(settings.etcd_endpoints) == 3


def test_http_reload(helm: Path) -> None:
    dep = deployment(helm, "agent.reload.method=http", "reloadUrl=http://127.0.0.1:8080/-/reload")
    env = env_of(containers(dep)["defender-agent"])
    assert env["DEFENDER_AGENT_RELOAD_URL"] == "http://127.0.0.1:8080/-/reload"
    assert env["DEFENDER_AGENT_RELOAD_HTTP_METHOD"] == "POST"
    assert "DEFENDER_AGENT_RELOAD_PROCESS" not in env


def test_http_reload_without_url_fails(helm: Path) -> None:
    proc = render(helm, "agent.reload.method=http")
    assert proc.returncode != 0
    assert "pass url" in proc.stderr


def test_missing_component_fails(helm: Path) -> None:
    proc = render(helm, "component=")
    assert proc.returncode != 0
    assert "component is required" in proc.stderr


def test_no_endpoints_outside_the_release_fails(helm: Path) -> None:
    proc = render(helm, "agent.etcdEndpoints=null")
    assert proc.returncode != 0
    assert "agent.etcdEndpoints" in proc.stderr


def test_tls_secret_is_mounted_and_configured(helm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dep = deployment(helm, "agent.etcdTlsSecretName=etcd-client")
    agent = containers(dep)["defender-agent"]
    env = env_of(agent)
    assert env["DEFENDER_AGENT_ETCD_CA_FILE"].endswith("/ca.crt")
    mounts = {m["name"]: m["mountPath"] for m in agent["volumeMounts"]}
    assert env["DEFENDER_AGENT_ETCD_CERT_FILE"].startswith(mounts["defender-shared-etcd-tls"])
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["defender-shared-etcd-tls"]["secret"]["secretName"] == "etcd-client"


def test_no_signal_without_shared_process_namespace(helm: Path) -> None:
    dep = deployment(helm, "agent.reload.method=none")
    assert dep["spec"]["template"]["spec"]["shareProcessNamespace"] is False
    assert "DEFENDER_AGENT_RELOAD_PROCESS" not in env_of(containers(dep)["defender-agent"])


def test_plaintext_is_allowed_only_where_the_values_say(
    helm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Default: no DEFENDER_AGENT_ALLOW_PLAINTEXT, the agent refuses unencrypted configs.
    assert "DEFENDER_AGENT_ALLOW_PLAINTEXT" not in env_of(
        containers(deployment(helm))["defender-agent"]
    )
    assert "DEFENDER_AGENT_ALLOW_PLAINTEXT" not in env_of(
        containers(deployment(helm, "config.plaintextComponents={rag}"))["defender-agent"]
    )
    env = env_of(
        containers(deployment(helm, "config.plaintextComponents={sniffer}"))["defender-agent"]
    )
    assert env["DEFENDER_AGENT_ALLOW_PLAINTEXT"] == "true"
    for key, value in env.items():
        monkeypatch.setenv(key, value if isinstance(value, str) else "sniffer-6c9d-x2")
    settings = load_agent_settings([])
    assert settings.allow_plaintext is True


# --- signals across users (privileged components) ----------------------------------------------


def test_signal_same_user_runs_the_agent_as_the_component_uid(helm: Path) -> None:
    agent = containers(deployment(helm, "processUser=4242"))["defender-agent"]
    security = agent["securityContext"]
    assert (security["runAsUser"], security["runAsNonRoot"]) == (4242, True)
    # The rest of the hardening stays.
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["allowPrivilegeEscalation"] is False


def test_signal_to_a_root_component_as_the_same_user(helm: Path) -> None:
    # The privileged sniffer runs as root: the same UID is 0, with no capability at all.
    security = containers(deployment(helm, "processUser=0"))["defender-agent"]["securityContext"]
    assert (security["runAsUser"], security["runAsNonRoot"]) == (0, False)
    assert security["capabilities"] == {"drop": ["ALL"]}


def test_signal_with_cap_kill(helm: Path) -> None:
    security = containers(deployment(helm, "agent.reload.signalAccess=capKill"))["defender-agent"][
        "securityContext"
    ]
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["KILL"]}
    # KILL only reaches the effective set of a root process.
    assert (security["runAsUser"], security["runAsNonRoot"]) == (0, False)
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True


def test_no_signal_no_user_change(helm: Path) -> None:
    security = containers(deployment(helm, "agent.reload.method=none", "processUser=0"))[
        "defender-agent"
    ]["securityContext"]
    assert "runAsUser" not in security and "add" not in security["capabilities"]


def test_unknown_signal_access_fails(helm: Path) -> None:
    proc = render(helm, "agent.reload.signalAccess=sudo")
    assert proc.returncode != 0
    assert "is not sameUser or capKill" in proc.stderr


# --- component health checks -------------------------------------------------------------------


def _settings_of(agent: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    # Only what the chart rendered: none of the caller's agent variables.
    for key in list(os.environ):
        if key.startswith("DEFENDER_AGENT_") or key in ("POD_NAME", "NODE_NAME"):
            monkeypatch.delenv(key)
    for key, value in env_of(agent).items():
        monkeypatch.setenv(key, value if isinstance(value, str) else "sniffer-6c9d-x2")
    return load_agent_settings([])


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        (["healthCheck=process"], {"health_check": "process", "health_process": "sniffer"}),
        (
            ["healthCheck=http", "healthUrl=http://127.0.0.1:9090/healthz"],
            {"health_check": "http", "health_url": "http://127.0.0.1:9090/healthz"},
        ),
        (
            ["healthCheck=tcp", "healthTcp=127.0.0.1:5571"],
            {"health_check": "tcp", "health_tcp": "127.0.0.1:5571"},
        ),
        (
            ["healthCheck=exec", "healthExec=/bin/rag-ping --quiet"],
            {"health_check": "exec", "health_exec": "/bin/rag-ping --quiet"},
        ),
        (
            [
                "healthCheck=file",
                "healthFile=/var/run/ml-defender/config/alive",
                "healthFileMaxAgeSeconds=20",
            ],
            {"health_check": "file", "health_file_max_age_seconds": 20.0},
        ),
    ],
)
def test_each_health_check_renders_valid_agent_settings(
    helm: Path, monkeypatch: pytest.MonkeyPatch, sets: list[str], expected: dict[str, Any]
) -> None:
    dep = deployment(helm, *sets)
    settings = _settings_of(containers(dep)["defender-agent"], monkeypatch)
    for field, value in expected.items():
        assert getattr(settings, field) == value
    assert settings.health_start_grace_seconds == 30


def test_process_health_check_shares_the_process_namespace(helm: Path) -> None:
    dep = deployment(helm, "agent.reload.method=none", "healthCheck=process")
    assert dep["spec"]["template"]["spec"]["shareProcessNamespace"] is True


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["healthCheck=http"], "pass healthUrl"),
        (["healthCheck=tcp"], "pass healthTcp"),
        (["healthCheck=exec"], "pass healthExec"),
        (["healthCheck=file", "healthFile=/x"], "pass healthFile and healthFileMaxAgeSeconds"),
        (["healthCheck=ping"], "is not one of none, process"),
    ],
)
def test_health_check_without_its_target_fails(helm: Path, sets: list[str], message: str) -> None:
    proc = render(helm, *sets)
    assert proc.returncode != 0
    assert message in proc.stderr


def test_status_port_is_rendered(helm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    agent = containers(deployment(helm, "agent.statusPort=8089"))["defender-agent"]
    assert agent["ports"] == [{"name": "agent-status", "containerPort": 8089}]
    assert _settings_of(agent, monkeypatch).status_port == 8089
    assert "ports" not in containers(deployment(helm))["defender-agent"]


# --- the agent calls only its own pod ----------------------------------------------------------


@pytest.mark.parametrize(
    "sets",
    [
        ["agent.reload.method=http", "reloadUrl=http://10.0.0.7:8080/-/reload"],
        ["agent.reload.method=http", "reloadUrl=http://sniffer.other-ns.svc/-/reload"],
        ["agent.reload.method=http", "reloadUrl=https://127.0.0.1:8443/-/reload"],
        ["agent.reload.method=http", "reloadUrl=http://127.1:8080/-/reload"],
        ["healthCheck=http", "healthUrl=http://169.254.169.254/latest/meta-data/"],
        ["healthCheck=http", "healthUrl=http://127.0.0.1@evil.example/x"],
        ["healthCheck=tcp", "healthTcp=db.other-ns.svc:5432"],
        ["healthCheck=tcp", "healthTcp=127.0.0.256:5432"],
    ],
)
def test_an_endpoint_outside_the_pod_fails_the_render(
    helm: Path, monkeypatch: pytest.MonkeyPatch, sets: list[str]
) -> None:
    # The chart and the agent agree: what the chart refuses, the agent refuses too.
    proc = render(helm, *sets)
    assert proc.returncode != 0
    assert "the agent calls only the component in its own pod" in proc.stderr or (
        "must start with http://" in proc.stderr
    )
    ok = deployment(helm)
    agent = containers(ok)["defender-agent"]
    name, value = sets[1].split("=", 1)
    env_name = {
        "reloadUrl": "DEFENDER_AGENT_RELOAD_URL",
        "healthUrl": "DEFENDER_AGENT_HEALTH_URL",
        "healthTcp": "DEFENDER_AGENT_HEALTH_TCP",
    }[name]
    for key, item in env_of(agent).items():
        monkeypatch.setenv(key, item if isinstance(item, str) else "sniffer-6c9d-x2")
    monkeypatch.setenv(env_name, value)
    monkeypatch.setenv("DEFENDER_AGENT_RELOAD_METHOD", "none")
    with pytest.raises(AgentSettingsError, match=r"own pod|http://"):
        load_agent_settings([])


@pytest.mark.parametrize(
    "sets",
    [
        ["agent.reload.method=http", "reloadUrl=http://localhost:8080/-/reload"],
        ["agent.reload.method=http", "reloadUrl=http://[::1]:8080/-/reload"],
        ["healthCheck=http", "healthUrl=http://127.0.0.9:9090/healthz"],
        ["healthCheck=tcp", "healthTcp=[::1]:5571"],
        ["healthCheck=tcp", "healthTcp=localhost:5571"],
    ],
)
def test_a_loopback_endpoint_renders_settings_the_agent_accepts(
    helm: Path, monkeypatch: pytest.MonkeyPatch, sets: list[str]
) -> None:
    agent = containers(deployment(helm, *sets))["defender-agent"]
    _settings_of(agent, monkeypatch)


# --- the shared volume holds two files of the library's cap ------------------------------------

_BINARY = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}


def _quantity_bytes(text: str) -> int:
    for suffix, factor in _BINARY.items():
        if text.endswith(suffix):
            return int(text[: -len(suffix)]) * factor
    return int(text)


def test_the_shared_volume_holds_the_largest_config_twice(helm: Path) -> None:
    # The agent writes a temporary file beside the old one and renames it: with a volume smaller
    # than two files of the cap, a config the library accepts fills it (ENOSPC or an eviction).
    from defender_agent._core import DEFAULT_MAX_FILE_BYTES
    from defender_config import EnvelopeOptions

    cap = EnvelopeOptions().max_decompressed_bytes
    assert cap == DEFAULT_MAX_FILE_BYTES  # the agent's file is never larger than the cap
    needed = 2 * cap + (1 << 20)  # and room for the component's own small files
    chart_values = yaml.safe_load((REPO / "charts" / "ml-defender" / "values.yaml").read_text())
    example_values = yaml.safe_load((EXAMPLE / "values.yaml").read_text())
    assert _quantity_bytes(chart_values["agent"]["sharedSizeLimit"]) >= needed
    assert _quantity_bytes(example_values["agent"]["sharedSizeLimit"]) >= needed
    volumes = {v["name"]: v for v in deployment(helm)["spec"]["template"]["spec"]["volumes"]}
    assert _quantity_bytes(volumes["defender-shared"]["emptyDir"]["sizeLimit"]) >= needed


def test_the_agent_memory_limit_takes_any_config_a_defender_component_can_carry(
    helm: Path,
) -> None:
    # Under the limit the agent refuses what it cannot parse rather than being OOM-killed in a
    # loop (defender_agent._memory); the default must still take every config that can come
    # through a DefenderComponent, whose whole object is bounded by the API server's etcd
    # request limit. 70 MiB: what the agent holds idle (measured, CPython 3.11).
    from defender_agent._memory import config_budget
    from defender_config._settings import ETCD_REQUEST_LIMIT_BYTES

    idle = 70 << 20
    chart_values = yaml.safe_load((REPO / "charts" / "ml-defender" / "values.yaml").read_text())
    example_values = yaml.safe_load((EXAMPLE / "values.yaml").read_text())
    containers = deployment(helm)["spec"]["template"]["spec"]["containers"]
    (agent,) = [c for c in containers if c["name"] == "defender-agent"]
    for limit in (
        chart_values["agent"]["resources"]["limits"]["memory"],
        example_values["agent"]["resources"]["limits"]["memory"],
        agent["resources"]["limits"]["memory"],
    ):
        budget = config_budget(_quantity_bytes(limit), idle)
        assert budget is not None and budget >= ETCD_REQUEST_LIMIT_BYTES, limit


@pytest.mark.parametrize(
    ("sets", "restored"), [([], True), (["agent.restoreEditedFile=false"], False)]
)
def test_restore_edited_file_is_rendered(
    helm: Path, monkeypatch: pytest.MonkeyPatch, sets: list[str], restored: bool
) -> None:
    agent = containers(deployment(helm, *sets))["defender-agent"]
    assert env_of(agent)["DEFENDER_AGENT_RESTORE_EDITED_FILE"] == str(restored).lower()
    assert _settings_of(agent, monkeypatch).restore_edited_file is restored


def test_restore_edited_file_unset_leaves_the_agent_default(
    helm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A component chart's copy of the agent values from before the value existed.
    agent = containers(deployment(helm, "agent.restoreEditedFile=null"))["defender-agent"]
    assert "DEFENDER_AGENT_RESTORE_EDITED_FILE" not in env_of(agent)
    assert _settings_of(agent, monkeypatch).restore_edited_file is True


def test_restore_edited_file_that_is_not_a_boolean_fails(helm: Path) -> None:
    proc = subprocess.run(
        [str(helm), "template", "demo", str(EXAMPLE), "--set-string", "agent.restoreEditedFile=no"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode != 0
    assert "agent.restoreEditedFile must be true or false" in proc.stderr


# Every way a component chart may call the helpers: the reload and health options, other volume
# names and paths, the agent's TLS and auth variants, capKill.
RENDERINGS = [
    (),
    ("agent.reload.method=http", "reloadUrl=http://127.0.0.1:8080/-/reload"),
    (
        "healthCheck=file",
        "healthFile=/var/run/ml-defender/config/alive",
        "healthFileMaxAgeSeconds=60",
    ),
    ("healthCheck=process",),
    (
        "agent.sharedVolumeName=cfg",
        "agent.sharedMountPath=/srv/cfg",
        "agent.sharedSizeLimit=64Mi",
        "agent.keyringMountPath=/srv/keys",
    ),
    ("agent.etcdTlsSecretName=my-etcd-client", "agent.etcdAuth.enabled=false"),
    ("agent.etcdCaSecretName=", "agent.etcdAuth.enabled=false"),
    ("agent.reload.signalAccess=capKill",),
]


@pytest.mark.parametrize("sets", RENDERINGS, ids=lambda s: ",".join(s) or "defaults")
def test_nothing_the_pod_writes_reaches_the_node_s_disk_and_the_key_stays_read_only(
    helm: Path, sets: tuple[str, ...]
) -> None:
    """docs/security.md, "In memory only": the agent writes only the decoded config, to an
    emptyDir with `medium: Memory`. Whatever the rendering, every volume a container of the pod
    may write is such an emptyDir (the agent's output path lies on one), the keyring is
    mounted read-only into the agent and into no other container."""
    dep = deployment(helm, *sets)
    pod = dep["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    agent_writes: list[str] = []
    for container in pod["containers"] + pod.get("initContainers", []):
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if not mount.get("readOnly", False):
                assert volume.get("emptyDir", {}).get("medium") == "Memory", (container, mount)
                if container["name"] == "defender-agent":
                    agent_writes.append(mount["mountPath"])
            if "secret" in volume and "keyring" in volume["secret"]["secretName"]:
                assert container["name"] == "defender-agent", "the key reached the component"
                assert mount.get("readOnly") is True
    agent = containers(dep)["defender-agent"]
    output = env_of(agent)["DEFENDER_AGENT_OUTPUT_PATH"]
    assert any(output.startswith(path + "/") for path in agent_writes), (output, agent_writes)
    # Nothing else is writable: the root filesystem is read-only. No privilege either, but
    # CAP_KILL as root where capKill asks for it (docs/agent.md); else the pod's UID 10001.
    sc = agent["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    cap_kill = "agent.reload.signalAccess=capKill" in sets
    assert sc["capabilities"].get("add", []) == (["KILL"] if cap_kill else [])
    user = sc.get("runAsUser", pod["securityContext"]["runAsUser"])
    assert user == (0 if cap_kill else 10001)
