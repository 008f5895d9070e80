"""kopf wiring of the admission webhooks (imported only with admission_enabled, because kopf
refuses to start with admission handlers and no webhook server).

validate → `_admission_review.review`: refuse what the reconcile would refuse, with field paths
stamp    → `_decisions.attribution.stamp_changes`: who changed spec.config, sealed
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from defender_config import contract
from defender_operator import _admission_review, _api
from defender_operator._decisions import attribution
from defender_operator._runtime import Runtime
from defender_operator._webhook_setup import STAMP_ID, VALIDATE_ID

RESOURCE = (contract.API_GROUP, contract.API_VERSION, _api.PLURAL)


@kopf.on.validate(*RESOURCE, id=VALIDATE_ID, operations=["CREATE", "UPDATE"])
def validate_component(
    name: str, spec: kopf.Spec, annotations: Mapping[str, str], **kwargs: Any
) -> None:
    old: kopf.Body | None = kwargs.get("old")
    problems = _admission_review.review(
        name,
        dict(spec),
        dict(old.get("spec") or {}) if old is not None else None,
        dict(annotations),
    )
    if problems:
        raise kopf.AdmissionError(_admission_review.refusal(name, problems), code=422)


@kopf.on.mutate(*RESOURCE, id=STAMP_ID, operations=["CREATE", "UPDATE"])
def stamp_modifier(
    name: str,
    namespace: str | None,
    spec: kopf.Spec,
    annotations: Mapping[str, str],
    userinfo: kopf.UserInfo,
    patch: kopf.Patch,
    memo: Any,
    **kwargs: Any,
) -> None:
    rt: Runtime | None = memo.get("runtime")
    if rt is None or rt.stamp_key is None:
        raise kopf.AdmissionError("the operator is starting; try again", code=503)
    old: kopf.Body | None = kwargs.get("old")
    changes = attribution.stamp_changes(
        key=rt.stamp_key,
        namespace=namespace or "",
        name=name,
        user=str(userinfo.get("username") or ""),
        config_digest=_digest(spec),
        old_config_digest=_digest(old.get("spec") or {}) if old is not None else None,
        annotations=dict(annotations),
        old_annotations=dict(old.metadata.annotations) if old is not None else {},
    )
    for key, value in changes.items():
        patch.metadata.annotations[key] = value


def _digest(spec: Mapping[str, Any]) -> str:
    # The raw spec.config, as the reconcile digests it before validation.
    return _api.raw_config_digest(spec.get("config") or {})
