"""The DefenderComponent v1alpha1 API as pydantic models.

These models are the single source of the CRD schema (`python -m defender_operator.crdgen`
renders `crds/defendercomponents.yaml` from them) and of the operator's own validation, so the
API server and the operator can never disagree about what a valid object is.

Field names are camelCase on the wire (Kubernetes convention) and snake_case in Python.
Every field carries a description because `kubectl explain defendercomponent.spec...` shows it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

# The vocabulary has one home, the library's contract: re-exported for the operator's modules.
from defender_config import MIN_ALLOWED_MISSES, ConfigValidationError, config_digest
from defender_config.contract import CATEGORIES as CATEGORIES
from defender_config.contract import DEFAULT_HISTORY_LIMIT, MAX_HISTORY_LIMIT
from defender_config.contract import KIND as KIND
from defender_config.contract import PLURAL as PLURAL
from defender_config.contract import ROLLBACK_ANNOTATION as ROLLBACK_ANNOTATION
from defender_config.contract import ROTATE_ANNOTATION as ROTATE_ANNOTATION
from defender_config.contract import SHORT_NAMES as SHORT_NAMES
from defender_config.contract import SINGULAR as SINGULAR
from defender_config.contract import ComponentType as ComponentTypeName
from defender_config.contract import InvalidConfigPolicy as InvalidConfigPolicy
from defender_config.contract import RetentionPolicy as RetentionPolicy
from defender_config.contract import RotationStage as RotationStage
from defender_operator._decisions.conditions import MESSAGE_MAX_CHARS


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
    )


class Selector(_Model):
    match_labels: dict[str, str] = Field(
        min_length=1,
        description=(
            "Labels that select this component's pods. The operator only ever restarts pods that"
            " carry all of these labels, and counts them as the expected instances."
        ),
    )


# A lease of one interval expires whenever a renewal is late at all; two leave a whole interval
# for a slow health check, a GC pause or a loaded etcd.
MIN_MISSED_BEFORE_RESTART = MIN_ALLOWED_MISSES
HEARTBEAT_MISSES_RAISED = "HeartbeatMissesRaised"


class HeartbeatSpec(_Model):
    interval_seconds: int = Field(
        default=30,
        ge=1,
        le=3600,
        description="How often each instance writes its lease-bound heartbeat, in seconds.",
    )
    missed_before_restart: int = Field(
        default=3,
        ge=MIN_MISSED_BEFORE_RESTART,
        le=100,
        description=(
            "How many consecutive intervals an instance may miss before its pod is restarted."
            " At least 2: the lease lasts intervalSeconds x missedBeforeRestart and is renewed"
            " once per interval, so with 1 any beat a moment late (a slow health check, a pause)"
            " would let it expire and restart a healthy pod. An object stored with 1 before"
            " this minimum is run as 2 (a HeartbeatMissesRaised Warning Event says so)."
        ),
    )
    startup_grace_seconds: int = Field(
        default=60,
        ge=0,
        le=3600,
        description=(
            "Seconds a pod's containers may run before its first heartbeat is required,"
            " counted from when the kubelet last started them (from the pod's creation when no"
            " kubelet reports on it). A pod still being started is never restarted."
        ),
    )


class CompressionSpec(_Model):
    enabled: bool = Field(default=True, description="Compress stored values (zstd) before sealing.")
    level: int = Field(default=3, ge=1, le=22, description="zstd compression level, 1 to 22.")
    threshold_bytes: int = Field(
        default=256,
        ge=0,
        le=1_048_576,
        description="Values smaller than this many bytes are stored uncompressed.",
    )


class EncryptionSpec(_Model):
    enabled: bool = Field(
        default=True,
        description=(
            "Encrypt stored values with the shared keyring (AEAD). Turn off only for debugging:"
            " values are then readable with etcdctl."
        ),
    )


class StorageSpec(_Model):
    compression: CompressionSpec = Field(
        default_factory=CompressionSpec,
        description="Compression of values written to etcd (applied before encryption).",
    )
    encryption: EncryptionSpec = Field(
        default_factory=EncryptionSpec,
        description="Encryption of values written to etcd (applied after compression).",
    )


class CanarySpec(_Model):
    model_config = ConfigDict(
        json_schema_extra={
            # Refused by `kubectl apply` too, not only by the operator's parse.
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.instances) != has(self.percent)",
                    "message": "spec.rollout.canary needs exactly one of instances or percent",
                }
            ]
        }
    )

    instances: int | None = Field(
        default=None,
        ge=1,
        description="How many instances try a new version first (or use percent).",
    )
    percent: int | None = Field(
        default=None,
        ge=1,
        le=100,
        description="Which share of the instances try a new version first, rounded up.",
    )
    hold_seconds: int = Field(
        default=60,
        ge=0,
        le=86_400,
        description=(
            "How long every canary must report the new version and stay healthy before it is"
            " promoted to all instances."
        ),
    )
    progress_deadline_seconds: int = Field(
        default=300,
        ge=1,
        le=86_400,
        description="Abort when the canaries do not report the new version within this time.",
    )

    @model_validator(mode="after")
    def _one_size(self) -> CanarySpec:
        if (self.instances is None) == (self.percent is None):
            raise ValueError("spec.rollout.canary needs exactly one of instances or percent")
        return self


class RolloutSpec(_Model):
    max_unhealthy_percent: int = Field(
        default=50,
        ge=0,
        le=100,
        description=(
            "After an ACTIVE change, trip the breaker when more than this percentage of"
            " instances turn unhealthy within windowSeconds."
        ),
    )
    max_unhealthy_instances: int = Field(
        default=1,
        ge=0,
        description=(
            "After an ACTIVE change, trip the breaker when more than this many instances turn"
            " unhealthy within windowSeconds."
        ),
    )
    window_seconds: int = Field(
        default=300,
        ge=1,
        le=86_400,
        description="How long after an ACTIVE change the breaker watches instance health.",
    )
    history_limit: int = Field(
        default=DEFAULT_HISTORY_LIMIT,
        ge=1,
        le=MAX_HISTORY_LIMIT,
        description="How many past ACTIVE versions to keep in etcd for rollback.",
    )
    on_invalid_config: InvalidConfigPolicy = Field(
        default=InvalidConfigPolicy.REJECT,
        description=(
            "What to do when spec.config fails validation: Reject keeps ACTIVE as it is;"
            " RevertToMaster also rolls ACTIVE back to the MASTER copy."
        ),
    )
    canary: CanarySpec | None = Field(
        default=None,
        description=(
            "Roll a new spec.config out to these instances first, promote it to all after"
            " holdSeconds of healthy heartbeats, abort (and freeze) when a canary fails."
            " Absent: a new version reaches every instance at once."
        ),
    )


class RestartBudgetSpec(_Model):
    enabled: bool = Field(
        default=True, description="Restart pods that miss heartbeats. False only reports them."
    )
    max_restarts: int = Field(
        default=5,
        ge=1,
        le=1000,
        description=(
            "Restarts allowed within windowSeconds. Beyond this the component is marked"
            " degraded and the operator stops restarting it."
        ),
    )
    window_seconds: int = Field(
        default=1800,
        ge=60,
        le=604_800,
        description="The window over which maxRestarts is counted.",
    )
    backoff_base_seconds: int = Field(
        default=10,
        ge=0,
        le=3600,
        description="Wait before the second restart; doubles with each further restart.",
    )
    backoff_max_seconds: int = Field(
        default=600,
        ge=0,
        le=86_400,
        description="Upper bound of the wait between two restarts of the same component.",
    )


class DefenderComponentSpec(_Model):
    component_type: ComponentTypeName = Field(
        description=(
            "Which ML Defender component this is. Selects the config model the config is"
            " validated with; `custom` uses customSchema instead. Immutable."
        ),
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "self == oldSelf", "message": "componentType is immutable"}
            ]
        },
    )
    node_id: str = Field(
        default="",
        max_length=253,
        description="The node id the component registers with (e.g. detector-01).",
    )
    version: str = Field(
        default="",
        max_length=64,
        description="The component's software version, as reported in its registration.",
    )
    capabilities: list[str] = Field(
        default_factory=list,
        max_length=64,
        description="What the component can do (e.g. ddos, ransomware, traffic, internal).",
    )
    config: dict[str, Any] = Field(
        description=(
            "The component's JSON config. The first one seen becomes MASTER (never modified);"
            " each change is committed as a new ACTIVE version after validation."
        ),
    )
    custom_schema: dict[str, Any] | None = Field(
        default=None,
        description=(
            "JSON Schema the config must satisfy. Required when componentType is custom,"
            " forbidden otherwise."
        ),
    )
    selector: Selector = Field(
        description="Which pods are instances of this component.",
    )
    heartbeat: HeartbeatSpec = Field(
        default_factory=HeartbeatSpec,
        description="How instances prove they are alive, and when they are restarted.",
    )
    storage: StorageSpec = Field(
        default_factory=StorageSpec,
        description="How this component's values are stored in etcd.",
    )
    rollout: RolloutSpec = Field(
        default_factory=RolloutSpec,
        description="Guards against a bad config spreading: blast-radius breaker and history.",
    )
    restart_budget: RestartBudgetSpec = Field(
        default_factory=RestartBudgetSpec,
        description="Limits on restarting pods that miss heartbeats.",
    )
    retention: RetentionPolicy = Field(
        default=RetentionPolicy.KEEP,
        description=(
            "What happens to this component's etcd data when the resource is deleted: Keep"
            " leaves it (re-creating the resource resumes it), Purge deletes every key."
        ),
    )

    @model_validator(mode="after")
    def _custom_schema_only_for_custom(self) -> DefenderComponentSpec:
        is_custom = self.component_type is ComponentTypeName.CUSTOM
        if is_custom and self.custom_schema is None:
            raise ValueError("componentType custom needs customSchema")
        if not is_custom and self.custom_schema is not None:
            raise ValueError("customSchema is only allowed with componentType custom")
        return self


# The CEL twins of the validator above, so the API server refuses what the operator would.
SPEC_VALIDATIONS: list[dict[str, str]] = [
    {
        "rule": "self.componentType != 'custom' || has(self.customSchema)",
        "message": "componentType custom needs customSchema",
    },
    {
        "rule": "self.componentType == 'custom' || !has(self.customSchema)",
        "message": "customSchema is only allowed with componentType custom",
    },
]


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(_Model):
    """One observation about the component, keyed by type (Kubernetes API conventions)."""

    type: str = Field(
        max_length=316,
        description=(
            "Ready, ConfigSynced, Heartbeating, KeyCurrent, Misconfigured or KeyUnavailable."
        ),
    )
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(
        max_length=1024,
        pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
        description="One CamelCase word saying why, for machines.",
    )
    message: str = Field(
        default="", max_length=MESSAGE_MAX_CHARS, description="What happened, for people."
    )
    last_transition_time: datetime = Field(
        description="When status last changed (not when the condition was last checked).",
    )
    observed_generation: int = Field(
        default=0, ge=0, description="The metadata.generation this condition was computed for."
    )


class InstancesStatus(_Model):
    alive: int = Field(default=0, ge=0, description="Instances with a live heartbeat.")
    expected: int = Field(default=0, ge=0, description="Pods that match spec.selector.")


class RolloutStatus(_Model):
    sequence: int = Field(
        default=0,
        ge=0,
        description=(
            "Sequence of the rollout's signed record in etcd; a record below it, or this one"
            " back after the rollout ended, is a saved record put back and is removed."
        ),
    )
    version: int = Field(default=0, ge=0, description="The version being rolled out.")
    base_version: int = Field(default=0, ge=0, description="The ACTIVE version it replaces.")
    digest: str = Field(default="", description="SHA-256 of the candidate config.")
    since: datetime | None = Field(default=None, description="When the rollout began.")
    by: str = Field(default="", description="Who changed spec.config (the candidate's author).")
    canaries: list[str] = Field(default_factory=list, description="The canary instances.")
    phase: str = Field(default="", description="Progressing, Promoted or Aborted.")
    healthy_since: datetime | None = Field(
        default=None, description="Since when every canary reports the version, healthy."
    )
    message: str = Field(default="", description="What the rollout waits for, or why it ended.")
    judged_history_limit: int | None = Field(
        default=None,
        ge=1,
        description=(
            "The spec.rollout.historyLimit the storage budget judged the rollout's start under;"
            " a promotion under a higher one is judged again, and keeps no more than the budget"
            " allows."
        ),
    )


class NameClaimStatus(_Model):
    component: str = Field(default="", description="The etcd component name held.")
    uid: str = Field(
        default="",
        description="metadata.uid of this resource when the claim was allowed (another uid: a"
        " status restored onto a re-created object, which holds nothing).",
    )


class DefenderComponentStatus(_Model):
    observed_generation: int = Field(
        default=0, ge=0, description="The metadata.generation the operator last acted on."
    )
    active_version: int = Field(default=0, ge=0, description="Version number of ACTIVE in etcd.")
    master_digest: str = Field(default="", description="SHA-256 of MASTER's canonical JSON.")
    active_digest: str = Field(default="", description="SHA-256 of ACTIVE's canonical JSON.")
    spec_config_digest: str = Field(
        default="",
        description=(
            "SHA-256 of the spec.config last handled; a different digest means spec.config"
            " changed and is committed (or refused) on the next reconcile."
        ),
    )
    instances: InstancesStatus = Field(
        default_factory=InstancesStatus, description="Live instances against expected pods."
    )
    instance_summary: str = Field(default="0/0", description="alive/expected, for `kubectl get`.")
    last_heartbeat_time: datetime | None = Field(
        default=None,
        description=(
            "Newest heartbeat the operator has confirmed from any instance (its lease's last"
            " renewal). Not a live reading: rewritten on its own at most every"
            " STATUS_HEARTBEAT_REFRESH_SECONDS (60 s), and a lease is asked again only once"
            " the TTL last seen could have run out, so on a healthy component its age climbs"
            " to about the larger of the two (the TTL is heartbeat.intervalSeconds x"
            " missedBeforeRestart, 90 s by default) before it drops back. Liveness is the"
            " Heartbeating condition, judged every pass; `kubectl defender status` shows each"
            " instance's last beat to the second."
        ),
    )
    restarts: int = Field(default=0, ge=0, description="Pods restarted for missed heartbeats.")
    recent_restart_times: list[datetime] = Field(
        default_factory=list,
        max_length=1000,
        description=(
            "When the operator last restarted pods of this component (the newest"
            " restartBudget.maxRestarts), so the restart budget and its backoff survive an"
            " operator restart or a failover to another replica."
        ),
    )
    rotation_stage: RotationStage = Field(
        default=RotationStage.IDLE, description="Stage of the shared key rotation."
    )
    key_fingerprint: str = Field(
        default="",
        description="Fingerprint (SHA-256 prefix, not the key) of the primary key in use.",
    )
    frozen: bool = Field(
        default=False,
        description="True while the breaker holds commits for this component.",
    )
    freeze_sequence: int | None = Field(
        default=None,
        ge=0,
        description=(
            "Sequence of the freeze marker in etcd at the operator's last look (none: not"
            " frozen); when that marker goes without the unfreeze annotation, its sequence is"
            " anchored in freezeLiftedSequence."
        ),
    )
    freeze_lifted_sequence: int | None = Field(
        default=None,
        ge=0,
        description=(
            "Sequence of the freeze marker the last unfreeze lifted; a marker at or below it"
            " is a saved one put back and is removed."
        ),
    )
    rollout: RolloutStatus | None = Field(
        default=None, description="The last canary rollout (spec.rollout.canary)."
    )
    registration: int | None = Field(
        default=None,
        ge=1,
        description=(
            "The registration of the etcd name this resource's data belongs to (stamped by the"
            " seed into the signed metadata and every encrypted value). Values and records of"
            " another registration (an earlier one of a purged name, put back) are refused and"
            " never a repair's source (docs/security.md)."
        ),
    )
    registration_cluster: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{1,16}$",
        description=(
            "The etcd cluster id (hex) registration was last anchored on. An older"
            " registration found on another cluster (a snapshot from before a purge,"
            " restored) is replaced by a new registration seeded from spec"
            " (ReseededAfterRestore); on the same cluster it is refused as a replay."
        ),
    )
    name_claim: NameClaimStatus | None = Field(
        default=None,
        description=(
            "The etcd name this resource holds (its claim was allowed). Kept in Kubernetes,"
            " which etcd write access cannot change: an owner record in etcd that names"
            " another resource is not obeyed while this says so (docs/security.md)."
        ),
    )
    last_handled_digest: str = Field(
        default="",
        description=(
            "A digest (sha256) of the spec, labels and annotations last reconciled (kopf's"
            " diff base): written with the operator's own status patch rather than as an"
            " annotation of its own."
        ),
    )
    last_handled_configuration: str = Field(
        default="",
        description=(
            "The same as JSON, as operators before lastHandledDigest wrote it: read when"
            " lastHandledDigest is absent, removed with the next reconcile's status patch."
        ),
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Ready, ConfigSynced, Heartbeating, KeyCurrent, Misconfigured, KeyUnavailable.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    )


class DefenderComponent(_Model):
    """The whole object as the operator reads it (metadata left to kopf)."""

    model_config = ConfigDict(extra="ignore")

    spec: DefenderComponentSpec = Field(
        description="What the component should run with (desired state)."
    )
    status: DefenderComponentStatus = Field(
        default_factory=DefenderComponentStatus,
        description="What the operator observed (written only by the operator).",
    )


PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Type", "type": "string", "jsonPath": ".spec.componentType"},
    {
        "name": "Ready",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
    },
    {"name": "Active", "type": "integer", "jsonPath": ".status.activeVersion"},
    {"name": "Instances", "type": "string", "jsonPath": ".status.instanceSummary"},
    # The newest confirmed heartbeat, refreshed lazily (status writes are what scale with the
    # fleet): its age is not liveness, READY and INSTANCES are.
    {
        "name": "Heartbeat",
        "type": "date",
        "jsonPath": ".status.lastHeartbeatTime",
        "description": (
            "Age of status.lastHeartbeatTime, refreshed about once a minute: on a healthy"
            " component it climbs to about the lease TTL (90 s by default) before it drops"
            " back. READY and INSTANCES judge liveness every pass."
        ),
    },
    {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {
        "name": "Reason",
        "type": "string",
        "priority": 1,
        "jsonPath": '.status.conditions[?(@.type=="Ready")].reason',
    },
    {"name": "Rotation", "type": "string", "priority": 1, "jsonPath": ".status.rotationStage"},
    # The last canary rollout's phase (Progressing, Promoted, Aborted, Superseded) and version:
    # wide only, since a finished rollout's phase stays in status until the next one.
    {"name": "Rollout", "type": "string", "priority": 1, "jsonPath": ".status.rollout.phase"},
    {"name": "Canary", "type": "integer", "priority": 1, "jsonPath": ".status.rollout.version"},
]


def parse_spec(spec: dict[str, Any]) -> DefenderComponentSpec:
    """Validate a spec as it arrives from the API server (camelCase keys)."""
    return DefenderComponentSpec.model_validate(spec)


def lift_legacy(spec: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A spec as stored, with what an older API allowed and this one refuses lifted to its
    bound, and a note per lift. The API server keeps objects written under the older schema
    (it validates only writes), and refusing them would leave running components unmonitored:
    `spec.heartbeat.missedBeforeRestart: 1` (allowed before the minimum became 2) runs as 2."""
    heartbeat = spec.get("heartbeat")
    if not isinstance(heartbeat, Mapping):
        return dict(spec), []
    misses = heartbeat.get("missedBeforeRestart")
    # `type is int`: a JSON true is not a 1 (parse_spec refuses it as it is).
    if type(misses) is not int or misses >= MIN_MISSED_BEFORE_RESTART or misses < 1:
        return dict(spec), []
    lifted = {**heartbeat, "missedBeforeRestart": MIN_MISSED_BEFORE_RESTART}
    note = (
        f"spec.heartbeat.missedBeforeRestart is {misses}, stored before the minimum became"
        f" {MIN_MISSED_BEFORE_RESTART}: run as {MIN_MISSED_BEFORE_RESTART} (with one, a beat"
        " a moment late restarts a healthy pod); set it to 2 or more to silence this"
    )
    return {**spec, "heartbeat": lifted}, [note]


def parse_stored_spec(spec: Mapping[str, Any]) -> tuple[DefenderComponentSpec, list[str]]:
    """`parse_spec` for an object the API server already holds (the operator's reconciles and
    passes), with `lift_legacy`'s notes. The admission webhook and the CRD stay strict."""
    lifted, notes = lift_legacy(spec)
    return parse_spec(lifted), notes


def raw_config_digest(config: Any) -> str:
    """Hex SHA-256 of spec.config as given, before validation: what the reconcile and the
    admission stamp compare raw configs by.

    `config_digest` wherever the library would store the config. One it refuses to store (nested
    deeper than MAX_JSON_DEPTH, which the API server takes) still needs a digest: the refusal
    records it to tell a new invalid spec from a resumed one, and without one the refusal
    itself failed (the policy onInvalidConfig skipped, the message naming no component). Its
    digest is of the same canonical JSON, without the depth check."""
    try:
        return config_digest(config)
    except ConfigValidationError:
        pass
    try:
        text = json.dumps(
            config, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except (RecursionError, TypeError, ValueError):
        # Not JSON at all (the API server sends nothing such): one digest for all of them.
        text = "\x00unrepresentable"
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
