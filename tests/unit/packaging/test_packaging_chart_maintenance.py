"""The etcd maintenance CronJobs as rendered: backup into a PVC (off by default), a daily
defrag (on), both `kubectl defender` in the project image with etcd's root password."""

from __future__ import annotations

from typing import Any

from packaging_chart import Render, find


def _pod(cronjob: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return spec


def test_by_default_only_the_defrag_cronjob_runs(render: Render) -> None:
    objects = render()
    cron = find(objects, "CronJob")
    assert cron["metadata"]["name"] == "rel-ml-defender-etcd-defrag"
    assert cron["spec"]["schedule"] == "15 3 * * *"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    container = _pod(cron)["containers"][0]
    assert container["command"] == ["kubectl-defender"]
    assert container["args"][0] == "defrag"
    assert not [o for o in objects if o["kind"] == "PersistentVolumeClaim"]


def test_backup_cronjob_writes_to_its_claim_and_keeps_n(render: Render) -> None:
    objects = render(
        "--set", "etcd.backup.enabled=true", "--set", "etcd.backup.keep=5",
        "--set", "etcd.backup.schedule=0 * * * *",
    )  # fmt: skip
    cron = find(objects, "CronJob", "rel-ml-defender-etcd-backup")
    assert cron["spec"]["schedule"] == "0 * * * *"
    pod = _pod(cron)
    container = pod["containers"][0]
    assert container["args"][:3] == ["backup", "--dir=/backup", "--keep=5"]
    assert "--settings=/etc/ml-defender/config/defender.json" in container["args"]
    claim = find(objects, "PersistentVolumeClaim", "rel-ml-defender-etcd-backup")
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["backup"]["persistentVolumeClaim"]["claimName"] == "rel-ml-defender-etcd-backup"
    env = {e["name"]: e for e in container["env"]}
    assert env["DEFENDER_ETCD__USER"]["value"] == "root"
    assert env["DEFENDER_ETCD__PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "rel-ml-defender-etcd-auth",
        "key": "root",
    }
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["automountServiceAccountToken"] is False


def test_an_existing_claim_is_used_and_none_is_created(render: Render) -> None:
    objects = render(
        "--set", "etcd.backup.enabled=true", "--set", "etcd.backup.existingClaim=my-backups"
    )  # fmt: skip
    assert not [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
    pod = _pod(find(objects, "CronJob", "rel-ml-defender-etcd-backup"))
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["backup"]["persistentVolumeClaim"]["claimName"] == "my-backups"


def test_without_etcd_auth_no_password_is_mounted(render: Render) -> None:
    cron = find(render("--set", "etcd.auth.enabled=false"), "CronJob")
    assert "env" not in _pod(cron)["containers"][0]


def test_no_cronjob_for_an_external_etcd(render: Render) -> None:
    objects = render(
        "--set", "etcd.enabled=false", "--set", "externalEtcd.endpoints={http://e:2379}",
        "--set", "etcd.backup.enabled=true",
    )  # fmt: skip
    assert not [o for o in objects if o["kind"] == "CronJob"]
