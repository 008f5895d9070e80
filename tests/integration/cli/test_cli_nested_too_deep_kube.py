"""Objects nested thousands of levels deep in the real kube-apiserver, driven through every
plugin command that reads them: the command's success when it never needed the nested data,
else one line and exit 2; never a RecursionError traceback.

The API server accepts such objects from anyone who may write them: a DefenderComponent whose
`spec.config` (preserved unknown fields) nests thousands of levels (its managedFields mirror
it), a Secret whose `metadata.managedFields` someone wrote that deep. The Kubernetes client
decodes answers with `json.loads`, which ends in RecursionError past Python's recursion limit.
The objects are written with `kubectl create --raw`: the Python client cannot encode them
either."""

from __future__ import annotations

import io
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s

from defender_cli import main
from defender_config import Keyring, contract
from defender_devcluster import tool

pytestmark = [pytest.mark.cluster]

REPO = Path(__file__).resolve().parents[3]
DEEP = 5000  # far past Python's recursion limit, well inside what the API server accepts
TOO_DEEP = "nested too deeply to decode (past Python's recursion limit)"
SECRET = "ml-defender-keyring"


def run(kubeconfig: Path, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main([*args, "--kubeconfig", str(kubeconfig), "--no-color"], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def one_line(err: str, command: str) -> None:
    assert err.count("\n") == 1 and err.startswith(f"kubectl defender {command}: "), err
    assert "Traceback" not in err and "RecursionError" not in err


def create_raw(kubeconfig: Path, uri: str, document: str, tmp_path: Path) -> None:
    path = tmp_path / "raw.json"
    path.write_text(document)
    subprocess.run(
        [str(tool("kubectl")), "--kubeconfig", str(kubeconfig), "create", "--raw", uri,
         "-f", str(path)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip


def nested(depth: int, leaf: str = "1") -> str:
    return '{"a": ' * depth + leaf + "}" * depth


def deep_component(k8s_api: k8s.ApiClient, kubeconfig: Path, namespace: str, tmp_path: Path) -> str:
    crd = yaml.safe_load((REPO / "crds" / "defendercomponents.yaml").read_text())
    try:
        k8s.ApiextensionsV1Api(k8s_api).create_custom_resource_definition(crd)
    except k8s.ApiException as exc:
        if exc.status != 409:
            raise
    sample = yaml.safe_load((REPO / "manifests" / "samples" / "sniffer.yaml").read_text())
    name = sample["metadata"]["name"]
    sample["metadata"]["namespace"] = namespace
    sample["spec"]["config"] = "@DEEP@"
    document = json.dumps(sample).replace('"@DEEP@"', nested(DEEP))
    group = f"/apis/{contract.API_GROUP}/{contract.API_VERSION}"
    uri = f"{group}/namespaces/{namespace}/{contract.PLURAL}"
    for _ in range(50):
        try:
            create_raw(kubeconfig, uri, document, tmp_path)
            break
        except subprocess.CalledProcessError as exc:
            if b"NotFound" not in exc.stderr and b"not find the requested" not in exc.stderr:
                raise AssertionError(exc.stderr.decode()) from None
            time.sleep(0.2)  # the new CRD takes a moment to be served
    return name


def annotations(k8s_api: k8s.ApiClient, namespace: str, name: str) -> dict[str, str]:
    # Read without decoding the object (it would be the RecursionError this file is about).
    answer: Any = k8s.CustomObjectsApi(k8s_api).get_namespaced_custom_object(
        contract.API_GROUP,
        contract.API_VERSION,
        namespace,
        contract.PLURAL,
        name,
        _preload_content=False,
    )
    raw = answer.data
    start = raw.index(b'"annotations":')
    end = raw.index(b"}", start)
    found: dict[str, str] = json.loads(raw[start + len(b'"annotations":') : end + 1])
    return found


@pytest.mark.parametrize(
    ("command", "annotation"),
    [
        (["rollback", "--to", "master"], contract.ROLLBACK_ANNOTATION),
        (["promote"], contract.PROMOTE_ANNOTATION),
        (["abort"], contract.ABORT_ANNOTATION),
    ],
)
def test_a_component_nested_thousands_deep_is_annotated(
    k8s_api: k8s.ApiClient,
    kubeconfig_path: Path,
    namespace: str,
    tmp_path: Path,
    command: list[str],
    annotation: str,
) -> None:
    name = deep_component(k8s_api, kubeconfig_path, namespace, tmp_path)
    code, out, err = run(kubeconfig_path, command[0], name, "-n", namespace, *command[1:])
    assert (code, err) == (0, ""), err
    assert "Asked the operator to" in out
    assert annotation in annotations(k8s_api, namespace, name)


def deep_secret(kubeconfig: Path, namespace: str, tmp_path: Path) -> None:
    """The keyring Secret, whose managedFields someone wrote DEEP levels deep."""
    fields = '{"f:a": ' * DEEP + "{}" + "}" * DEEP
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": SECRET,
            "managedFields": [
                {
                    "manager": "someone",
                    "operation": "Update",
                    "apiVersion": "v1",
                    "fieldsType": "FieldsV1",
                    "fieldsV1": "@DEEP@",
                }
            ],
        },
        "type": "Opaque",
        "data": Keyring.generate().to_secret_data(),
    }
    document = json.dumps(secret).replace('"@DEEP@"', fields)
    create_raw(kubeconfig, f"/api/v1/namespaces/{namespace}/secrets", document, tmp_path)


def secret_is_deep(k8s_api: k8s.ApiClient, namespace: str) -> bool:
    answer: Any = k8s.CoreV1Api(k8s_api).read_namespaced_secret(
        SECRET, namespace, _preload_content=False
    )
    return bool(answer.data.count(b'"f:a"') >= DEEP)


def test_a_keyring_secret_nested_thousands_deep_is_one_line_for_each_command(
    k8s_api: k8s.ApiClient, kubeconfig_path: Path, namespace: str, tmp_path: Path
) -> None:
    deep_secret(kubeconfig_path, namespace, tmp_path)
    assert secret_is_deep(k8s_api, namespace), "the API server did not keep the deep fields"
    seen = f"the API server's answer for Secret {namespace}/{SECRET} is {TOO_DEEP}"

    export = tmp_path / "export"
    code, out, err = run(
        kubeconfig_path, "keyring", "export", "-f", str(export), "--operator-namespace", namespace
    )
    assert (code, out) == (2, "")
    one_line(err, "keyring")
    assert seen in err and not export.exists()

    code, out, err = run(
        kubeconfig_path, "diff", "sniffer", "--keyring-secret", f"{namespace}/{SECRET}",
        "--etcd-endpoints", "http://127.0.0.1:1",
    )  # fmt: skip
    assert (code, out) == (2, "")
    one_line(err, "diff")
    assert seen in err

    # A request the plugin does not need the Secret back for: made, and said so.
    code, out, err = run(kubeconfig_path, "rotate-key", "--operator-namespace", namespace)
    assert (code, err) == (0, ""), err
    assert "Rotation requested" in out
    answer: Any = k8s.CoreV1Api(k8s_api).read_namespaced_secret(
        SECRET, namespace, _preload_content=False
    )
    assert contract.ROTATE_ANNOTATION.encode() in answer.data
