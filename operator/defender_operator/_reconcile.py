"""Reconcile one DefenderComponent: commands, seeding, commits, keyring copy, status.

Called by kopf on create, resume and spec/annotation changes (see `handlers`). Level-based: it
compares what etcd holds with the spec and writes only the difference, so running it twice, or
after an operator restart, changes nothing that is already right.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import Any, NoReturn

import kopf

from defender_config import (
    Cadence,
    ChangeKind,
    ConfigValidationError,
    DefenderConfigError,
    InvalidRollbackTargetError,
    MasterMissingError,
    RegistrationReplayError,
    StoragePolicy,
    StoreUnavailableError,
    VersionNotKeptError,
    canonical_json,
    parse_rollback_target,
    validate_config,
)
from defender_config.contract import (
    ABORT_ANNOTATION,
    ADOPT_ANNOTATION,
    PROMOTE_ANNOTATION,
    UNFREEZE_ANNOTATION,
)
from defender_operator import _api, _attribution, _canary, _storage_budget
from defender_operator._backend import ComponentState, Declared, Observation
from defender_operator._decisions import conditions as cond
from defender_operator._decisions import keycopy
from defender_operator._decisions.breaker import (
    ActiveChange,
    freeze_lifted_elsewhere,
    freeze_replayed,
    lifted_freeze,
    observed_freeze,
)
from defender_operator._decisions.ownership import (
    NAME_CLAIM_FIELD,
    OWNER_RECORD_RESTORED,
    Claim,
    ClaimAction,
    ClaimDecision,
    HolderIndex,
    Release,
    anchor_claim,
    claim_status,
    decide_claim,
    decide_release,
    decide_unreadable,
    describe_record,
    holders_lookup_needed,
    holds_name,
    owner_lookup_needed,
    pending_claim,
    release_lookup_needed,
)
from defender_operator._decisions.reads import ViewRead
from defender_operator._decisions.registration import (
    REGISTRATION_FIELD,
    RESEEDED_AFTER_RESTORE,
    RegistrationAction,
    ReplayAction,
    anchored_cluster,
    anchored_registration,
    decide_refused_record,
    decide_registration,
    decide_replayed,
    registration_fields,
    seeded_registration,
)
from defender_operator._decisions.restarts import restart_history
from defender_operator._decisions.restore import (
    RECOMMITTED,
    WENT_BACK,
    Regression,
    judge_regression,
    seen_active,
)
from defender_operator._decisions.seeding import StoredState, plan_seed
from defender_operator._errors import (
    RETRY_KEYRING,
    RETRY_STORE_UNAVAILABLE,
    ForeignSecretError,
    KeyDropRefusedError,
    KeySecretError,
    OwnerRecordError,
    kopf_errors,
)
from defender_operator._metrics import COMMITS, record_conditions
from defender_operator._outcome import (
    ConfigVerdict,
    Event,
    Outcome,
    normal,
    post_events,
    take,
    warning,
)
from defender_operator._pods import PodIndex, held_pods, select_pods
from defender_operator._runtime import ComponentMemory, Runtime, spec_key, utcnow


def storage_policy(storage: _api.StorageSpec) -> StoragePolicy:
    """spec.storage as the library's per-component policy (seal options of its values)."""
    return StoragePolicy(
        compress=storage.compression.enabled,
        encrypt=storage.encryption.enabled,
        level=storage.compression.level,
        threshold_bytes=storage.compression.threshold_bytes,
    )


def _etcd_name(name: str) -> str:
    # The resource name is the component name in etcd (what components register under).
    return name


async def publish_status(
    rt: Runtime,
    namespace: str,
    name: str,
    generation: int,
    current_status: Mapping[str, Any],
    fields: Mapping[str, Any],
    riders: Callable[[], Mapping[str, Any]] | None = None,
) -> None:
    """Write `fields` plus freshly computed conditions to the status subresource, with what
    `riders` gives (fresher values of fields that alone are not worth a write, such as the
    newest heartbeat time) when anything else makes the write happen."""
    mem = rt.memory(namespace, name)
    if mem.status is not None:
        # Ours as last written: the caller's copy may lag our previous write.
        current_status = mem.status
    obs = cond.Observation(
        config=mem.config_state,
        config_message=mem.config_message,
        config_reason=mem.config_reason,
        heartbeat=mem.heartbeat,
        key=mem.key,
        misconfig=mem.misconfig,
        keyring=rt.keyring_condition(),
        conflict=mem.conflict,
        cadence=mem.cadence_condition,
        corrupt=mem.corrupt,
        etcd=rt.etcd.condition(),
        rollout=mem.rollout_condition,
    )
    conditions = cond.merge(
        current_status.get("conditions") or [],
        cond.compute(obs),
        now=utcnow(),
        generation=generation,
        judged=cond.config_generations(
            generation, mem.config_generation, conflict=mem.conflict is not None
        ),
    )
    if mem.conflict is None:
        # Series are keyed by component name, and a refused resource's name is its owner's
        # (another namespace): its conditions would overwrite the owner's.
        record_conditions(name, conditions)
    patch = {**fields, "conditions": conditions}
    unchanged = all(current_status.get(k) == v for k, v in patch.items())
    if unchanged:
        mem.status = dict(current_status)
        return
    if riders is not None:
        patch.update(riders())
    stored = await rt.kube.patch_status_soon(namespace, name, patch)
    mem.status = stored


def recall(mem: ComponentMemory, status: Mapping[str, Any]) -> None:
    """Take what the last operator knew from the status, once per component: a new operator
    (restarted, or a standby taking over) shows the last known conditions until it observes
    its own instead of flapping them to Pending, and inherits the restart budget it spent."""
    if mem.history_loaded:
        return
    mem.history_loaded = True
    status = mem.status or status
    if not mem.restart_times:
        mem.restart_times = restart_history(status.get("recentRestartTimes"), limit=1000)
    conditions = status.get("conditions")
    if mem.config_state is cond.ConfigState.UNKNOWN:
        mem.config_state, mem.config_message = cond.last_config_state(conditions)
        mem.config_generation = cond.observed_generation(conditions, cond.CONFIG_SYNCED)
    mem.heartbeat = mem.heartbeat or cond.last_known(conditions, cond.HEARTBEATING)
    mem.key = mem.key or cond.last_known(conditions, cond.KEY_CURRENT)
    mem.misconfig = mem.misconfig or cond.last_known(conditions, cond.MISCONFIGURED)
    conflict = cond.last_known(conditions, cond.CONFLICT)
    if mem.conflict is None and conflict is not None and conflict.status == cond.TRUE:
        mem.conflict = conflict  # refused before: the monitor judges nothing until reconciled
    if mem.heartbeat is not None and mem.heartbeat.reason == "RestartBudgetExhausted":
        mem.degraded_reported = True  # already told: no second Event from a new operator
    if mem.key is not None and mem.key.reason == cond.KEYRING_COPY_BLOCKED:
        mem.copy_block_announced = mem.key.message  # the same: no second Event either


def state_fields(state: ComponentState) -> dict[str, Any]:
    fields = {
        "activeVersion": state.active_version or 0,
        "masterDigest": state.master_digest or "",
        "activeDigest": state.active_digest or "",
        "frozen": state.frozen,
        # What a lift outside the operator is told from (`freeze_lifted_elsewhere`).
        "freezeSequence": state.freeze_sequence,
    }
    if state.master_error is not None:
        # MASTER exists but did not open (the scrub's Corrupt condition says so): the digest
        # last shown stays, rather than one suggesting MASTER is gone.
        del fields["masterDigest"]
    return fields


Logger = logging.Logger | logging.LoggerAdapter[logging.Logger]


@dataclass(frozen=True)
class Visit:
    """One reconcile of one resource: what kopf handed over, and the operator it runs in."""

    rt: Runtime
    body: Any
    namespace: str
    name: str
    generation: int
    status: Mapping[str, Any]
    annotations: Mapping[str, str]
    logger: Logger
    holders: HolderIndex
    """kopf's index of who holds each etcd name by status (`handlers.name_holders`)."""
    pods: PodIndex
    """kopf's index of pods by label (`handlers.defender_pods`): canaries are picked among
    instances of the component's pods."""

    @property
    def component(self) -> str:
        return _etcd_name(self.name)

    @property
    def who(self) -> str:
        return f"operator:{self.rt.identity}"

    _canonical: dict[int, tuple[Mapping[str, Any], bytes, str]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def _known(self, normalized: Mapping[str, Any]) -> tuple[Mapping[str, Any], bytes, str]:
        # The config is kept with what was worked out of it, so no other object can take its
        # id during the visit.
        known = self._canonical.get(id(normalized))
        if known is None:
            text = canonical_json(normalized, component=self.component)
            known = (normalized, text, hashlib.sha256(text).hexdigest())
            self._canonical[id(normalized)] = known
        return known

    def digest(self, normalized: Mapping[str, Any]) -> str:
        """`config_digest` of a config this visit holds, worked out once per config: the plan,
        the seed, the regression check and the status each ask for it (canonical JSON and a
        hash of the whole config, on every reconcile of a thousand at once)."""
        return self._known(normalized)[2]

    def json_bytes(self, normalized: Mapping[str, Any]) -> int:
        """The length of its canonical JSON (what the storage budget counts a value by)."""
        return len(self._known(normalized)[1])


# A monitor pass run after a successful reconcile (`_monitor.after_reconcile` bound to the
# resource): given the status as stored and the reconcile's fields, it publishes both in one
# patch and returns True, or returns False and the reconcile publishes its own.
FirstPass = Callable[[Mapping[str, Any], Mapping[str, Any]], Awaitable[bool]]


async def reconcile(
    v: Visit,
    raw_spec: Mapping[str, Any],
    first_pass: FirstPass | None = None,
    handled: Mapping[str, Any] | None = None,
) -> None:
    """Run the steps under the component's lock, then publish what they found: conditions and
    status fields always (a refusal included), Events in the order the steps produced them.
    `handled`: status fields published only when the steps succeed (kopf's diff base)."""
    found_mem = v.rt.memory_of(v.namespace, v.name, _uid(v.body))
    if found_mem is None:
        # A late event of an object deleted since: its same-named successor (or nobody) is
        # what the API server holds now.
        v.logger.info(
            "%s/%s uid %s is gone: nothing to reconcile", v.namespace, v.name, _uid(v.body)
        )
        return
    mem = found_mem
    async with mem.lock:
        recall(mem, v.status)
        found = Outcome()
        try:
            with kopf_errors():
                await _steps(v, mem, raw_spec, found)
                take(mem, found, Outcome(fields=dict(handled or {})))
                _judged_on(v, mem, found)
                judged = await _finish(v, mem, found, first_pass)
        except kopf.TemporaryError as exc:
            # Conditions appear even when the first visit fails, saying why where known.
            take(mem, found, _temporary(exc, found))
            _judged_on(v, mem, found)
            await _finish(v, mem, found)
            raise
        except kopf.PermanentError as exc:
            # Not retried: a person must act, so the resource says what and why.
            v.logger.error("refused, not retried: %s", exc)
            take(mem, found, refused(exc))
            _judged_on(v, mem, found)
            await _finish(v, mem, found)
            raise
    if not judged:
        # No pass ran with the reconcile: the monitor judges heartbeats, keys and Ready right
        # away rather than at its next interval (a new component is Ready once instances are
        # seen). After one that ran, its daemon's next pass comes when that pass said.
        v.rt.wake(v.name, "reconciled", v.namespace)


def _ended(v: Visit) -> bool:
    """Whether this object was deleted, or a same-named successor handled, while its reconcile
    ran (kopf handles each uid in its own worker): its spec is not what the name holds any
    more, so it seeds, commits and publishes nothing from here on."""
    if not v.rt.ended(_uid(v.body)):
        return False
    v.logger.info("%s/%s ended during the reconcile: stopped there", v.namespace, v.name)
    return True


def _judged_on(v: Visit, mem: ComponentMemory, found: Outcome) -> None:
    """The visit judged ConfigSynced (`found.config`): on this generation. A visit that failed
    before judging it leaves the generation of the verdict shown."""
    if found.config is not None:
        mem.config_generation = v.generation


async def _finish(
    v: Visit, mem: ComponentMemory, found: Outcome, first_pass: FirstPass | None = None
) -> bool:
    """Publish; True when the first monitor pass ran and published with it (or when there
    is nothing of this object's to publish any more)."""
    if _ended(v):
        return True
    post_events(v.rt.post_event, v.body, found)  # once, even if publishing fails after
    stored = mem.status if mem.status is not None else v.status
    if first_pass is not None and await first_pass(stored, found.fields):
        return True
    await publish_status(v.rt, v.namespace, v.name, v.generation, v.status, found.fields)
    return False


async def _steps(
    v: Visit, mem: ComponentMemory, raw_spec: Mapping[str, Any], found: Outcome
) -> None:
    keyring_gate(v.rt)
    # Checked once, quietly: whether the visit may seed first depends on it, and what is wrong
    # with the spec is reported only once the name is this resource's. A custom schema is
    # whatever the resource's editor wrote, and validating with it may take the whole budget
    # (defender_config's _schema_budget): off the event loop, which serves every namespace.
    # A built-in type's model takes microseconds: no thread hand-off for it.
    if "customSchema" in raw_spec:
        parsed = await asyncio.to_thread(check_spec, v, raw_spec)
    else:
        parsed = check_spec(v, raw_spec)
    if parsed.spec is not None:
        # The reconcile's first pass (and the daemon's) judge by this spec: parsed once.
        mem.spec = (spec_key(v.body), parsed.spec)
    claimed = await claim(v, seeds_first=seeds_first(v, parsed))
    if not take(mem, found, claimed.outcome):
        return
    spec = parsed.spec_or_refusal()
    for note in parsed.lifted:
        # Each reconcile (a generation, or the operator's resume) until the spec is edited.
        v.logger.warning("%s", note)
        take(mem, found, Outcome(events=[warning(_api.HEARTBEAT_MISSES_RAISED, note)]))
    normalized, checked = parsed.normalized, reported(v, parsed)
    seeded_new = None
    if claimed.pending is not None and normalized is not None:
        # A visit that seeds first: the claim is written in one transaction with the seed.
        seeded_new = await claim_and_seed(v, spec, normalized, claimed.pending)
        # None: the name holds an owner record, metadata or MASTER (nothing was written).
        # Decide the claim on what is there, then seed as always.
        if seeded_new is None and not take(mem, found, (await claim(v)).outcome):
            return
    # The name is this resource's: say so where etcd write access cannot reach (its status),
    # so a record put back or deleted later cannot hand the name to anyone else.
    take(mem, found, Outcome(fields={NAME_CLAIM_FIELD: claim_status(v.component, _uid(v.body))}))
    # Only once the name is this resource's: a refused resource must not make the operator
    # read its component unencrypted, nor get its namespace a keyring copy.
    take(mem, found, await keyring_copy(v, mem, spec))
    take(mem, found, await unfreeze_command(v))
    take(mem, found, await rollback_command(v, history_limit=spec.rollout.history_limit))
    take(
        mem,
        found,
        await _canary.command(
            v.rt,
            v.namespace,
            v.component,
            v.annotations,
            status=v.status,
            by=v.who,
            spec=spec,
            logger=v.logger,
        ),
    )
    if normalized is None:
        take(mem, found, checked)
        take(mem, found, await refuse_invalid(v, spec))
        return
    if _ended(v):
        return
    reseeded = False
    if seeded_new is None:
        seeded_new, reseeded = await seed_or_reseed(v, spec, normalized)
    state, commit_due, seeded = seeded_new
    take(mem, found, seeded)
    anchored = anchored_registration(v.status)
    # This visit's own seed wrote the record (its fields anchor it already), else judged.
    registration = (
        None
        if REGISTRATION_FIELD in seeded.fields
        else decide_registration(anchored, state.registration)
    )
    if registration is RegistrationAction.REPLAYED:
        if replay_action(v, state.registration) is not ReplayAction.RESEED:
            await registration_replayed(v, state, anchored)
        state, commit_due, seeded = await reseed_after_restore(
            v, spec, normalized, state.registration
        )
        take(mem, found, seeded)
        registration, reseeded = None, True
    # A re-seed started a new registration at version 1: readers start its versions over, so
    # the version shown before is no regression to commit above.
    regression = (
        None
        if reseeded
        else went_back(
            mem.status if mem.status is not None else v.status, state, v.digest(normalized)
        )
    )
    if regression is not None:
        take(mem, found, regression_told(v.logger, regression))
        commit_due = commit_due or regression.recommit
    if commit_due and (state.frozen or observed_freeze(v.status) is not None):
        state, dropped = await drop_replayed_freeze(v.rt, v.component, v.status, state, v.logger)
        take(mem, found, dropped)
    if commit_due and _ended(v):
        return
    synced = ConfigVerdict(cond.ConfigState.SYNCED)
    if commit_due:
        # Until the commit lands: what a failed attempt leaves (see `_temporary`), never the
        # Synced of an earlier generation.
        take(mem, found, Outcome(config=ConfigVerdict(cond.ConfigState.UNKNOWN, _COMMITTING)))
        recommit = regression is not None and regression.recommit
        # Above the version the operator saw last: readers may have accepted it.
        above = regression.seen_version if regression is not None and recommit else 0
        state, committed = await commit(
            v, spec, normalized, state, canary=not recommit, above=above
        )
        if not take(mem, found, committed):
            return
        if regression is not None and recommit:
            told = recommitted(v.logger, regression, state)
            take(mem, found, told)
            synced = told.config or synced
    if not commit_due and state.frozen:
        # Nothing was committed and the next spec.config would be refused: the freeze stays
        # what ConfigSynced says, as the monitor's abort and the breaker leave it. Said Synced
        # here, a `kubectl defender abort` (acted on earlier in this very pass) or a resume
        # while frozen showed Ready True and ActiveDiffersFromSpec with commits frozen.
        if mem.config_state is not cond.ConfigState.FROZEN:
            take(mem, found, Outcome(config=frozen_verdict(v.name)))
    else:
        # Only now, with ACTIVE as intended: a failed commit above never shows Synced.
        take(mem, found, Outcome(config=synced))
    await _storage_budget.measure_unknown(v.rt, v.namespace, v.name, v.component)
    state, resealed = await apply_storage(v, spec, state)
    take(mem, found, resealed)
    fields = {
        **state_fields(state),
        # Anchored once known: the seed's, or the one a commit stamped on data from before
        # registrations (`decide_registration`); never moved to another afterwards.
        **(
            registration_fields(registration, state.registration, v.rt.backend.cluster_id)
            if registration is not None
            else {}
        ),
        "specConfigDigest": v.digest(normalized),
        "observedGeneration": v.generation,
        "keyFingerprint": v.rt.keyring.current().primary_fingerprint,
    }
    take(mem, found, Outcome(fields=fields))


def keyring_gate(rt: Runtime) -> None:
    """No keyring that opens the stored values (`_keyguard`): nothing is read, claimed,
    committed, seeded or copied until a person restores it (the owner record's MAC cannot be
    checked either); the status shows KeyUnavailable."""
    if not rt.keyring_ready:
        raise kopf.TemporaryError(
            f"paused, keyring unavailable: {rt.keyring_condition().message}",
            delay=RETRY_KEYRING,
        )


_COMMITTING = "committing spec.config"


def _temporary(exc: kopf.TemporaryError, found: Outcome) -> Outcome:
    if isinstance(exc, _CopyBlocked):
        return exc.outcome
    if isinstance(exc.__cause__, StoreUnavailableError):
        return Outcome(config=ConfigVerdict(cond.ConfigState.STORE_UNAVAILABLE, str(exc)))
    if isinstance(exc.__cause__, RegistrationReplayError):
        # Retried (a restore of the anchored registration's data is picked up), but refused
        # until then: ConfigSynced must not keep saying Synced over another registration's
        # record, on which nothing is committed.
        replay = exc.__cause__
        return Outcome(config=ConfigVerdict(cond.ConfigState.REFUSED, str(exc), replay.reason))
    if found.config is not None and found.config.message == _COMMITTING:
        message = f"spec.config is not committed yet, retrying: {exc}"
        return Outcome(config=ConfigVerdict(cond.ConfigState.UNKNOWN, message))
    return Outcome()


def refused(exc: kopf.PermanentError) -> Outcome:
    """A refusal retrying cannot fix: ConfigSynced False with the library's reason, and an
    Event carrying its message."""
    cause = exc.__cause__
    reason = cause.reason if isinstance(cause, DefenderConfigError) else "SpecRefused"
    return Outcome(
        events=[warning(reason, str(exc))],
        config=ConfigVerdict(cond.ConfigState.REFUSED, str(exc), reason),
    )


def _uid(body: Any) -> str:
    return str((body.get("metadata") or {}).get("uid") or "")


@dataclass(frozen=True)
class Claimed:
    """What `claim` decided. `pending`: a new name's claim, not written yet, to be written in
    the seed's transaction (`pending_claim`)."""

    outcome: Outcome
    pending: Claim | None = None


_COMMANDS = (
    UNFREEZE_ANNOTATION,
    _api.ROLLBACK_ANNOTATION,
    PROMOTE_ANNOTATION,
    ABORT_ANNOTATION,
)


@dataclass(frozen=True)
class CheckedSpec:
    """The spec as parsed and validated (`check_spec`), nothing reported yet."""

    spec: _api.DefenderComponentSpec | None  # None: it does not parse (`unparsed` says why)
    normalized: dict[str, Any] | None = None  # spec.config normalized; None when refused
    invalid: ConfigValidationError | None = None
    unparsed: ValueError | None = None
    lifted: tuple[str, ...] = ()
    """What `_api.lift_legacy` raised to this API's bounds (run so, and said so)."""

    def spec_or_refusal(self) -> _api.DefenderComponentSpec:
        if self.spec is None:
            # The API server's schema should have refused this; an old CRD version may not have.
            raise kopf.PermanentError(
                f"spec does not match the DefenderComponent schema: {self.unparsed}"
            ) from self.unparsed
        return self.spec


def check_spec(v: Visit, raw_spec: Mapping[str, Any]) -> CheckedSpec:
    try:
        spec, notes = _api.parse_stored_spec(raw_spec)
    except ValueError as exc:  # pydantic's
        return CheckedSpec(None, unparsed=exc)
    lifted = tuple(notes)
    try:
        normalized = validate_config(
            spec.component_type.value, spec.config, spec.custom_schema, component=v.component
        )
    except ConfigValidationError as exc:
        return CheckedSpec(spec, invalid=exc, lifted=lifted)
    return CheckedSpec(spec, normalized, lifted=lifted)


def seeds_first(v: Visit, parsed: CheckedSpec) -> bool:
    """Whether this visit may seed a new component with its first etcd write: a resource
    never seen seeded (its status shows no activeVersion; for any other the question is not
    worth a read of what etcd holds), no command annotation (each writes before the seed),
    and a spec that parses and validates."""
    if "activeVersion" in v.status or any(command in v.annotations for command in _COMMANDS):
        return False
    return parsed.normalized is not None


async def claim(v: Visit, *, seeds_first: bool = False) -> Claimed:
    """Make sure this resource owns its etcd name before anything is written (see
    `_decisions.ownership`); done, with the Conflict condition and a Warning Event, when
    another resource owns it. A visit that seeds first claims in the seed's transaction
    (`Claimed.pending`), written only if the name holds nothing, else decided here again."""
    rt, component = v.rt, v.component
    claimant = Claim(v.namespace, v.name, _uid(v.body))
    holders: list[Claim] | None = None
    if seeds_first:
        # The seed's compares (no owner record, metadata or MASTER) are the check etcd can
        # make, and etcd write access can empty a name: first make sure no live resource's
        # status holds it. Whatever is found is decided on a read, as for any other visit.
        holders = await _holders(v)
        if not holders:
            return Claimed(Outcome(conditions={cond.CONFLICT: None}), pending_claim(claimant))
    # A lost compare means someone wrote the record meanwhile: decide again on what is there.
    for _ in range(3):
        try:
            existing, revision = await asyncio.to_thread(rt.backend.read_claim, component)
        except OwnerRecordError as exc:
            existing, revision = None, exc.revision
            mem = rt.memory(v.namespace, v.name)
            holds = holds_name(mem.status or v.status, component, claimant.uid)
            if holds and holders is None:
                holders = await _holders(v)
            decision = decide_unreadable(claimant, holds, holders or [], str(exc))
        else:
            decision, holders = await _decide_claim(v, existing, claimant, holders)
        if decision.record is not None and not await asyncio.to_thread(
            rt.backend.write_claim, component, decision.record, revision=revision
        ):
            continue
        restored = await _restored(v, decision)
        if decision.allowed:
            return Claimed(_claimed(v, decision, existing, restored))
        v.logger.warning("refused, nothing written: %s", decision.message)
        return Claimed(
            Outcome(
                events=[*restored, warning(decision.reason, decision.message)],
                conditions={
                    cond.CONFLICT: cond.Cond(
                        cond.CONFLICT, cond.TRUE, decision.reason, decision.message
                    )
                },
                done=True,
            )
        )
    raise kopf.TemporaryError(f"the owner record of {component} keeps changing", delay=1.0)


async def _decide_claim(
    v: Visit, existing: Claim | None, claimant: Claim, holders: list[Claim] | None
) -> tuple[ClaimDecision, list[Claim] | None]:
    """The claim decision on the record, then on who holds the name by status when that can
    change it (`holders`: already listed in this visit, else None). Returns the holders too,
    so a retry after a lost compare does not list them again."""
    adopt_from = v.annotations.get(ADOPT_ANNOTATION)
    decision = decide_claim(existing, claimant, adopt_from)
    if existing is not None and owner_lookup_needed(decision, existing):
        # Asked only to refuse: the API server, not etcd, says whether that owner still exists.
        exists = await asyncio.to_thread(
            v.rt.kube.component_exists, existing.namespace, existing.name, existing.uid
        )
        decision = decide_claim(existing, claimant, adopt_from, owner_exists=exists)
    mem = v.rt.memory(v.namespace, v.name)
    claimant_holds = holds_name(mem.status or v.status, v.component, claimant.uid)
    if holders is None and holders_lookup_needed(decision, claimant_holds):
        holders = await _holders(v)
    if holders is None:
        return decision, None
    return anchor_claim(decision, existing, claimant, holders), holders


async def _holders(v: Visit) -> list[Claim]:
    """The live resources named like the claimant whose status holds its name (what etcd write
    access cannot change), from kopf's index: no API request per new component (issue #17's
    thousand creates at once). kopf fills every index from its initial listing before any
    handler runs (`operator_indexed.wait_for(True)` before `process_resource_causes` in
    kopf/_core/reactor/processing.py), and indexes each event before that object's handlers, so
    the claimant's own entry is the body handled. The index holds exactly what kopf watches
    (`watch_namespaces`, as the list it replaces did)."""
    claimant_uid = _uid(v.body)
    found = list(v.holders.get(v.component, ()))
    live = [h for h in found if h.uid == claimant_uid]
    for holder in found:
        # kopf's re-listing after a watch restart (410 Gone, a peering pause) replaces what it
        # finds but never drops an object deleted meanwhile: another holder is confirmed by
        # the API server before it refuses anyone, one GET in a case that is rare by itself.
        if holder.uid != claimant_uid and await asyncio.to_thread(
            v.rt.kube.component_exists, holder.namespace, holder.name, holder.uid
        ):
            live.append(holder)
    return live


async def _restored(v: Visit, decision: ClaimDecision) -> list[Event]:
    """An owner record that disagreed with the status was written again (RECLAIM, RESTORE):
    alerted in etcd, logged, and a Warning Event for the resource visited. Names and uids
    only: nothing of the record's MAC or of a key."""
    if decision.action not in (ClaimAction.RECLAIM, ClaimAction.RESTORE):
        return []
    assert decision.record is not None  # both write the holder's record
    named = (
        "an unreadable record (forged without the key, or damaged)"
        if decision.record_unreadable
        else describe_record(decision.restored_from)
    )
    message = (
        f"the owner record of etcd component {v.component} named"
        f" {named}, while DefenderComponent {decision.record.ref}"
        f" (uid {decision.record.uid}) holds the name by its status: put back, forged or"
        " deleted in etcd; written again for the holder"
    )
    v.logger.warning(message)
    await v.rt.write(v.component, v.rt.backend.alert, OWNER_RECORD_RESTORED, v.component, message)
    return [warning(OWNER_RECORD_RESTORED, message)]


def _claimed(
    v: Visit, decision: ClaimDecision, existing: Claim | None, restored: list[Event]
) -> Outcome:
    out = Outcome(conditions={cond.CONFLICT: None}, events=list(restored))
    if decision.action is ClaimAction.CREATE:
        v.logger.info("claimed etcd component %s", v.component)
    elif decision.action in (ClaimAction.TAKE_OVER, ClaimAction.ADOPT) and existing is not None:
        message = (
            f"etcd component {v.component} taken over from {existing.ref} (uid {existing.uid})"
        )
        v.logger.info(message)
        out.events.append(normal("NameAdopted", message))
    return out


async def keyring_copy(v: Visit, mem: ComponentMemory, spec: _api.DefenderComponentSpec) -> Outcome:
    """`prepare`, and what its keyring copy's failure or recovery shows (`_decisions.keycopy`).
    A failure ends the visit as a retry (kopf's TemporaryError): fixing the cause heals the
    component at the next attempt, without an edit of the resource. What the failure shows
    travels with the error (`_CopyBlocked.outcome`), which `reconcile` publishes as it does
    every retry's (`_temporary`)."""
    try:
        await prepare(v, spec)
    except (KeySecretError, KeyDropRefusedError) as exc:
        kind = keycopy.classify(
            getattr(exc, "status", None),
            foreign=isinstance(exc, ForeignSecretError),
            key_drop=isinstance(exc, KeyDropRefusedError),
        )
        secret = getattr(exc, "name", None) or v.rt.secrets.name
        failure = keycopy.CopyFailure(kind, v.namespace, secret, str(exc))
        blocked = keycopy.blocked_condition(failure)
        out = Outcome(
            conditions={cond.KEY_CURRENT: blocked},
            # Not reconciled past the copy: whatever ConfigSynced said is not this
            # generation's verdict.
            config=ConfigVerdict(
                cond.ConfigState.UNKNOWN,
                "not reconciled: the namespace's keyring copy could not be written (see"
                " KeyCurrent); retrying",
            ),
        )
        if keycopy.announce(mem.copy_block_announced, blocked):
            out.events.append(warning(cond.KEYRING_COPY_BLOCKED, blocked.message))
            mem.copy_block_announced = blocked.message
        v.logger.warning("keyring copy in %s not written, retrying: %s", v.namespace, exc)
        raise _CopyBlocked(str(blocked.message), out) from exc
    out = Outcome()
    if mem.key is not None and mem.key.reason in keycopy.BLOCKED_REASONS:
        # Written now: the monitor's pass judges KeyCurrent again (copy and instances).
        out.conditions[cond.KEY_CURRENT] = None
    if mem.copy_block_announced is not None:
        mem.copy_block_announced = None
        out.events.append(
            normal("KeyringCopied", f"the keyring copy in {v.namespace} is written; resuming")
        )
    return out


class _CopyBlocked(kopf.TemporaryError):
    """A keyring copy that could not be written, with what the resource shows about it."""

    def __init__(self, message: str, outcome: Outcome) -> None:
        super().__init__(message, delay=RETRY_STORE_UNAVAILABLE)
        self.outcome = outcome


async def prepare(v: Visit, spec: _api.DefenderComponentSpec) -> None:
    """What must hold before anything is read: whether this reader accepts the component
    unencrypted (from its spec, never from etcd), and the namespace's keyring copy (pods
    cannot read anything without it)."""
    rt = v.rt
    # Both are answered from memory in the common case, so no thread for them: each hand-off
    # to a thread and back waits for the GIL twice (tens of ms when the operator is busy).
    rt.backend.declare_storage(v.component, storage_policy(spec.storage))
    keyring = rt.keyring.current()
    max_age = rt.settings.secret_copy_check_seconds
    if rt.secrets.copy_is_current(keyring, v.namespace, max_age=max_age):
        return
    await asyncio.to_thread(
        functools.partial(
            rt.secrets.fan_out,
            max_age=max_age,
            referenced=lambda: rt.backend.key_usage().key_ids,
        ),
        keyring,
        v.namespace,
    )


async def unfreeze_command(v: Visit) -> Outcome:
    if UNFREEZE_ANNOTATION not in v.annotations:
        return Outcome()
    lifted = await v.rt.write(v.component, v.rt.backend.unfreeze, v.component)
    await asyncio.to_thread(v.rt.kube.remove_annotation, v.namespace, v.name, UNFREEZE_ANNOTATION)
    v.logger.info("unfrozen by command")
    out = Outcome(events=[normal("Unfrozen", "commits allowed again (unfreeze command)")])
    if lifted is not None:
        # The anchor a saved marker put back is told from (`freeze_replayed`); never lowered.
        out.fields["freezeLiftedSequence"] = max(lifted, lifted_freeze(v.status) or 0)
    return out


async def drop_replayed_freeze(
    rt: Runtime,
    component: str,
    status: Mapping[str, Any],
    state: ComponentState,
    logger: Logger,
) -> tuple[ComponentState, Outcome]:
    """Remove a freeze marker that is a saved one put back (`freeze_replayed`), so it does not
    hold commits until a person unfreezes again; `state` read again after. First, a marker the
    operator saw that is gone (lifted by a key holder's `ConfigStore.unfreeze`, or deleted) is
    anchored as lifted (`freeze_lifted_elsewhere`), as the unfreeze command does."""
    lifted = lifted_freeze(status)
    out = Outcome()
    seen = observed_freeze(status)
    anchor = freeze_lifted_elsewhere(seen, state.freeze_sequence, lifted)
    if anchor is not None:
        lifted = anchor
        out.fields["freezeLiftedSequence"] = anchor
        logger.info(
            "freeze marker sequence %d lifted outside the operator; anchored as lifted", anchor
        )
    if not freeze_replayed(state.freeze_sequence, lifted):
        return state, out
    message = (
        f"freeze marker sequence {state.freeze_sequence} is not above sequence {lifted} of the"
        " freeze lifted last: a saved marker put back; removed"
    )
    logger.warning("%s", message)
    await rt.write(component, rt.backend.unfreeze, component)
    await rt.write(component, rt.backend.alert, "RecordReplayed", component, message)
    state = await asyncio.to_thread(partial(rt.backend.state, component, tolerate_master=True))
    out.add(Outcome(events=[warning("FreezeReplayed", message)], fields=state_fields(state)))
    return state, out


async def rollback_command(v: Visit, *, history_limit: int) -> Outcome:
    """`kubectl defender rollback`; `history_limit`: the spec's now, which the new version
    keeps as a commit of spec.config would."""
    target = v.annotations.get(_api.ROLLBACK_ANNOTATION)
    if target is None:
        return Outcome()
    rt = v.rt
    try:
        parsed = parse_rollback_target(target)
    except InvalidRollbackTargetError as exc:
        await asyncio.to_thread(
            rt.kube.remove_annotation, v.namespace, v.name, _api.ROLLBACK_ANNOTATION
        )
        return Outcome(events=[warning("RollbackRefused", f"{_api.ROLLBACK_ANNOTATION}: {exc}")])
    to_version = None if parsed == "master" else parsed
    try:
        version = await rt.write(
            v.component,
            rt.backend.rollback,
            v.component,
            to_version,
            modified_by=v.who,
            history_limit=history_limit,
        )
    except VersionNotKeptError as exc:
        # No retry brings the version back, and a retried command would hold up every later
        # spec.config edit of the component behind it.
        await asyncio.to_thread(
            rt.kube.remove_annotation, v.namespace, v.name, _api.ROLLBACK_ANNOTATION
        )
        return Outcome(events=[warning("RollbackRefused", f"{_api.ROLLBACK_ANNOTATION}: {exc}")])
    # Never refused by the storage budget (the way back to a known-good config); what it
    # added is measured again by this reconcile.
    rt.memory(v.namespace, v.name).stored_bytes = None
    # The command is done: remove it so a later reconcile does not roll back again.
    await asyncio.to_thread(
        rt.kube.remove_annotation, v.namespace, v.name, _api.ROLLBACK_ANNOTATION
    )
    what = "MASTER" if to_version is None else f"version {to_version}"
    v.logger.info("rolled back to %s as ACTIVE version %s", what, version)
    return Outcome(events=[normal("RolledBack", f"ACTIVE is {what} again (version {version})")])


def reported(v: Visit, parsed: CheckedSpec) -> Outcome:
    """Why spec.config is refused (nothing when it is valid)."""
    exc = parsed.invalid
    if exc is None:
        return Outcome()
    v.logger.warning("spec.config refused, ACTIVE untouched: %s", exc)
    return Outcome(
        events=[warning("ConfigInvalid", f"spec.config refused: {exc}")],
        config=ConfigVerdict(cond.ConfigState.INVALID, str(exc)),
    )


async def refuse_invalid(v: Visit, spec: _api.DefenderComponentSpec) -> Outcome:
    """ACTIVE stays as it is, or reverts to MASTER when the spec says so; the visit ends."""
    raw_digest = _api.raw_config_digest(spec.config)
    out = Outcome(done=True)
    # Only when this invalid spec is new: a resume must not roll back once more.
    if (
        v.status.get("specConfigDigest") != raw_digest
        and spec.rollout.on_invalid_config is _api.InvalidConfigPolicy.REVERT_TO_MASTER
    ):
        version = await v.rt.write(
            v.component,
            v.rt.backend.rollback,
            v.component,
            None,
            modified_by=v.who,
            change=ChangeKind.INVALID_REVERT,
            history_limit=spec.rollout.history_limit,
        )
        out.events.append(
            warning(
                "RevertedToMaster",
                f"ACTIVE reverted to MASTER as version {version} (onInvalidConfig)",
            )
        )
    state = await asyncio.to_thread(v.rt.backend.state, v.component)
    out.fields.update(
        state_fields(state), specConfigDigest=raw_digest, observedGeneration=v.generation
    )
    return out


async def seed(
    v: Visit, spec: _api.DefenderComponentSpec, normalized: Mapping[str, Any]
) -> tuple[ComponentState, bool, Outcome]:
    """Re-sign a metadata record that does not verify, then create MASTER and ACTIVE where
    absent. Returns what etcd holds, whether a commit is due, and what happened."""
    rt, component = v.rt, v.component
    digest = v.digest(normalized)
    storage = storage_policy(spec.storage)
    out = Outcome()

    async def declare(schema_cap: int | None) -> Declared:
        return await rt.write(
            component,
            rt.backend.declare,
            component,
            spec.component_type.value,
            json_schema=spec.custom_schema,
            storage=storage,
            digest=digest,
            modified_by=v.who,
            registration=anchored_registration(v.status),
            schema_cap=schema_cap,
        )

    declared = await declare(_storage_budget.first_schema_cap(rt, v.namespace))
    judged = 0
    if declared.schema_capped:
        # spec.customSchema grows the metadata record: judged against the namespace's budget
        # (refused there, nothing written), then declared again with what was judged. Once
        # more only if the record grew meanwhile (a commit by another writer landed).
        while declared.schema_capped:
            judged = declared.schema_growth
            cap = await _storage_budget.check_schema(rt, v.namespace, v.name, component, judged)
            declared = await declare(cap)
    else:
        _storage_budget.schema_recorded(rt, v.namespace, v.name, declared.schema_growth)
    _storage_budget.schema_unrecorded(rt, v.namespace, v.name, judged, declared)
    if declared.replayed:
        shown = ", ".join(declared.replayed[:5])
        out.events.append(
            warning(
                RegistrationReplayError.reason,
                f"{len(declared.replayed)} value(s) of an earlier registration of this name were "
                f"put back in etcd ({shown}): refused, never a repair's source; the metadata "
                "record is rebuilt from this registration's history and the entries removed",
            )
        )
    if declared.resigned:
        out.events.append(
            warning(
                "MetadataResigned",
                "the metadata record in etcd did not verify (unsigned or forged); it was "
                "rebuilt from the newest authenticated config and signed",
            )
        )
    # The state came with the declare's read, unless it re-signed or recorded something.
    state = declared.state
    if state is None:
        state = await asyncio.to_thread(rt.backend.state, component)
    plan = plan_seed(
        digest,
        StoredState(state.master_digest, state.active_digest, state.active_version),
        str(v.status.get("specConfigDigest") or ""),
    )
    if plan.master_missing:
        await master_missing(v, state)
    if plan.seed_master or plan.seed_active:
        if plan.seed_master:
            # MASTER absent (with it, the seed writes nothing): a full seed, beside whatever
            # else the name keeps; never the create path (`claim_and_seed`), so worth a read.
            await _storage_budget.check_seed_in_place(
                rt,
                v.namespace,
                v.name,
                component,
                v.json_bytes(normalized),
                spec.custom_schema,
                purging=False,
            )
        try:
            state = await rt.write(
                component,
                rt.backend.seed,
                component,
                spec.component_type.value,
                normalized,
                json_schema=spec.custom_schema,
                modified_by=_attribution.author(
                    v.rt, v.body, v.namespace, v.name, v.annotations, spec.config
                ),
                storage=storage,
            )
        finally:
            # Measured by this reconcile (`measure_unknown`): the reservation, written or not,
            # is no measurement.
            rt.memory(v.namespace, v.name).stored_bytes = None
        v.logger.info(
            "seeded %s (MASTER %s, ACTIVE version %s)",
            component,
            "created" if plan.seed_master else "kept",
            state.active_version,
        )
        if plan.seed_master:
            # This seed wrote the record: its registration is the current one.
            out.fields.update(seeded_registration(state.registration, rt.backend.cluster_id))
        # No Event: a routine success on every create, one API write per component for what
        # status.activeVersion and the ConfigSynced condition already show.
    return state, plan.commit, out


async def master_missing(v: Visit, state: ComponentState) -> NoReturn:
    """MASTER is gone beside the rest (`plan_seed`): nothing is written, components keep
    running ACTIVE, and a person is told how to recover. Refused like any library refusal
    (ConfigSynced False and a Warning Event, both MasterMissing) and alerted, as the library
    alerts the same refusal of a seed when the metadata is gone too."""
    missing = MasterMissingError(v.component, [f"metadata (version {state.active_version})"])
    await v.rt.write(v.component, v.rt.backend.alert, missing.reason, v.component, str(missing))
    raise missing


async def claim_and_seed(
    v: Visit,
    spec: _api.DefenderComponentSpec,
    normalized: Mapping[str, Any],
    pending: Claim,
    *,
    registration_above: int = 0,
) -> tuple[ComponentState, bool, Outcome] | None:
    """A new name: its claim, MASTER, ACTIVE and metadata in one create-only transaction, as
    `seed` returns it; None when the owner record, metadata or a value appeared since the
    claim's read (nothing written)."""
    rt, component = v.rt, v.component
    # What `seed` would plan for a name etcd holds nothing of: seed both, commit nothing.
    absent = StoredState(None, None, None)
    plan = plan_seed(v.digest(normalized), absent, str(v.status.get("specConfigDigest") or ""))
    kept = await _storage_budget.check_seed(
        rt, v.namespace, v.name, component, v.json_bytes(normalized), spec.custom_schema
    )
    # The first pass asks etcd when each instance already beating last did (its lease): asked
    # meanwhile, that request is off the path to the first status.
    sightings = _ask_sightings(rt, component)
    seen = None
    try:
        seen = await rt.write(
            component,
            rt.backend.claim_and_seed,
            component,
            spec.component_type.value,
            normalized,
            claim=pending,
            json_schema=spec.custom_schema,
            modified_by=_attribution.author(
                v.rt, v.body, v.namespace, v.name, v.annotations, spec.config
            ),
            storage=storage_policy(spec.storage),
            cadence=wanted_cadence(rt, spec),
            alerts_since=utcnow() - timedelta(seconds=rt.settings.misconfig_window_seconds),
            registration_above=registration_above,
        )
    finally:
        if seen is None and kept:
            _storage_budget.unreserve(rt, v.namespace, v.name)
        if sightings is not None:
            await sightings
    if seen is None:
        return None
    seeded(rt, rt.memory(v.namespace, v.name), component, seen)
    v.logger.info(
        "claimed and seeded etcd component %s (ACTIVE version %s)",
        component,
        seen.state.active_version,
    )
    # The seed wrote the record: its registration is the one the status anchors.
    return (
        seen.state,
        plan.commit,
        Outcome(fields=seeded_registration(seen.state.registration, rt.backend.cluster_id)),
    )


async def seed_or_reseed(
    v: Visit, spec: _api.DefenderComponentSpec, normalized: Mapping[str, Any]
) -> tuple[tuple[ComponentState, bool, Outcome], bool]:
    """`seed`, or, when the declare's repair refused etcd's record as another registration's
    and etcd turns out to be a restored snapshot of an older one (`replay_action`), a re-seed
    (`reseed_after_restore`; then True). A replay is refused as before."""
    try:
        return await seed(v, spec, normalized), False
    except RegistrationReplayError as exc:
        if refused_action(v, exc) is not ReplayAction.RESEED:
            raise
        return await reseed_after_restore(v, spec, normalized, exc.found), True


def replay_action(v: Visit, stored: int | None) -> ReplayAction:
    """Whether a record of registration `stored` (not the anchored one, nothing of the anchored
    one left) is a replay to refuse or a restored snapshot to re-seed over."""
    return decide_replayed(
        anchored_registration(v.status),
        stored,
        anchored_on=anchored_cluster(v.status),
        cluster=v.rt.backend.cluster_id,
    )


def refused_action(v: Visit, exc: RegistrationReplayError) -> ReplayAction:
    """`replay_action` for a value the library refused (a declare's repair, or a monitor
    pass's read): only the metadata record's registration can be an older lifetime restored,
    a value of another one beside a record of the anchored registration (a MASTER put back)
    is not (`decide_refused_record`)."""
    return decide_refused_record(
        v.component,
        exc.path,
        anchored_registration(v.status),
        exc.found,
        anchored_on=anchored_cluster(v.status),
        cluster=v.rt.backend.cluster_id,
    )


async def reseed_after_restore(
    v: Visit, spec: _api.DefenderComponentSpec, normalized: Mapping[str, Any], found: int | None
) -> tuple[ComponentState, bool, Outcome]:
    """etcd was restored from a snapshot taken before this name was purged and registered
    again: it holds an older registration (`found`) than the status anchors, which every
    reader refuses and nothing of the anchored one. What a person would do (delete the
    resource with retention Purge and create it again) done here: the name's data purged, and
    the claim and a new registration above both seeded from the spec in one transaction.
    Readers holding the anchored registration take the new, higher one by themselves."""
    rt, component = v.rt, v.component
    anchored = anchored_registration(v.status) or 0
    # Before the purge: a refused re-seed leaves the restored data as it is (refused by every
    # reader, as before the re-seed), not a name emptied.
    await _storage_budget.check_seed_in_place(
        rt,
        v.namespace,
        v.name,
        component,
        v.json_bytes(normalized),
        spec.custom_schema,
        purging=True,
    )
    removed = await rt.write(component, rt.backend.purge, component)
    pending = pending_claim(Claim(v.namespace, v.name, _uid(v.body)))
    reseeded = await claim_and_seed(
        v, spec, normalized, pending, registration_above=max(anchored, found or 0)
    )
    if reseeded is None:
        # Written meanwhile by someone else: decided again on the next visit, on what is there.
        raise kopf.TemporaryError(
            f"{component} changed in etcd while it was re-seeded after a restore", delay=1.0
        )
    state, commit_due, out = reseeded
    was = f"registration {found}" if found is not None else "data from before registrations"
    message = (
        f"etcd answers as another cluster than registration {anchored} was anchored on (a"
        f" restore): it held {was} of this name, older than the anchored one, which every"
        f" reader refuses; that restored older lifetime's values ({removed} key(s)) were"
        f" replaced by registration {state.registration}, seeded from spec.config"
    )
    v.logger.warning("%s", message)
    out.events.append(warning(RESEEDED_AFTER_RESTORE, message))
    # The library's alerts of the refusal that led here (RegistrationReplayed, and
    # RegistrationReplayRemoved for the restored history) went with the purge: what
    # `kubectl defender alerts` shows of it is what was done.
    await rt.write(component, rt.backend.alert, RESEEDED_AFTER_RESTORE, component, message)
    out.add(new_lifetime(v, state))
    return state, commit_due, out


def new_lifetime(v: Visit, state: ComponentState) -> Outcome:
    """What the status and memory keep of the purged lifetime, reset as for a resource created
    again: ACTIVE and the freeze as etcd holds them now (version 1, no freeze marker), a canary
    rollout in progress ended (`_canary.lifetime_ended`), the breaker's last change (versions
    of the purged lifetime) forgotten, and ConfigSynced: spec.config is what was seeded.
    status.freezeLiftedSequence stays: a saved marker put back is still a replay, and the new
    lifetime's freezes are written above it."""
    mem = v.rt.memory(v.namespace, v.name)
    ended = (
        f"ended with the registration it belonged to: {v.component} was re-seeded after a restore"
    )
    out = Outcome(
        fields=state_fields(state), config=ConfigVerdict(cond.ConfigState.SYNCED), settled=True
    )
    out.add(_canary.lifetime_ended(mem, v.status, ended))
    return out


async def registration_replayed(v: Visit, state: ComponentState, anchored: int | None) -> NoReturn:
    """The metadata record in etcd is of another registration than the status anchors, and the
    declare's repair found nothing of the anchored one to rebuild it from: nothing is
    committed on top of it, nothing anchored over; alerted, and refused like a library
    refusal (retried: a restore of the anchored registration's data is picked up)."""
    replay = RegistrationReplayError(
        None,
        state.registration,
        anchored,
        what=f"the metadata record of {v.component!r} in etcd",
    )
    await v.rt.write(v.component, v.rt.backend.alert, replay.reason, v.component, str(replay))
    raise replay


def _ask_sightings(rt: Runtime, component: str) -> asyncio.Task[None] | None:
    """When the instances the heartbeat view holds for `component` last beat, asked in a
    thread (remembered by the registry for the pass); None when nothing needs asking."""
    if not rt.heartbeats.trusted:
        return None  # the pass reads the instances from etcd first
    instances = rt.heartbeats.instances(component)
    if not instances or rt.backend.last_seen(component, instances, ask=False) is not None:
        return None

    async def ask() -> None:
        # A failure is the pass's to report: it asks again.
        with contextlib.suppress(DefenderConfigError):
            await asyncio.to_thread(rt.backend.last_seen, component, instances)

    return asyncio.create_task(ask())


def wanted_cadence(rt: Runtime, spec: _api.DefenderComponentSpec) -> Cadence:
    """spec.heartbeat as the cadence record the operator publishes."""
    hb = spec.heartbeat
    return Cadence(
        interval_seconds=hb.interval_seconds,
        allowed_misses=hb.missed_before_restart,
        by=f"operator:{rt.identity}",
    )


def seeded(rt: Runtime, mem: ComponentMemory, component: str, seen: Observation) -> None:
    """A new component's seed read what its first pass would (in the seed's transaction):
    that pass reuses it instead of reading again (`_decisions.reads` still decides), and its
    first scrub waits one interval, as the values were written and read back just now."""
    now = utcnow()
    mem.observation = seen
    mem.observed = ViewRead(now, seen.revision, rt.changes.facts(component).own_writes)
    mem.scrubbed_at = now


def frozen_verdict(name: str) -> ConfigVerdict:
    """ConfigSynced while commits are frozen, for a pass that did not see the freeze made:
    the breaker's, an aborted canary's or a person's (this pass does not know which)."""
    return ConfigVerdict(
        cond.ConfigState.FROZEN,
        "commits are frozen (by the blast-radius breaker, an aborted canary or a person); fix"
        f" spec.config and run `kubectl annotate defendercomponent {name}"
        f" {UNFREEZE_ANNOTATION}=now`",
    )


async def commit(
    v: Visit,
    spec: _api.DefenderComponentSpec,
    normalized: Mapping[str, Any],
    state: ComponentState,
    *,
    canary: bool = True,
    above: int = 0,
) -> tuple[ComponentState, Outcome]:
    """Write spec.config as the next ACTIVE version (above `above` too: a version etcd no
    longer shows), unless the breaker froze commits; on canaries first when
    spec.rollout.canary says so and `canary` allows it."""
    rt, component = v.rt, v.component
    if state.frozen:
        verdict = frozen_verdict(v.name)
        return state, Outcome(
            events=[warning("CommitFrozen", verdict.message)],
            config=verdict,
            fields={**state_fields(state), "observedGeneration": v.generation},
            done=True,
        )
    previous = state.active_version or 0
    # Refused before anything is written, a canary's candidate included: ACTIVE stays.
    await _storage_budget.check_commit(
        rt,
        v.namespace,
        v.name,
        component,
        normalized,
        version=max(previous, above) + 1,
        history_limit=spec.rollout.history_limit,
    )
    author = _attribution.author(rt, v.body, v.namespace, v.name, v.annotations, spec.config)
    if canary and spec.rollout.canary is not None and previous > 0:
        # A canary first: ACTIVE stays as it is until the monitor promotes the candidate.
        pods = select_pods(v.pods, v.namespace, spec.selector.match_labels)
        started = await _canary.start(
            rt,
            component,
            spec.rollout.canary,
            normalized,
            status=v.status,
            by=author,
            logger=v.logger,
            pods=held_pods(pods),
            mem=rt.memory(v.namespace, v.name),
            history_limit=spec.rollout.history_limit,
        )
        if started is not None:
            started.fields.update(
                state_fields(state),
                specConfigDigest=v.digest(normalized),
                observedGeneration=v.generation,
            )
            started.done = True
            return state, started
    version = await rt.write(
        component,
        rt.backend.commit,
        component,
        spec.component_type.value,
        normalized,
        json_schema=spec.custom_schema,
        modified_by=author,
        history_limit=spec.rollout.history_limit,
        storage=storage_policy(spec.storage),
        above=above,
    )
    COMMITS.labels(component).inc()
    v.logger.info("committed ACTIVE version %s (was %s) by %s", version, previous, author)
    state = await asyncio.to_thread(rt.backend.state, component)
    return state, Outcome(
        events=[normal("Committed", f"ACTIVE version {version} committed by {author}")],
        change=ActiveChange(version=version, previous_version=previous, time=utcnow()),
    )


def went_back(shown: Mapping[str, Any], state: ComponentState, digest: str) -> Regression | None:
    """Whether ACTIVE in etcd went below the version the operator published last (`shown`:
    the status as last written), and what to do about it (`_decisions.restore`)."""
    return judge_regression(
        seen_active(shown),
        state.active_version,
        state.active_digest,
        digest,
        str(shown.get("specConfigDigest") or ""),
    )


def regression_told(logger: Logger, regression: Regression) -> Outcome:
    """What a person sees of ACTIVE gone back, before anything is done about it: a Warning
    Event when nothing will be (a deliberate difference lost); a log line otherwise, the Event
    follows the commit (`recommitted`)."""
    if regression.recommit:
        logger.warning("%s; committing spec.config again", regression.message.partition("; ")[0])
        return Outcome()
    logger.warning("%s", regression.message)
    return Outcome(events=[warning(WENT_BACK, regression.message)])


def recommitted(logger: Logger, regression: Regression, state: ComponentState) -> Outcome:
    """spec.config committed again after ACTIVE went back: a Warning Event (etcd went back,
    whoever did it, is worth a look), and ConfigSynced saying why it is in sync."""
    message = f"{regression.message} as version {state.active_version}"
    logger.warning("%s", message)
    return Outcome(
        events=[warning(RECOMMITTED, message)],
        config=ConfigVerdict(cond.ConfigState.SYNCED, message),
    )


async def apply_storage(
    v: Visit, spec: _api.DefenderComponentSpec, state: ComponentState
) -> tuple[ComponentState, Outcome]:
    """spec.storage changed alone (or MASTER was adopted from before): re-seal what is stored
    under the new policy; the config and its version stay as they are."""
    storage = storage_policy(spec.storage)
    if state.active_version is None or state.storage == storage:
        return state, Outcome()
    await v.rt.write(v.component, v.rt.backend.set_storage, v.component, storage, modified_by=v.who)
    v.logger.info("storage policy of %s is now %s", v.component, storage)
    state = await asyncio.to_thread(v.rt.backend.state, v.component)
    return state, Outcome(
        events=[
            normal(
                "StorageChanged",
                f"stored values re-sealed: compression {'on' if storage.compress else 'off'}"
                f" (level {storage.level}), encryption {'on' if storage.encrypt else 'off'}",
            )
        ]
    )


async def gone(
    rt: Runtime,
    body: Any,
    namespace: str,
    name: str,
    retention: str,
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
) -> bool:
    """The resource was deleted (its DELETED event): the monitor daemon ends, and retention
    is applied unless the Purge finalizer's handler already did. Keep has no finalizer, so
    this is its one chance; a failure only logs, because a claim whose owner the API server
    no longer holds counts as released anyway (`decide_claim`). True when the metric series
    under `name` were this resource's to drop (`Runtime.forget`)."""
    uid = _uid(body)
    applied = rt.is_gone(uid)
    rt.mark_gone(uid)
    rt.wake(name, "deleted", namespace)
    if applied:
        return False  # the finalizer's handler forgot it, series included
    try:
        return await apply_retention(rt, body, namespace, name, retention, logger)
    except (kopf.TemporaryError, kopf.PermanentError) as exc:
        logger.warning(
            "retention %s of deleted %s/%s not applied, etcd data left as is: %s",
            retention,
            namespace,
            name,
            exc,
        )
        return rt.forget(namespace, name, uid)


async def apply_retention(
    rt: Runtime,
    body: Any,
    namespace: str,
    name: str,
    retention: str,
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
) -> bool:
    """The finalizer's work on delete, by the owner only: Purge removes every etcd key of the
    component and its claim; Keep leaves the data and marks the claim released (a resource
    re-created under the same namespace/name takes it back; another namespace only by the
    adopt annotation). A resource that does not own the name touches nothing (nor does the
    old object of a re-created one whose successor took the name over first); one whose
    status holds the name owns it whatever the record in etcd says (`decide_release`). True
    when the metric series under `name` were this resource's to drop (`Runtime.forget`)."""
    component = _etcd_name(name)
    # Under the lock: a monitor pass of this component finishes first.
    async with rt.memory(namespace, name).lock:
        with kopf_errors():
            try:
                existing, revision = await asyncio.to_thread(rt.backend.read_claim, component)
            except OwnerRecordError as exc:
                logger.warning("retention skipped, etcd untouched: %s", exc)
                existing, revision = None, 0
            deleted = Claim(namespace, name, _uid(body))
            held = holds_name(body.get("status"), component, deleted.uid)
            exists = True
            if existing is not None and release_lookup_needed(existing, deleted, held):
                exists = await asyncio.to_thread(
                    rt.kube.component_exists, existing.namespace, existing.name, existing.uid
                )
            release = decide_release(existing, deleted, retention, held=held, owner_exists=exists)
            # The record did not decide: say so (below, after the release is applied).
            overruled = held and existing != deleted and release is not Release.NOTHING
            if release is Release.PURGE:
                removed = await rt.write(component, rt.backend.purge, component)
                _storage_budget.purged(rt, component)
                logger.info("retention Purge: deleted %s etcd key(s) of %s", removed, component)
            elif release is Release.KEEP:
                # The record's uid unless the status decided: a re-created owner not reconciled
                # yet releases the claim it has not taken over.
                owner = deleted if held or existing is None else existing
                released = Claim(owner.namespace, owner.name, owner.uid, released=True)
                if not await asyncio.to_thread(
                    rt.backend.write_claim, component, released, revision=revision
                ):
                    raise kopf.TemporaryError(f"owner record of {component} changed", delay=1.0)
                # Still in etcd: still its namespace's, for the storage budget.
                _storage_budget.retain(rt, namespace, name, component)
                logger.info(
                    "retention Keep: etcd data of %s left in place, claim released", component
                )
            else:
                logger.info("not the owner of etcd component %s: etcd untouched", component)
            if overruled:
                # Its status holds the name: the record (a gone owner, released or missing)
                # was put back or deleted in etcd, and did not decide. Alerted after a Purge,
                # which deletes the component's alerts with the rest.
                message = (
                    f"the owner record of etcd component {component} named"
                    f" {describe_record(existing)}, while the deleted DefenderComponent"
                    f" {deleted.ref} (uid {deleted.uid}) held the name by its status: retention"
                    f" {retention} applied for it"
                )
                logger.warning(message)
                await rt.write(
                    component, rt.backend.alert, OWNER_RECORD_RESTORED, component, message
                )
        rt.mark_gone(_uid(body))  # its DELETED event need not apply it again
        return rt.forget(namespace, name, _uid(body))
