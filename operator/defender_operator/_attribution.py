"""Who a seed or commit of spec.config is recorded as (`modified_by`), for `_reconcile`.

With admission on, the user the mutating webhook stamped and sealed (`_decisions.attribution`);
a stamp that does not verify (the webhook was not consulted, or the annotations were forged or
copied) is recorded as `unattributed`, with a Warning Event. With admission off, the operator
itself, as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from defender_operator import _api
from defender_operator._decisions.attribution import UNATTRIBUTED, verified_author
from defender_operator._runtime import Runtime


def author(
    rt: Runtime,
    body: Any,
    namespace: str,
    name: str,
    annotations: Mapping[str, str],
    raw_config: Any,
) -> str:
    if rt.stamp_key is None:
        return f"operator:{rt.identity}"
    # Digested only here: without admission there is no stamp to check it against.
    digest = _api.raw_config_digest(raw_config)
    user = verified_author(rt.stamp_key, namespace, name, annotations, digest)
    if user is not None:
        return user
    kopf.event(
        body,
        type="Warning",
        reason="ModifierUnverified",
        message=(
            "spec.config carries no valid admission stamp (the webhook was not consulted, or"
            f" the annotations were set by hand); recorded as modified_by={UNATTRIBUTED}"
        ),
    )
    return UNATTRIBUTED
