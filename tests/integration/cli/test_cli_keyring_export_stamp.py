"""`kubectl defender keyring export` when the export cannot be recorded on the Secret, against
the real kube-apiserver: the file is complete and kept, the command says so with its own exit
code (3) and a typed error, and the Secret is left as it was.

RBAC that lets a person read the Secret but not patch it is the usual cause; a Secret deleted
between the read and the stamp is the other.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import pytest
import yaml
from kubernetes import client as k8s

from defender_cli import main
from defender_cli._errors import ExportNotStampedError
from defender_cli._keyring_commands import EXPORTED_ANNOTATION, EXPORTED_KEYS_ANNOTATION, _stamp
from defender_config import Keyring, read_keyring_backup
from defender_operator._keys import KeyringSecrets

pytestmark = [pytest.mark.cluster]

NAME = "ml-defender-keyring"


def _read_only_kubeconfig(
    core: k8s.CoreV1Api, rbac: k8s.RbacAuthorizationV1Api, namespace: str, admin: Path, to: Path
) -> Path:
    """A ServiceAccount allowed to get Secrets in `namespace`, and nothing else."""
    core.create_namespaced_service_account(
        namespace, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name="backup"))
    )
    rbac.create_namespaced_role(
        namespace,
        k8s.V1Role(
            metadata=k8s.V1ObjectMeta(name="read-secrets"),
            rules=[k8s.V1PolicyRule(api_groups=[""], resources=["secrets"], verbs=["get"])],
        ),
    )
    rbac.create_namespaced_role_binding(
        namespace,
        k8s.V1RoleBinding(
            metadata=k8s.V1ObjectMeta(name="backup-reads-secrets"),
            role_ref=k8s.V1RoleRef(
                api_group="rbac.authorization.k8s.io", kind="Role", name="read-secrets"
            ),
            subjects=[k8s.RbacV1Subject(kind="ServiceAccount", name="backup", namespace=namespace)],
        ),
    )
    token = core.create_namespaced_service_account_token(
        "backup",
        namespace,
        k8s.AuthenticationV1TokenRequest(spec=k8s.V1TokenRequestSpec(audiences=[])),
    ).status.token
    cluster = yaml.safe_load(admin.read_text())["clusters"][0]["cluster"]
    to.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "local", "cluster": cluster}],
                "users": [{"name": "backup", "user": {"token": token}}],
                "contexts": [{"name": "backup", "context": {"cluster": "local", "user": "backup"}}],
                "current-context": "backup",
            }
        )
    )
    return to


def _export(path: Path, kubeconfig: Path, namespace: str) -> tuple[int, str]:
    """`kubectl defender keyring export -f PATH`, passphrase-wrapped: exit code and stderr."""
    passphrase = path.with_name("passphrase")
    passphrase.write_text("correct horse\n")
    err = io.StringIO()
    code = main(
        ["keyring", "export", "-f", str(path), "--passphrase-file", str(passphrase),
         "--kubeconfig", str(kubeconfig), "--operator-namespace", namespace, "--no-color"],
        out=io.StringIO(),
        err=err,
    )  # fmt: skip
    return code, err.getvalue()


def test_an_export_stamps_its_time_and_the_key_ids_it_holds(
    k8s_api: k8s.ApiClient, namespace: str, kubeconfig_path: Path, tmp_path: Path
) -> None:
    core = k8s.CoreV1Api(k8s_api)
    secrets = KeyringSecrets(core, namespace, NAME)
    keyring = secrets.create(Keyring.generate().with_new_decrypt_only())[0].keyring
    path = tmp_path / "export.json"
    code, err = _export(path, kubeconfig_path, namespace)
    assert code == 0, err
    stored = secrets.load()
    assert stored is not None and stored.exported is not None
    assert stored.exported_keys == {k.key_id for k in keyring.keys} and len(keyring.keys) == 2
    assert read_keyring_backup(path.read_bytes(), "correct horse").keyring == keyring


def test_export_that_may_not_patch_the_secret_keeps_the_file_and_says_so(
    k8s_api: k8s.ApiClient, namespace: str, kubeconfig_path: Path, tmp_path: Path
) -> None:
    core = k8s.CoreV1Api(k8s_api)
    keyring = KeyringSecrets(core, namespace, NAME).create(Keyring.generate())[0].keyring
    kubeconfig = _read_only_kubeconfig(
        core, k8s.RbacAuthorizationV1Api(k8s_api), namespace, kubeconfig_path, tmp_path / "kc"
    )
    path = tmp_path / "export.json"
    code, message = _export(path, kubeconfig, namespace)
    assert code == 3, message
    assert "403" in message and "you may read it but not patch it" in message
    assert "complete export" in message
    assert f"annotate --overwrite secret {NAME} {EXPORTED_ANNOTATION}=" in message
    assert f"{EXPORTED_KEYS_ANNOTATION}={keyring.primary.key_id}" in message
    assert keyring.primary.key_id in message and keyring.primary_fingerprint in message
    # The file is the keyring, whole, private; the Secret is unchanged.
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert read_keyring_backup(path.read_bytes(), "correct horse").keyring == keyring
    secret = core.read_namespaced_secret(NAME, namespace)
    assert EXPORTED_ANNOTATION not in (secret.metadata.annotations or {})
    # A second run refuses to overwrite the kept file, as for any export.
    again = io.StringIO()
    code = main(
        ["keyring", "export", "-f", str(path), "--kubeconfig", str(kubeconfig),
         "--operator-namespace", namespace],
        out=io.StringIO(),
        err=again,
    )  # fmt: skip
    assert code == 2 and "--force" in again.getvalue()


def test_export_of_a_secret_deleted_meanwhile_keeps_the_file_and_points_to_import(
    k8s_api: k8s.ApiClient, namespace: str, tmp_path: Path
) -> None:
    keyring = Keyring.generate()
    path = tmp_path / "export.json"
    path.write_bytes(b"written by export_keyring before the stamp")
    # The stamp is the last step of `export_keyring`; here the Secret is already gone.
    with pytest.raises(ExportNotStampedError) as caught:
        _stamp(k8s_api, namespace, NAME, "2026-01-01T00:00:00Z", path, keyring)
    assert caught.value.exit_code == 3
    message = str(caught.value)
    assert "was deleted while it was exported" in message and "import this file" in message
    assert keyring.primary_fingerprint in message
    assert path.exists()
