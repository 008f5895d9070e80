"""The few Kubernetes calls the operator makes besides Secrets (blocking; run in a thread),
and the status patch, which a reconcile awaits on the event loop through kopf's own session.
Pods are not listed here: monitor passes read them from kopf's index (`_pods`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

import aiohttp
import kopf
from kopf._cogs.clients import api as kopf_api
from kopf._cogs.clients import auth as kopf_auth
from kopf._cogs.clients import errors as kopf_errors
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from defender_config.contract import API_GROUP, API_VERSION, GROUP_VERSION, KIND, PLURAL
from defender_operator._errors import KubeError, api_errors_only

log = logging.getLogger("defender_operator.kube")


@dataclass(frozen=True)
class ObjectRef:
    """What an Event is about."""

    api_version: str
    kind: str
    namespace: str
    name: str
    uid: str = ""


@dataclass(frozen=True)
class Pod:
    name: str
    uid: str
    created: datetime
    deleting: bool
    # When its containers were last all running (the latest start among them), None while the
    # kubelet has not run them all or no kubelet reports on the pod.
    started: datetime | None = None
    # A kubelet is still starting it: pulling images, running init containers, creating
    # containers. Deleting such a pod only starts the same wait over.
    starting: bool = False


class _Unlogged(logging.LoggerAdapter):  # type: ignore[type-arg]
    """For kopf's request helper, which logs a failed request with the server's whole answer:
    the KubeError raised instead says what failed (status and reason), once, where caught."""

    def isEnabledFor(self, level: int) -> bool:
        return False


_UNLOGGED = _Unlogged(log, {})


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "unknown status"


class Kube:
    def __init__(
        self, api: client.ApiClient, kopf_settings: kopf.OperatorSettings | None = None
    ) -> None:
        self.core = api_errors_only(client.CoreV1Api(api))
        self.custom = api_errors_only(client.CustomObjectsApi(api))
        self.crds = api_errors_only(client.ApiextensionsV1Api(api))
        self._api = api
        self._kopf_settings = kopf_settings

    async def patch_status_soon(
        self, namespace: str, name: str, status: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """`patch_status` from the event loop. Under kopf (a handler, a daemon, or a task
        they started: kopf's credentials are in the context) the patch goes through kopf's
        own aiohttp session, with no thread hand-off: on a new component's way to Ready the
        hand-off waited for the GIL twice while a burst kept the loop busy (issue #17).
        Elsewhere, the blocking client in a thread. Same answers either way: None when the
        object is gone, KubeError (status and reason, never the body) when refused or
        unanswered; no retry of its own (kopf retries the handler)."""
        settings = self._kopf_settings
        if settings is None or kopf_auth.vault_var.get(None) is None:
            return await asyncio.to_thread(self.patch_status, namespace, name, status)
        url = f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{namespace}/{PLURAL}/{name}/status"
        try:
            response = await kopf_api.request(
                "patch",
                url,
                settings=settings,
                payload={"status": dict(status)},
                headers={"Content-Type": "application/merge-patch+json"},
                backoffs=[],
                logger=_UNLOGGED,
            )
            async with response:
                obj = await response.json()
        except (aiohttp.ContentTypeError, ValueError) as exc:
            raise KubeError(f"cannot patch status of {namespace}/{name} (answer not JSON)") from exc
        except kopf_errors.APINotFoundError:
            return None  # deleted meanwhile: nothing to report on
        except kopf_errors.APIError as exc:
            raise KubeError(
                f"cannot patch status of {namespace}/{name} ({exc.status} {_phrase(exc.status)})"
            ) from exc
        except (aiohttp.ClientError, TimeoutError, kopf_errors.APISessionClosed) as exc:
            raise KubeError(
                f"cannot patch status of {namespace}/{name}: no answer from the API server"
                f" ({type(exc).__name__})"
            ) from exc
        if not isinstance(obj, dict):
            raise KubeError(f"cannot patch status of {namespace}/{name} (answer not an object)")
        stored = obj.get("status") or {}
        if not isinstance(stored, dict):
            raise KubeError(f"cannot patch status of {namespace}/{name} (status not an object)")
        return dict(stored)

    def delete_pod(self, namespace: str, pod: Pod) -> bool:
        """Delete exactly this pod (uid precondition: never its same-named replacement).
        False when it was already gone."""
        body = client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=pod.uid))
        try:
            self.core.delete_namespaced_pod(pod.name, namespace, body=body)
        except ApiException as exc:
            if exc.status in (404, 409):
                return False
            raise KubeError(
                f"cannot delete pod {namespace}/{pod.name} ({exc.status} {exc.reason}); check"
                " the operator's RBAC for pods/delete"
            ) from exc
        return True

    def patch_status(
        self, namespace: str, name: str, status: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """Merge `status` into the status subresource; the status as stored afterwards (None
        when the object is gone)."""
        try:
            obj: Any = self.custom.patch_namespaced_custom_object_status(
                API_GROUP, API_VERSION, namespace, PLURAL, name, {"status": dict(status)}
            )
        except ApiException as exc:
            if exc.status == 404:
                return None  # deleted meanwhile: nothing to report on
            raise KubeError(
                f"cannot patch status of {namespace}/{name} ({exc.status} {exc.reason})"
            ) from exc
        return dict(obj.get("status") or {})

    def component_exists(self, namespace: str, name: str, uid: str) -> bool:
        """Whether the API server holds the DefenderComponent `namespace/name` with this uid
        (a same-named successor is another resource)."""
        try:
            obj: Any = self.custom.get_namespaced_custom_object(
                API_GROUP, API_VERSION, namespace, PLURAL, name
            )
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise KubeError(
                f"cannot read DefenderComponent {namespace}/{name} ({exc.status} {exc.reason})"
            ) from exc
        return str((obj.get("metadata") or {}).get("uid") or "") == uid

    def component_namespaces(self, watched: list[str] | None = None) -> set[str]:
        """Namespaces holding DefenderComponents. With `watched` the operator only looks there:
        its RBAC may not allow a cluster-wide list, and components elsewhere are not its own."""
        # One item per watched namespace says whether it holds any.
        items = self.component_items(watched, per_namespace=1)
        return {item["metadata"]["namespace"] for item in items}

    def components(self, watched: list[str] | None = None) -> list[ObjectRef]:
        """Every DefenderComponent (in `watched` namespaces when given), as Event targets."""
        return [
            ObjectRef(
                GROUP_VERSION,
                KIND,
                item["metadata"]["namespace"],
                item["metadata"]["name"],
                item["metadata"].get("uid", ""),
            )
            for item in self.component_items(watched)
        ]

    def component_items(
        self, watched: list[str] | None = None, *, per_namespace: int | None = None
    ) -> list[dict[str, Any]]:
        """Every DefenderComponent (in `watched` namespaces when given, at most `per_namespace`
        of each), whole."""
        try:
            if not watched:
                found: Any = self.custom.list_cluster_custom_object(API_GROUP, API_VERSION, PLURAL)
                return list(found.get("items", []))
            items: list[dict[str, Any]] = []
            for ns in watched:
                page: Any = self.custom.list_namespaced_custom_object(
                    API_GROUP, API_VERSION, ns, PLURAL, limit=per_namespace
                )
                items += page.get("items", [])
            return items
        except ApiException as exc:
            if exc.status == 404:
                # Every round of the keyring and rotation loops says it: say what to do.
                raise KubeError(
                    f"cannot list DefenderComponents: the CRD {PLURAL}.{API_GROUP} is not"
                    " installed (404); apply crds/ or the chart's CRDs"
                ) from exc
            raise KubeError(f"cannot list DefenderComponents ({exc.status} {exc.reason})") from exc

    def post_event(self, ref: ObjectRef, type_: str, reason: str, message: str) -> None:
        """An Event about `ref` for people (`kubectl describe`). Never raises: an Event that
        cannot be posted must not stop what it reports on; the caller logs the same text."""
        now = datetime.now(UTC)
        body = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{ref.name}.", namespace=ref.namespace),
            involved_object=client.V1ObjectReference(
                api_version=ref.api_version,
                kind=ref.kind,
                namespace=ref.namespace,
                name=ref.name,
                uid=ref.uid or None,
            ),
            type=type_,
            reason=reason,
            message=message[:1024],
            first_timestamp=now,
            last_timestamp=now,
            count=1,
            source=client.V1EventSource(component="defender-operator"),
            reporting_component="defender-operator",
        )
        try:
            self.core.create_namespaced_event(ref.namespace, body)
        except ApiException as exc:
            log.warning(
                "could not post Event %s on %s %s/%s: %s %s",
                reason,
                ref.kind,
                ref.namespace,
                ref.name,
                exc.status,
                exc.reason,
            )

    def crd(self, name: str) -> dict[str, Any] | None:
        """The CustomResourceDefinition `name` (None when absent). A list with a field selector:
        the operator's RBAC grants list and watch on CRDs (what kopf needs), not get."""
        try:
            found: Any = self.crds.list_custom_resource_definition(
                field_selector=f"metadata.name={name}"
            )
        except ApiException as exc:
            raise KubeError(f"cannot list CRD {name} ({exc.status} {exc.reason})") from exc
        items = list(found.items or [])
        return dict(self._api.sanitize_for_serialization(items[0])) if items else None

    def set_finalizers(
        self, namespace: str, name: str, resource_version: str, finalizers: list[str]
    ) -> bool:
        """Replace the object's finalizers, only if it is still at `resource_version` (a merge
        patch carrying it: 409 otherwise). False when it changed or went meanwhile."""
        body = {"metadata": {"finalizers": finalizers, "resourceVersion": resource_version}}
        try:
            self.custom.patch_namespaced_custom_object(
                API_GROUP, API_VERSION, namespace, PLURAL, name, body
            )
        except ApiException as exc:
            if exc.status in (404, 409):
                return False
            raise KubeError(
                f"cannot remove the finalizer of {namespace}/{name} ({exc.status} {exc.reason})"
            ) from exc
        return True

    def remove_annotation(self, namespace: str, name: str, key: str) -> None:
        body = {"metadata": {"annotations": {key: None}}}
        try:
            self.custom.patch_namespaced_custom_object(
                API_GROUP, API_VERSION, namespace, PLURAL, name, body
            )
        except ApiException as exc:
            if exc.status != 404:
                raise KubeError(
                    f"cannot remove annotation {key} from {namespace}/{name}"
                    f" ({exc.status} {exc.reason})"
                ) from exc
