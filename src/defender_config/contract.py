"""The domain vocabulary of ML Defender, in one place.

Everything that more than one program must spell the same way lives here: the Kubernetes API
(group, version, kind, plural), the annotations and labels the operator, the plugin and the
chart agree on, the component types, the invalid-config and retention policies, the kinds of
change that make a config version, and the grammar of a rollback target. The operator, the
agent, the plugin, the bench and the tests import these names instead of repeating literals.

This module imports nothing but the standard library and the library's error module (an
import-linter contract keeps it so), so the operator's pure decisions may use it too.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Final, Literal

from ._errors import InvalidRollbackTargetError

__all__ = [
    "ABORT_ANNOTATION",
    "ADOPT_ANNOTATION",
    "API_GROUP",
    "API_VERSION",
    "CATEGORIES",
    "DEFAULT_HISTORY_LIMIT",
    "ETCD_CLIENT_LABEL",
    "EXPORTED_ANNOTATION",
    "EXPORTED_KEYS_ANNOTATION",
    "FINALIZER",
    "GROUP_VERSION",
    "HIGHEST_VERSION",
    "KEYRING_LABELS",
    "KIND",
    "MANAGED_BY",
    "MAX_HISTORY_LIMIT",
    "PLURAL",
    "PROMOTE_ANNOTATION",
    "RESTORED_ANNOTATION",
    "ROLLBACK_ANNOTATION",
    "ROTATE_ANNOTATION",
    "ROTATION_STAGE_ANNOTATION",
    "SHORT_NAMES",
    "SINGULAR",
    "UNFREEZE_ANNOTATION",
    "VERSION_DIGITS",
    "ChangeKind",
    "ComponentType",
    "InvalidConfigPolicy",
    "RetentionPolicy",
    "RollbackTarget",
    "RotationStage",
    "format_rollback_target",
    "next_record_sequence",
    "parse_rollback_target",
]

# --- the Kubernetes API -------------------------------------------------------------------------

API_GROUP: Final = "mldefender.io"
API_VERSION: Final = "v1alpha1"
GROUP_VERSION: Final = f"{API_GROUP}/{API_VERSION}"
KIND: Final = "DefenderComponent"
PLURAL: Final = "defendercomponents"
SINGULAR: Final = "defendercomponent"
# `dc` is OpenShift's DeploymentConfig; `dfc` collides with nothing well known.
SHORT_NAMES: Final = ("dfc",)
CATEGORIES: Final = ("defender",)

# --- annotations and labels ---------------------------------------------------------------------

# One-off commands a person (or `kubectl defender`) sets on a DefenderComponent; the operator
# removes them once done (docs/operator.md).
ROLLBACK_ANNOTATION: Final = f"{API_GROUP}/rollback-to"
UNFREEZE_ANNOTATION: Final = f"{API_GROUP}/unfreeze"
ADOPT_ANNOTATION: Final = f"{API_GROUP}/adopt"
# End a canary rollout now: promote it to every instance, or abort it (and freeze).
PROMOTE_ANNOTATION: Final = f"{API_GROUP}/promote"
ABORT_ANNOTATION: Final = f"{API_GROUP}/abort"
# On the keyring Secret (docs/key-rotation.md).
ROTATE_ANNOTATION: Final = f"{API_GROUP}/rotate-key"
ROTATION_STAGE_ANNOTATION: Final = f"{API_GROUP}/rotation-stage"
EXPORTED_ANNOTATION: Final = f"{API_GROUP}/last-export-time"
# The key ids that export holds, comma-separated (ids are not secret).
EXPORTED_KEYS_ANNOTATION: Final = f"{API_GROUP}/last-export-keys"
RESTORED_ANNOTATION: Final = f"{API_GROUP}/restored-from"
# The operator's finalizer: Keep/Purge retention runs before a DefenderComponent goes.
FINALIZER: Final = f"{API_GROUP}/retention"
# Pods with this label may reach etcd (the chart's NetworkPolicy selects them).
ETCD_CLIENT_LABEL: Final = f"{API_GROUP}/etcd-client"
MANAGED_BY: Final = "defender-operator"
# Labels of the keyring Secret the operator writes and the plugin restores.
KEYRING_LABELS: Final = {
    "app.kubernetes.io/name": "ml-defender",
    "app.kubernetes.io/component": "keyring",
    "app.kubernetes.io/part-of": "ml-defender",
    "app.kubernetes.io/managed-by": MANAGED_BY,
}

# --- component types and policies ---------------------------------------------------------------


class ComponentType(enum.StrEnum):
    """The kinds of component (`spec.componentType`); each but `custom` has a config model."""

    SNIFFER = "sniffer"
    ML_DETECTOR = "ml-detector"
    FIREWALL = "firewall"
    RAG = "rag"
    CUSTOM = "custom"


class InvalidConfigPolicy(enum.StrEnum):
    """What a refused config does to ACTIVE (`spec.rollout.onInvalidConfig`); it is always
    alerted and refused. The CRD's CamelCase spelling is the one spelling; the library's older
    `keep` / `revert_to_master` still parse, in any case."""

    REJECT = "Reject"
    """ACTIVE stays as it was."""
    REVERT_TO_MASTER = "RevertToMaster"
    """ACTIVE is rolled back to MASTER: the component returns to its known-good original."""

    @classmethod
    def _missing_(cls, value: object) -> InvalidConfigPolicy | None:
        if isinstance(value, str):
            folded = value.replace("_", "").replace("-", "").lower()
            for member in cls:
                if member.value.lower() == folded:
                    return member
            if folded == "keep":
                return cls.REJECT
        return None


class RetentionPolicy(enum.StrEnum):
    """What deleting a DefenderComponent does to its data in etcd (`spec.retention`)."""

    KEEP = "Keep"
    PURGE = "Purge"


class ChangeKind(enum.StrEnum):
    """What made a config version (the `change` field of its metadata record)."""

    REGISTER = "register"
    """Version 1: MASTER and ACTIVE written at registration."""
    COMMIT = "commit"
    """A new config committed (spec.config edit, a commit by rag, the plugin)."""
    ROLLBACK = "rollback"
    """MASTER or a kept version made ACTIVE again by a person's command."""
    BREAKER_REVERT = "breaker-revert"
    """The breaker put back the version before a change that made instances unhealthy."""
    INVALID_REVERT = "invalid-revert"
    """A refused config under RevertToMaster rolled ACTIVE back to MASTER."""
    CANARY_ABORT = "canary-abort"
    """A canary rollout was aborted: the config it was tried on top of, written again."""
    REPAIR = "repair"
    """The metadata record was rebuilt from the newest kept version and re-signed."""

    @property
    def reverts(self) -> bool:
        """ACTIVE was put back to an earlier config on purpose, not moved forward."""
        return self in (
            ChangeKind.ROLLBACK,
            ChangeKind.BREAKER_REVERT,
            ChangeKind.INVALID_REVERT,
            ChangeKind.CANARY_ABORT,
        )

    @classmethod
    def from_note(cls, note: str | None) -> ChangeKind:
        """The kind of a record written before the field existed, from the note it carried
        (`registered`, `rollback to ...`, `re-signed`, `re-created`, or a commit's note)."""
        text = (note or "").strip().lower()
        if text == "registered":
            return cls.REGISTER
        if text.startswith("rollback"):
            return cls.ROLLBACK
        if text in ("re-signed", "re-created"):
            return cls.REPAIR
        return cls.COMMIT


class RotationStage(enum.StrEnum):
    """Where the shared key rotation stands (the same for every component): the keyring
    Secret's rotation-stage annotation and `status.rotationStage`."""

    IDLE = "Idle"
    DISTRIBUTING = "Distributing"  # new key added decrypt-only, waiting for every instance
    PROMOTED = "Promoted"  # new key is primary, stored values being rewrapped
    GRACE = "Grace"  # everything rewrapped, old key kept until the grace period ends


# --- the kept history ---------------------------------------------------------------------------

DEFAULT_HISTORY_LIMIT: Final = 10
"""Versions of ACTIVE kept for rollback when nothing says otherwise: spec.rollout.historyLimit's
default (the CRD's) and the library's `history_limit` setting's."""
MAX_HISTORY_LIMIT: Final = 1000
"""The most versions spec.rollout.historyLimit (and so any writer of this plane) may keep."""


# --- rollback targets ---------------------------------------------------------------------------

VERSION_DIGITS: Final = 10
"""A config version has at most this many digits: etcd's history keys hold it zero-padded to
this width (docs/etcd-layout.md)."""
HIGHEST_VERSION: Final = 10**VERSION_DIGITS - 1

RollbackTarget = Literal["master"] | int
"""MASTER, or a kept ACTIVE version (a positive number)."""


def parse_rollback_target(text: str) -> RollbackTarget:
    """`master` (any case) or a version number from 1 to HIGHEST_VERSION in ASCII digits,
    surrounding blanks ignored. Anything else, the empty string included (an annotation set
    without a value is a mistake, not a request for MASTER), raises InvalidRollbackTargetError."""
    value = text.strip()
    if value.lower() == "master":
        return "master"
    # Length first: int() of a longer string could name no version the layout can hold, or
    # raise ValueError past 4300 digits (Python's limit), which no caller expects.
    if len(value) <= VERSION_DIGITS and value.isascii() and value.isdigit() and int(value) > 0:
        return int(value)
    raise InvalidRollbackTargetError(text, highest=HIGHEST_VERSION)


def format_rollback_target(target: RollbackTarget) -> str:
    """The spelling `parse_rollback_target` reads back (what goes into the annotation)."""
    return "master" if target == "master" else str(int(target))


def next_record_sequence(*seen: int, now: datetime) -> int:
    """The sequence of a control record written now (a canary rollout record, a freeze
    marker): above every one in `seen`, and at least `now` in milliseconds, so a writer that
    lost what it anchored (a DefenderComponent deleted and created again) still issues one
    above what long-running readers remember, as long as its clock does not go back."""
    return max(max(seen, default=0) + 1, int(now.timestamp() * 1000))
