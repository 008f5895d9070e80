"""Samples → MASTER/ACTIVE in etcd and Ready; edit → version 2; invalid edit refused; rollback;
retention on delete. Everything against the real control plane and defender etcd."""

from __future__ import annotations

import subprocess
import time
from typing import Any

import pytest
import yaml
from operator_e2e_support import SAMPLES, OperatorRun, free_port, kubectl, metric, wait_for

from defender_config import ChangeKind, NotFoundError, config_digest, contract, validate_config

SAMPLE_NAMES = ["sniffer", "ml-detector", "firewall", "rag"]

pytestmark = [pytest.mark.cluster, pytest.mark.etcd]


def _labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": name}


def _ready(run: OperatorRun, name: str) -> bool:
    cond = run.condition(name, "Ready")
    return cond is not None and cond["status"] == "True"


def _start_instances(run: OperatorRun, names: list[str]) -> None:
    for name in names:
        run.deployment(name, _labels(name))
    for name in names:
        pods = wait_for(f"a pod of {name}", lambda n=name: run.pods(_labels(n)))  # type: ignore[misc]
        run.heartbeat(name, pods[0].metadata.name)


def test_samples_are_seeded_ready_and_listed(operator_run: OperatorRun) -> None:
    run = operator_run
    run.start()
    kubectl("apply", "-n", run.namespace, "-f", str(SAMPLES))
    # Seeding does not wait for pods: MASTER and ACTIVE v1 appear first.
    for name in SAMPLE_NAMES:
        run.wait_active_version(name, 1)
    configs = run.configs()
    for name in SAMPLE_NAMES:
        doc = yaml.safe_load((SAMPLES / f"{name}.yaml").read_text())
        expected = validate_config(doc["spec"]["componentType"], doc["spec"]["config"])
        assert configs.get_master(name) == expected
        active = configs.get_active(name)
        assert (active.version, active.config) == (1, expected)
        status = run.get(name)["status"]
        assert status["masterDigest"] == status["activeDigest"] == config_digest(expected)
        # Every condition is present from the first visit; HeartbeatCadence, EtcdHealthy and
        # Corrupt (informational) join once a monitor pass compared the instances with
        # spec.heartbeat, an etcd health check ran, and the first scrub ran.
        informational = {"HeartbeatCadence", "EtcdHealthy", "Corrupt"}
        types = {c["type"] for c in status["conditions"]} - informational
        assert types == {
            "Ready",
            "ConfigSynced",
            "Heartbeating",
            "KeyCurrent",
            "Misconfigured",
            "KeyUnavailable",
        }
    # Without pods a component is not Ready, and says why.
    run.wait_condition("sniffer", "Heartbeating", reason="NoPods")
    assert run.condition("sniffer", "Ready")["status"] == "False"  # type: ignore[index]

    _start_instances(run, SAMPLE_NAMES)
    for name in SAMPLE_NAMES:
        wait_for(f"{name} Ready", lambda n=name: _ready(run, n), timeout=60)  # type: ignore[misc]

    out = kubectl("get", contract.PLURAL, "-n", run.namespace).stdout
    header = out.splitlines()[0].split()
    assert header == [
        "NAME",
        "TYPE",
        "READY",
        "ACTIVE",
        "INSTANCES",
        "HEARTBEAT",
        "RESTARTS",
        "AGE",
    ]
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert sorted(rows) == sorted(SAMPLE_NAMES)
    for name in SAMPLE_NAMES:
        assert rows[name][1:5] == [name, "True", "1", "1/1"], out
        assert rows[name][6] == "0"
    # The short name and category work too.
    assert "sniffer" in kubectl("get", "dfc", "-n", run.namespace).stdout
    assert "sniffer" in kubectl("get", "defender", "-n", run.namespace).stdout
    # The namespace got its keyring copy, and it holds the operator's key. (The copy also
    # gets registrations.json once the operator publishes its components' registrations, on
    # its own clock: the source never holds one.)
    source = run.core.read_namespaced_secret("ml-defender-keyring", run.operator_namespace)
    copy = run.core.read_namespaced_secret("ml-defender-keyring", run.namespace)
    assert copy.data["keyring.json"] == source.data["keyring.json"]
    assert set(copy.data) <= {"keyring.json", "registrations.json"}, set(copy.data)
    assert copy.metadata.labels["app.kubernetes.io/managed-by"] == "defender-operator"


def _set_config(run: OperatorRun, name: str, config: dict[str, Any]) -> None:
    run.patch(name, {"spec": {"config": config}})


def test_edit_commits_version_2_invalid_is_refused_and_rollback(
    operator_run: OperatorRun,
) -> None:
    run = operator_run
    run.start()
    doc = run.apply_sample("firewall")
    run.wait_active_version("firewall", 1)
    configs = run.configs()

    edited = dict(doc["spec"]["config"], block_ttl_seconds=600)
    _set_config(run, "firewall", edited)
    run.wait_active_version("firewall", 2)
    assert configs.get_active("firewall").config["block_ttl_seconds"] == 600
    assert configs.get_master("firewall")["block_ttl_seconds"] == 3600
    run.wait_event("firewall", "Committed")

    # 10.0.0.1/8 is a host address with a network mask: the library's model refuses it.
    bad_rule = {"id": "bad", "action": "deny", "src_cidr": "10.0.0.1/8"}
    invalid = dict(edited, rules=[*edited["rules"], bad_rule])
    _set_config(run, "firewall", invalid)
    synced = run.wait_condition("firewall", "ConfigSynced", status="False")
    assert synced["reason"] == "ConfigInvalid"
    assert "CIDR" in synced["message"]
    assert run.condition("firewall", "Ready")["status"] == "False"  # type: ignore[index]
    active = configs.get_active("firewall")
    assert active.version == 2 and active.config["block_ttl_seconds"] == 600
    run.wait_event("firewall", "ConfigInvalid")

    # The API server's schema refuses what never reaches the operator.
    refused = _on_firewall(
        run,
        "patch",
        "--type=merge",
        "-p",
        '{"spec":{"heartbeat":{"intervalSeconds":0}}}',
        check=False,
    )
    assert refused.returncode != 0 and "intervalSeconds" in refused.stderr
    immutable = _on_firewall(
        run, "patch", "--type=merge", "-p", '{"spec":{"componentType":"rag"}}', check=False
    )
    assert immutable.returncode != 0 and "componentType is immutable" in immutable.stderr

    # Fix the config again, then roll back to MASTER by the documented command.
    _set_config(run, "firewall", edited)
    run.wait_condition("firewall", "ConfigSynced", status="True")
    _on_firewall(run, "annotate", f"{contract.ROLLBACK_ANNOTATION}=master")
    wait_for(
        "rollback to MASTER",
        lambda: (
            configs.get_active("firewall").digest == config_digest(configs.get_master("firewall"))
        ),
    )
    wait_for(
        "annotation removed",
        lambda: (
            contract.ROLLBACK_ANNOTATION
            not in run.get("firewall")["metadata"].get("annotations", {})
        ),
    )
    active = configs.get_active("firewall")
    version = active.version
    assert version is not None and version >= 3
    assert active.metadata is not None and active.metadata.change is ChangeKind.ROLLBACK
    run.wait_event("firewall", "RolledBack")
    run.wait_condition("firewall", "ConfigSynced", status="True", reason="ActiveDiffersFromSpec")
    # A rollback target that is neither `master` nor a number is refused and removed.
    _on_firewall(run, "annotate", f"{contract.ROLLBACK_ANNOTATION}=yesterday")
    run.wait_event("firewall", "RollbackRefused")
    assert configs.get_active("firewall").version == version
    # So is an empty one: MASTER is asked for by name, never by an annotation left blank.
    _on_firewall(run, "annotate", "--overwrite", f"{contract.ROLLBACK_ANNOTATION}=")
    wait_for(
        "empty rollback target refused",
        lambda: (
            sum(e.count or 1 for e in run.events("firewall") if e.reason == "RollbackRefused") >= 2
        ),
    )
    assert configs.get_active("firewall").version == version
    # The unchanged spec does not undo the rollback, also not after an operator restart.
    run.stop()
    run.start()
    wait_for("status refreshed", lambda: _ready_or_known(run))
    assert configs.get_active("firewall").version == version


def _on_firewall(
    run: OperatorRun, verb: str, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """``kubectl VERB`` on the firewall DefenderComponent."""
    return kubectl(verb, "defendercomponent", "firewall", "-n", run.namespace, *args, check=check)


def _ready_or_known(run: OperatorRun) -> bool:
    cond = run.condition("firewall", "ConfigSynced")
    return cond is not None and cond["status"] == "True"


@pytest.mark.parametrize("retention", ["Keep", "Purge"])
def test_delete_applies_retention(operator_run: OperatorRun, retention: str) -> None:
    run = operator_run
    port = free_port()
    run.start(DEFENDER_OPERATOR_METRICS_PORT=str(port))
    run.apply_sample("rag", retention=retention)
    run.wait_active_version("rag", 1)
    # Only Purge holds the resource with a finalizer (the data must go first).
    finalizers = run.get("rag")["metadata"].get("finalizers") or []
    assert (contract.FINALIZER in finalizers) is (retention == "Purge"), finalizers
    synced = 'defender_operator_component_condition{component="rag",condition="ConfigSynced"'
    wait_for("rag's gauges", lambda: metric(port, synced + ',status="True"}') == 1.0)
    configs = run.configs()
    run.custom.delete_namespaced_custom_object(
        contract.API_GROUP, contract.API_VERSION, run.namespace, contract.PLURAL, "rag"
    )
    wait_for("resource gone", lambda: _gone(run, "rag"))
    if retention == "Keep":
        assert configs.get_active("rag").version == 1
    else:
        with pytest.raises(NotFoundError):
            configs.get_master("rag")
        assert configs.get_metadata("rag") is None
    # The monitor daemon ended with the resource: no pass brings its gauges back (one a second
    # while it ran: DEFENDER_OPERATOR_MONITOR_INTERVAL_SECONDS=1).
    wait_for("rag's gauges gone", lambda: metric(port, synced + ',status="True"}') == 0.0)
    time.sleep(3.0)
    assert metric(port, synced + ',status="True"}') == 0.0, run.log_tail()


def _gone(run: OperatorRun, name: str) -> bool:
    from kubernetes.client import ApiException

    try:
        run.get(name)
    except ApiException as exc:
        return exc.status == 404
    return False


def test_custom_component_needs_and_uses_its_schema(operator_run: OperatorRun) -> None:
    run = operator_run
    run.start()
    base: dict[str, Any] = {
        "apiVersion": contract.GROUP_VERSION,
        "kind": contract.KIND,
        "metadata": {"name": "honeypot"},
        "spec": {
            "componentType": "custom",
            "selector": {"matchLabels": {"app.kubernetes.io/name": "honeypot"}},
            "config": {"ports": [2222, 2323], "banner": "SSH-2.0-OpenSSH_9.6"},
        },
    }
    from kubernetes.client import ApiException

    # The API server's CEL rule refuses custom without a schema.
    with pytest.raises(ApiException) as info:
        run.custom.create_namespaced_custom_object(
            contract.API_GROUP, contract.API_VERSION, run.namespace, contract.PLURAL, base
        )
    assert "custom needs customSchema" in str(info.value.body)
    schema = {
        "type": "object",
        "required": ["ports"],
        "properties": {"ports": {"type": "array", "items": {"type": "integer", "maximum": 65535}}},
    }
    base["spec"]["customSchema"] = schema
    run.custom.create_namespaced_custom_object(
        contract.API_GROUP, contract.API_VERSION, run.namespace, contract.PLURAL, base
    )
    run.wait_active_version("honeypot", 1)
    assert run.configs().get_master("honeypot")["ports"] == [2222, 2323]
    run.patch("honeypot", {"spec": {"config": {"ports": [70000]}}})
    cond = run.wait_condition("honeypot", "ConfigSynced", status="False")
    assert "70000" in cond["message"]
    assert run.configs().get_active("honeypot").version == 1


def test_invalid_config_reverts_to_master_once(operator_run: OperatorRun) -> None:
    run = operator_run
    run.start()
    doc = run.apply_sample(
        "firewall", rollout={"onInvalidConfig": "RevertToMaster", "historyLimit": 5}
    )
    run.wait_active_version("firewall", 1)
    configs = run.configs()
    _set_config(run, "firewall", dict(doc["spec"]["config"], dry_run=True))
    wait_for("version 2", lambda: configs.get_active("firewall").version == 2)
    _set_config(run, "firewall", dict(doc["spec"]["config"], default_policy="maybe"))
    wait_for("reverted as version 3", lambda: configs.get_active("firewall").version == 3)
    active = configs.get_active("firewall")
    assert active.config["dry_run"] is False
    assert active.metadata is not None and active.metadata.change is ChangeKind.INVALID_REVERT
    run.wait_event("firewall", "RevertedToMaster")
    # A resume with the same invalid spec does not revert again.
    before = _count(run, "firewall", "ConfigInvalid")
    run.stop()
    run.start()
    wait_for("resume handled", lambda: _count(run, "firewall", "ConfigInvalid") > before)
    time.sleep(2)
    assert configs.get_active("firewall").version == 3


def _count(run: OperatorRun, name: str, reason: str) -> int:
    return sum(e.count or 1 for e in run.events(name) if e.reason == reason)
