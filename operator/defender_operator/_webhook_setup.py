"""Start the admission webhooks: secrets, the HTTPS server, the webhook configurations.

Where the API server finds the webhooks:
- `admission_url` set (the local dev cluster: the API server and the operator share
  127.0.0.1): the operator writes the ValidatingWebhookConfiguration and the
  MutatingWebhookConfiguration itself, with url + caBundle, failure policy and timeout from
  its settings, limited to the namespaces it watches;
- unset (in a cluster): the chart renders both with the operator's Service, and the operator
  fills in caBundle with its self-signed CA (or cert-manager's CA injector does). Only the
  caBundle of each webhook's clientConfig is written, by a JSON patch guarded by the
  resourceVersion read: fields the operator does not know (a newer API server's) stay as they
  are, where the typed client refused them and a write of the whole object would drop them.
The configurations are left in place when the operator stops: with failurePolicy Ignore the
API server then admits edits unchecked and the operator's reconcile validates them later.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kopf
import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from defender_config import contract
from defender_operator import _api, _deep_json, _webhook_tls
from defender_operator._errors import AdmissionSetupError, api_errors_only, api_failure
from defender_operator._runtime import Runtime
from defender_operator._settings import OperatorSettings

log = logging.getLogger("defender_operator.admission")

VALIDATE_ID = "validate"
STAMP_ID = "stamp"


def webhook_configurations(
    name: str,
    client_configs: dict[str, dict[str, Any]],
    *,
    watched: list[str],
    failure_policy: str,
    timeout_seconds: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(ValidatingWebhookConfiguration, MutatingWebhookConfiguration) bodies; `client_configs`
    maps each webhook id (VALIDATE_ID, STAMP_ID) to its clientConfig."""

    def webhook(hook_id: str) -> dict[str, Any]:
        hook: dict[str, Any] = {
            "name": f"{hook_id}.{_api.PLURAL}.{contract.API_GROUP}",
            "clientConfig": client_configs[hook_id],
            "rules": [
                {
                    "apiGroups": [contract.API_GROUP],
                    "apiVersions": [contract.API_VERSION],
                    "resources": [_api.PLURAL],
                    "operations": ["CREATE", "UPDATE"],
                    "scope": "Namespaced",
                }
            ],
            "failurePolicy": failure_policy,
            "timeoutSeconds": timeout_seconds,
            "sideEffects": "None",
            "matchPolicy": "Equivalent",
            "admissionReviewVersions": ["v1"],
        }
        if watched:
            hook["namespaceSelector"] = {
                "matchExpressions": [
                    {
                        "key": "kubernetes.io/metadata.name",
                        "operator": "In",
                        "values": sorted(watched),
                    }
                ]
            }
        return hook

    labels = {"app.kubernetes.io/managed-by": "ml-defender-operator"}
    validating = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": name, "labels": labels},
        "webhooks": [webhook(VALIDATE_ID)],
    }
    mutating = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name, "labels": labels},
        "webhooks": [{**webhook(STAMP_ID), "reinvocationPolicy": "Never"}],
    }
    return validating, mutating


class _Configs:
    """Read/create/replace/patch for both configuration kinds with one shape."""

    def __init__(self, api: client.AdmissionregistrationV1Api) -> None:
        api = api_errors_only(api)
        self.api = api
        self.kinds: dict[str, tuple[Callable[..., Any], ...]] = {
            "ValidatingWebhookConfiguration": (
                api.read_validating_webhook_configuration,
                api.create_validating_webhook_configuration,
                api.replace_validating_webhook_configuration,
                api.patch_validating_webhook_configuration,
            ),
            "MutatingWebhookConfiguration": (
                api.read_mutating_webhook_configuration,
                api.create_mutating_webhook_configuration,
                api.replace_mutating_webhook_configuration,
                api.patch_mutating_webhook_configuration,
            ),
        }

    def read(self, kind: str, name: str) -> dict[str, Any] | None:
        read = self.kinds[kind][0]
        try:
            found = read(name, _preload_content=False)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise _error("read", kind, name, exc) from exc
        try:
            # The body is read after the call returned: outside `api_errors_only`.
            data = found.data
        except urllib3.exceptions.HTTPError as exc:
            # The class name only: urllib3's text quotes the bytes it read.
            raise AdmissionSetupError(
                f"cannot read {kind} {name}: the API server's answer broke off"
                f" ({type(exc).__name__})"
            ) from None
        # Raw: the typed model refuses a field it does not know (a newer API server's). Uncut:
        # one nested past CUT_DEPTH (no real configuration is) is refused, not read with parts
        # replaced by a marker.
        try:
            body = _deep_json.loads_uncut(data)
        except ValueError as exc:  # malformed, nested past what Python decodes, a huge number
            raise AdmissionSetupError(
                f"cannot read {kind} {name}: the API server's answer is not JSON the operator"
                f" decodes ({type(exc).__name__})"
            ) from None
        if not isinstance(body, dict):
            raise AdmissionSetupError(
                f"cannot read {kind} {name}: the API server's answer is JSON"
                f" {type(body).__name__}, not an object"
            )
        problem = _unusable(body)
        if problem is not None:
            raise AdmissionSetupError(
                f"cannot read {kind} {name}: the API server's answer has {problem}"
            )
        return body

    def write(self, body: dict[str, Any], existing: dict[str, Any] | None) -> None:
        """Create `body`, or replace `existing` with it (the operator's own configuration)."""
        kind, name = body["kind"], body["metadata"]["name"]
        _, create, replace, _ = self.kinds[kind]
        if existing is None:
            self._send(kind, name, create, body)
        else:
            body["metadata"]["resourceVersion"] = existing["metadata"]["resourceVersion"]
            self._send(kind, name, replace, name, body)

    def patch(self, kind: str, name: str, operations: list[dict[str, Any]]) -> None:
        """Apply a JSON patch (RFC 6902): it changes what it names and nothing else."""
        self._send(
            kind,
            name,
            self.kinds[kind][3],
            name,
            operations,
            _content_type="application/json-patch+json",
        )

    @staticmethod
    def _send(kind: str, name: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        try:
            # Raw: nothing in the answer is used, and the typed model's decoding fails with
            # ValueError, TypeError or pydantic's errors on an answer of another shape (a
            # failed write is its status, raised as ApiException either way).
            answer = call(*args, _preload_content=False, **kwargs)
        except ApiException as exc:
            raise _error("write", kind, name, exc) from exc
        # Read to the end (never raises) so the connection goes back to the pool.
        answer.drain_conn()
        answer.release_conn()


def _unusable(body: dict[str, Any]) -> str | None:
    """What of a configuration read back lacks the shape a write over it needs (None when
    nothing does): its resourceVersion, the guard against writing over a newer version."""
    metadata = body.get("metadata")
    if not isinstance(metadata, dict) or not isinstance(metadata.get("resourceVersion"), str):
        return "no metadata.resourceVersion string"
    return None


def _hooks_unusable(hooks: Any) -> str | None:
    """What of a configuration's webhooks read back lacks the shape `fill_ca_bundle` sets
    each one's clientConfig.caBundle in (None when nothing does)."""
    if not isinstance(hooks, list) or not all(isinstance(h, dict) for h in hooks):
        return "webhooks that are not a list of objects"
    if not all(isinstance(h.get("clientConfig", {}), dict) for h in hooks):
        return "a webhook whose clientConfig is not an object"
    return None


def _error(action: str, kind: str, name: str, exc: ApiException) -> AdmissionSetupError:
    return AdmissionSetupError(
        f"cannot {action} {kind} {name}: {api_failure(exc, 'admissionregistration.k8s.io')}"
    )


def register(
    api: client.ApiClient, settings: OperatorSettings, ca_pem: bytes, watched: list[str]
) -> None:
    """Write both configurations pointing at `settings.admission_url` (local clusters)."""
    bundle = base64.b64encode(ca_pem).decode()
    base = settings.admission_url.rstrip("/")
    configs = _Configs(client.AdmissionregistrationV1Api(api))
    for body in webhook_configurations(
        settings.admission_configuration,
        {i: {"url": f"{base}/{i}", "caBundle": bundle} for i in (VALIDATE_ID, STAMP_ID)},
        watched=watched,
        failure_policy=settings.admission_failure_policy,
        timeout_seconds=settings.admission_timeout_seconds,
    ):
        configs.write(body, configs.read(body["kind"], body["metadata"]["name"]))
    log.info("webhook configurations %s registered at %s", settings.admission_configuration, base)


def fill_ca_bundle(api: client.ApiClient, name: str, ca_pem: bytes) -> None:
    """Put `ca_pem` into every webhook of the chart-rendered configurations named `name`."""
    bundle = base64.b64encode(ca_pem).decode()
    configs = _Configs(client.AdmissionregistrationV1Api(api))
    for kind in configs.kinds:
        existing = configs.read(kind, name)
        if existing is None:
            raise AdmissionSetupError(
                f"{kind} {name} not found: the chart renders it (admission.enabled); with"
                " the operator run elsewhere, set DEFENDER_OPERATOR_ADMISSION_URL"
            )
        hooks = existing.get("webhooks") or []
        problem = _hooks_unusable(hooks)
        if problem is not None:
            raise AdmissionSetupError(
                f"cannot fill in the caBundle of {kind} {name}: the API server's answer has"
                f" {problem}"
            )
        operations = _ca_bundle_patch(existing["metadata"]["resourceVersion"], hooks, bundle)
        if operations is None:
            continue
        configs.patch(kind, name, operations)
        log.info("caBundle of %s %s filled in", kind, name)


def _ca_bundle_patch(
    resource_version: str, hooks: list[dict[str, Any]], bundle: str
) -> list[dict[str, Any]] | None:
    """The JSON patch that sets `bundle` as the caBundle of every webhook in `hooks` (as read
    at `resource_version`), None when each has it already. It names nothing else, so every
    other field, those the operator does not know among them, stays as the server has it."""
    # The resourceVersion read goes in as a precondition: if the configuration changed since
    # (webhooks added, removed or reordered, so the indexes below point elsewhere), the API
    # server answers 409 Conflict instead of applying it, as it did for the whole-object write.
    operations: list[dict[str, Any]] = [
        {"op": "replace", "path": "/metadata/resourceVersion", "value": resource_version}
    ]
    for index, hook in enumerate(hooks):
        config = hook.get("clientConfig")
        if config is None:
            operations.append(
                {
                    "op": "add",
                    "path": f"/webhooks/{index}/clientConfig",
                    "value": {"caBundle": bundle},
                }
            )
        elif config.get("caBundle") != bundle:
            # "add" sets a member whether or not it is there (RFC 6902 4.1).
            operations.append(
                {"op": "add", "path": f"/webhooks/{index}/clientConfig/caBundle", "value": bundle}
            )
    return operations if len(operations) > 1 else None


# kopf's webhook server re-reads the files every few seconds (a change restarts it with the
# new certificate): they must stay while it runs, so they are removed at `stop`, and the next
# process removes what a killed one left (the chart's /tmp outlives a container restart).
_PREFIX = "defender-webhook-"
_folders: list[Path] = []


def _write_files(cert: _webhook_tls.ServingCert) -> tuple[Path, Path]:
    """The serving certificate as files for the SSL context, readable by this process only
    (removed by `stop`)."""
    remove_stale(Path(tempfile.gettempdir()))
    folder = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-"))
    _folders.append(folder)
    paths = []
    for fname, content in (("tls.crt", cert.cert_pem), ("tls.key", cert.key_pem)):
        path = folder / fname
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        paths.append(path)
    return paths[0], paths[1]


async def start(rt: Runtime, api: client.ApiClient, kopf_settings: kopf.OperatorSettings) -> None:
    """Secrets, stamp key, configurations, then the server kopf runs after start-up."""
    ours = rt.settings
    found = await asyncio.to_thread(
        _webhook_tls.ensure,
        rt.kube.core,
        ours.namespace,
        ours.admission_secret,
        hosts=ours.admission_cert_hosts,
        cert_dir=ours.admission_cert_dir,
    )
    rt.stamp_key = found.stamp_key
    if ours.admission_url:
        await asyncio.to_thread(register, api, ours, found.cert.ca_pem, ours.watch_namespaces)
    elif ours.admission_patch_ca_bundle and ours.admission_cert_dir is None:
        await asyncio.to_thread(
            fill_ca_bundle, api, ours.admission_configuration, found.cert.ca_pem
        )
    certfile, keyfile = await asyncio.to_thread(_write_files, found.cert)
    kopf_settings.admission.server = kopf.WebhookServer(
        addr=ours.admission_listen_address,
        port=ours.admission_port,
        certfile=str(certfile),
        pkeyfile=str(keyfile),
        cadata=found.cert.ca_pem,
    )
    # kopf's own configuration manager stays off: the configurations above are ours.
    kopf_settings.admission.managed = None
    log.info(
        "admission webhooks on %s:%s (failure policy %s where the operator registers them)",
        ours.admission_listen_address,
        ours.admission_port,
        ours.admission_failure_policy,
    )


def remove_stale(tmp: Path) -> list[Path]:
    """Remove the certificate folders in `tmp` that an earlier operator process of this user
    left (killed before `stop`): its pid is gone, or is this process's, which did not write
    them (a restarted container reuses pids). A folder of another running process (two
    operators on one host) stays. Returns the folders removed."""
    removed = []
    for folder in tmp.glob(f"{_PREFIX}*"):
        pid = folder.name[len(_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or folder in _folders:
            continue
        try:
            info = folder.lstat()
        except FileNotFoundError:
            continue  # removed meanwhile
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            continue
        if int(pid) != os.getpid() and _running(int(pid)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        log.info("removed the webhook certificate files %s left by process %s", folder, pid)
        removed.append(folder)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def stop() -> None:
    """Remove the certificate files written at start-up (the private key among them)."""
    while _folders:
        shutil.rmtree(_folders.pop(), ignore_errors=True)
