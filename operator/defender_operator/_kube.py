"""The few Kubernetes calls the operator makes besides Secrets (blocking; run in a thread).
Pods are not listed here: monitor passes read them from kopf's index (`_pods`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

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


class Kube:
    def __init__(self, api: client.ApiClient) -> None:
        self.core = api_errors_only(client.CoreV1Api(api))
        self.custom = api_errors_only(client.CustomObjectsApi(api))
        self.crds = api_errors_only(client.ApiextensionsV1Api(api))
        self._api = api

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
