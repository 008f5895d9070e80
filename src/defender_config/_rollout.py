"""Canary rollouts: a new config version reaches the instances a signed record names first.

```
<prefix>/components/<name>/candidate      sealed like ACTIVE: the config being tried
<prefix>/control/<name>/rollout           signed record: {version, base_version, digest,
                                          canaries, since, by, sequence}
```

An instance runs the candidate only when all of these hold, otherwise it runs ACTIVE (an ended
rollout leaves its record with no canaries, see `Rollouts.end`):

- the rollout record's MAC verifies (write access to etcd alone cannot name canaries),
- the record names this instance,
- the record's `base_version` is ACTIVE's version now: a promotion or an abort writes a new
  ACTIVE version, so a record (and candidate) put back later from an old rollout is stale and
  ignored instead of reviving a config that was aborted,
- the candidate opens (its AEAD binds it to its etcd path) and its digest is the record's,
- the record's `sequence` is not below the highest this reader has seen for the component.

The sequence is what the MAC cannot give: a point in time. A rollout that ends without a new
ACTIVE version (spec.config changed during it, and the next rollout starts on the same base)
leaves its record authentic and its base current, so a saved pair put back would run again.
Every record a writer signs carries a sequence above every earlier one of the component
(`next_record_sequence`, fed by the operator with the sequence it anchored in the
DefenderComponent status, which etcd write access cannot change); a running reader remembers
the highest it saw and refuses a lower one (RecordReplayed, alerted; the watch keeps what the
instance runs), and the operator's pass removes it (`_decisions.canary.judge_record`).
A record without a sequence (0: written before it existed) is not obeyed; the operator
re-issues it with one.

The operator decides who the canaries are and when to promote or abort; this module only writes
and reads the two values, so the library and the agent honour a rollout the same way.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ._configs import ANY_REGISTRATION, ActiveConfig, ConfigMetadata, ConfigStore
from ._errors import (
    ConflictError,
    DefenderConfigError,
    EnvelopeError,
    NotFoundError,
    RecordReplayError,
    StoreError,
)
from ._models import canonical_json, config_digest
from ._read_again import ReadAgain
from ._store import WatchHandle
from ._store_types import Compare, DeleteOp, PutOp, StoredValue, WatchEvent
from .contract import ChangeKind, next_record_sequence

__all__ = ["CanaryWatch", "RolloutRecord", "Rollouts", "next_record_sequence"]

log = logging.getLogger("defender_config.rollout")


class RolloutRecord(BaseModel):
    """`control/<name>/rollout`: which instances try which candidate, on top of which ACTIVE."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    version: int = Field(gt=0)
    base_version: int = Field(gt=0)
    digest: str = Field(min_length=64, max_length=64)
    canaries: tuple[str, ...]
    since: datetime
    by: str
    sequence: int = Field(default=0, ge=0, le=2**63 - 1)
    """Orders the rollouts of a component: higher is newer. 0: written before sequences
    existed (not obeyed). In the MAC like every field, so it cannot be raised by etcd write
    access alone."""

    @property
    def ended(self) -> bool:
        """An ended rollout's record (no canaries): what `end` leaves instead of nothing, so
        running readers learn a sequence above the rollout that ended and refuse it put back."""
        return not self.canaries


@dataclass(frozen=True, slots=True)
class _Candidate:
    record: RolloutRecord
    config: dict[str, Any] = field(repr=False)
    mod_revision: int


class Rollouts:
    """Start, read, promote and end the canary rollout of components, through one ConfigStore."""

    def __init__(self, configs: ConfigStore) -> None:
        self.configs = configs
        self.client = configs.client
        self.layout = configs.layout

    # --- writes (the operator) ------------------------------------------------------------------

    def start(
        self,
        component: str,
        config: Mapping[str, Any],
        canaries: Sequence[str],
        by: str,
        *,
        sequence: int | None = None,
        since: datetime | None = None,
        digest: str | None = None,
    ) -> RolloutRecord:
        """Seal `config` as the candidate and name `canaries` in a signed record, on top of
        ACTIVE as it is now. Validated like a commit (ConfigValidationError, alerted); refused
        while frozen (ConfigFrozenError) or when a commit lands meanwhile (ConflictError).

        `sequence`: the record's (the operator passes one above what it anchored), raised
        above the authentic record in etcd if that is higher; None takes one above that
        record and at least the clock. `since`: when the rollout began (a
        re-issued rollout keeps its own, so its deadline does not start again). `digest`: the
        config the caller means to roll out; a `config` that normalizes to another is refused
        (ConflictError, nothing written)."""
        if not canaries:
            raise ValueError("a canary rollout needs at least one canary instance")
        cs = self.configs
        freeze = cs.frozen(component)
        if freeze is not None:
            raise cs._frozen_error(component, freeze)
        meta, meta_stored = cs._metadata_for_write(component, "; seed it first")
        normalized = cs._validate(component, meta.type, config, meta.json_schema)
        now = datetime.now(UTC)
        if digest is not None and config_digest(normalized) != digest:
            raise ConflictError(
                self.layout.rollout(component),
                detail=f"the config to roll out is not the one with digest {digest[:12]}…",
                retryable=False,
            )
        # Above the record in place, an ended one included: readers that saw it refuse
        # anything lower, whatever the caller's (or its clock's) idea of the next sequence.
        current = self.record(component, ended=True)
        above = current.sequence if current is not None else 0
        if sequence is None:
            sequence = next_record_sequence(above, now=now)
        else:
            sequence = max(sequence, above + 1)
        record = RolloutRecord(
            version=meta.version + 1,
            base_version=meta.version,
            digest=config_digest(normalized),
            canaries=tuple(sorted(set(canaries))),
            since=since or now,
            by=by,
            sequence=sequence,
        )
        candidate, rollout = self.layout.candidate(component), self.layout.rollout(component)
        write = cs._recorded_write_options(component, meta)
        ops: list[PutOp | DeleteOp] = [
            PutOp(
                candidate,
                self.client.seal(
                    candidate, canonical_json(normalized), write, registration=meta.registration
                ),
            ),
            PutOp(rollout, self.client.encode_record(rollout, record.model_dump(mode="json"))),
        ]
        result = self.client.store.txn(
            [Compare.mod_revision_is(self.layout.metadata(component), meta_stored.mod_revision)],
            ops,
        )
        if not result.succeeded:
            raise ConflictError(
                rollout, expected=meta.version, found=None, detail="ACTIVE moved on meanwhile"
            )
        log.info(
            "component %s: canary rollout of version %d to %s (sequence %d)",
            component,
            record.version,
            ", ".join(record.canaries),
            record.sequence,
        )
        return record

    def end(self, component: str, *, sequence: int | None = None) -> bool:
        """End the rollout: canaries fall back to ACTIVE. The candidate is deleted; the record
        is replaced by an ended one (no canaries) under a higher sequence (`sequence`, or one
        above the record's), because deleting it would leave nothing newer than the ended
        record, and a saved copy put back would be obeyed again by every reader."""
        rollout, candidate = self.layout.rollout(component), self.layout.candidate(component)
        ops: list[PutOp | DeleteOp] = [DeleteOp(candidate)]
        current = self.decode(component, self.client.store.get(rollout), ended=True)
        if current is None:
            ops.append(DeleteOp(rollout))
        else:
            if sequence is None:
                sequence = next_record_sequence(current.sequence, now=datetime.now(UTC))
            sequence = max(sequence, current.sequence + 1)
            ended = current.model_copy(update={"canaries": (), "sequence": sequence})
            ops.append(
                PutOp(rollout, self.client.encode_record(rollout, ended.model_dump(mode="json")))
            )
        return self.client.store.txn([], ops).succeeded

    def promote(self, component: str, by: str, *, history_limit: int | None = None) -> int:
        """Commit the candidate as the next ACTIVE version (guarded on the base version) and
        end the rollout; returns the version now ACTIVE. NotFoundError without a rollout.

        `history_limit`: the versions the promotion keeps, as `ConfigStore.commit`'s (None:
        the store's). The limit in force when it is promoted, not the one when the rollout
        started: the promotion is the commit that prunes."""
        keep = self.configs._history_limit(history_limit)
        found = self._candidate(component)
        if found is None:
            raise NotFoundError(
                self.layout.rollout(component), detail=f"{component!r} has no canary rollout"
            )
        # The version is the author's (who changed the config), the note says who promoted it.
        version = self.configs.commit(
            component,
            found.config,
            found.record.by,
            expected_version=found.record.base_version,
            note=f"canary of version {found.record.version} promoted by {by}",
            history_limit=keep,
        )
        self.end(component)
        return version

    def abort(
        self,
        component: str,
        reason: str,
        by: str,
        *,
        freeze_after: int = 0,
        history_limit: int | None = None,
    ) -> int | None:
        """Freeze commits, end the rollout and write the base config again as a new ACTIVE
        version (same config, so no instance reloads; the new version makes a replayed rollout
        record stale). Returns that version, None when there was no authentic rollout.
        `freeze_after`: as `ConfigStore.freeze`'s `after`; `history_limit`: the versions that
        new version keeps, as `promote`'s."""
        # Checked before the freeze: a refused abort must not leave commits frozen.
        keep = self.configs._history_limit(history_limit)
        record = self.record(component)
        self.configs.freeze(component, reason, by=by, after=freeze_after)
        self.end(component)
        if record is None:
            return None
        return self.configs.rollback(
            component,
            record.base_version,
            by,
            change=ChangeKind.CANARY_ABORT,
            history_limit=keep,
        )

    # --- reads (instances and the operator) -----------------------------------------------------

    def record(self, component: str, *, ended: bool = False) -> RolloutRecord | None:
        """The rollout in progress, if its record is present and authentic. One that fails
        its MAC or is a sealed envelope (or has no keyring to check it with) is reported and
        ignored: never obeyed.
        An ended rollout's record counts as none unless `ended`."""
        path = self.layout.rollout(component)
        return self.decode(component, self.client.store.get(path), ended=ended)

    def decode(
        self, component: str, stored: StoredValue | None, *, ended: bool = False
    ) -> RolloutRecord | None:
        """`record` from what a caller read at `layout.rollout(component)` itself (in a
        transaction with other reads, say)."""
        found = self._decode(component, stored)
        if found is not None and found.ended and not ended:
            return None
        return found

    def _decode(self, component: str, stored: StoredValue | None) -> RolloutRecord | None:
        if stored is None:
            return None
        if not self.client.verifies_records:
            log.warning("rollout record of %s ignored: no keyring to authenticate it", component)
            return None
        try:
            data = self.client.decode_record(stored.key, stored.value, component=component)
            return RolloutRecord.model_validate(data)
        except EnvelopeError as exc:
            # A RecordAuthError, or a sealed envelope where the plaintext record belongs
            # (anyone with etcd write access can put one there): alerted by decode_record, and
            # ignored alike, so the instance runs ACTIVE instead of failing its reads.
            log.warning("rollout record of %s ignored: %s", component, exc)
            return None
        except ValidationError as exc:
            log.warning("rollout record of %s ignored, not a rollout record: %s", component, exc)
            return None

    def _candidate(self, component: str, meta: ConfigMetadata | None = None) -> _Candidate | None:
        """The candidate the rollout record names, opened as a value of the registration of
        `meta` (the metadata `get_active` just checked) or, without it, of the metadata read
        and checked now. Never of the metadata record as it happens to be: anyone with etcd
        write can put an earlier registration's back, and with it a candidate of that one."""
        record = self.record(component)
        if record is None:
            return None
        path = self.layout.candidate(component)
        stored = self.client.store.get(path)
        if stored is None:
            return None
        if meta is None:
            meta = self.configs._value_meta(component, stored)
        config = self.configs._open_config(
            path,
            stored.value,
            component,
            self.configs._read_options(component, meta),
            meta.registration if meta is not None else ANY_REGISTRATION,
        )
        if config_digest(config) != record.digest:
            exc = RecordReplayError(
                path, "the candidate is not the config its rollout record names"
            )
            self.client.report(exc, path=path, component=component)
            raise exc
        return _Candidate(record, config, stored.mod_revision)

    def effective(self, component: str, instance: str) -> ActiveConfig:
        """The config `instance` must run: the candidate when an authentic rollout on top of
        the current ACTIVE names it, ACTIVE otherwise (also when the candidate cannot be
        opened: reported, and the instance stays on what is known good).

        RecordReplayError (alerted) when the record, built on the current ACTIVE, is older than
        one this reader saw: a saved record put back (an ended one too). Raised rather than
        answered with ACTIVE so a watch keeps what the instance runs (the current rollout's
        candidate, say) until the operator puts the current record back."""
        active = self.configs.get_active(component)
        record = self.record(component, ended=True)
        if record is None:
            return active
        obeyed = instance in record.canaries and active.version == record.base_version
        if record.sequence == 0:
            if obeyed:
                log.warning(
                    "rollout record of %s has no sequence (written before it existed): not "
                    "followed until the operator issues it again",
                    component,
                )
            return active
        highest = self.configs._remember_rollout(component, record.sequence)
        if active.version != record.base_version:
            if instance in record.canaries:
                log.info(
                    "rollout record of %s is for base version %d, ACTIVE is %s: ignored",
                    component,
                    record.base_version,
                    active.version,
                )
            return active
        if record.sequence < highest:
            # Whatever it says (an ended rollout included): the record it overwrote is the
            # current one, so nothing changes for this instance until that is back.
            path = self.layout.rollout(component)
            exc = RecordReplayError(
                path,
                f"rollout sequence {record.sequence} is older than sequence {highest} this "
                "reader already followed (a saved record put back)",
            )
            self.client.report(exc, path=path, component=component)
            raise exc
        if instance not in record.canaries:
            return active
        try:
            found = self._candidate(component, active.metadata)
        except (EnvelopeError, StoreError) as exc:  # alerted already, or transient
            log.warning("candidate of %s not used: %s", component, exc)
            return active
        except DefenderConfigError as exc:
            # Opened, but not a config (not a JSON object, say): alerted like ACTIVE's would
            # be; the instance stays on ACTIVE.
            self.client.report(exc, path=self.layout.candidate(component), component=component)
            log.warning("candidate of %s not used: %s", component, exc)
            return active
        if found is None or found.record != record:
            return active
        return ActiveConfig(
            component,
            found.config,
            record.version,
            record.digest,
            found.mod_revision,
            codec=active.codec,
            metadata=active.metadata,
        )

    def watch(
        self,
        component: str,
        instance: str,
        callback: Callable[[ActiveConfig], None],
        *,
        on_error: Callable[[DefenderConfigError], None] | None = None,
    ) -> CanaryWatch:
        """Like `ConfigStore.watch_active`, for the config `instance` must run (`effective`):
        called once at start and whenever ACTIVE or the rollout record changes what it is."""
        return CanaryWatch(self, component, instance, callback, on_error)


class CanaryWatch:
    """Watches ACTIVE and the rollout record of one component for one instance."""

    def __init__(
        self,
        rollouts: Rollouts,
        component: str,
        instance: str,
        callback: Callable[[ActiveConfig], None],
        on_error: Callable[[DefenderConfigError], None] | None,
    ) -> None:
        self._rollouts, self._component, self._instance = rollouts, component, instance
        self._callback, self._on_error = callback, on_error
        self._lock = threading.Lock()
        self._last: str | None = None
        # Reads of the effective config etcd answered (not the cache): what tells a reader
        # that an error it reported meanwhile (etcd away, a right missing) is over, also when
        # the read found nothing new to hand out.
        self.answers = 0
        # A read etcd did not answer after an event is read again until it does (`ReadAgain`).
        # On a thread of its own: the first read is on the caller's thread, and the two watches
        # go on handing out events meanwhile.
        self._stopped = threading.Event()
        etcd = rollouts.client.settings.etcd
        self._again = ReadAgain(
            self._read,
            wait=self._stopped.wait,
            report=self._fail,
            base=etcd.backoff_base_seconds,
            cap=etcd.backoff_max_seconds,
            name=f"canary watch {component}/{instance}",
            own_thread=True,
        )
        store, layout = rollouts.client.store, rollouts.layout
        paths = (layout.active_config(component), layout.rollout(component))
        start = store.current_revision(paths[0]) + 1
        self._refresh()
        self._handles: list[WatchHandle] = [
            store.watch_key(p, self._on_event, start_revision=start, on_error=self._watch_failed)
            for p in paths
        ]

    def _on_event(self, event: WatchEvent) -> None:
        del event  # what changed does not matter: the effective config is read again
        self._refresh()

    def _watch_failed(self, exc: StoreError) -> None:
        # Reported once, as before, and read again until etcd answers: the watch resumes from
        # the next revision and hands out nothing, so without a read nothing would say the
        # outage is over (`answers`) to a reader whose heartbeats are held meanwhile.
        self._again.missed(exc)

    def _fail(self, exc: StoreError | DefenderConfigError) -> None:
        if self._on_error is None:
            log.error("canary watch %s/%s: %s", self._component, self._instance, exc)
            return
        try:
            self._on_error(exc)
        except Exception:
            log.exception("canary watch on_error callback failed")

    def _refresh(self) -> None:
        try:
            answered = self._read()
        except StoreError as exc:
            # Transient (etcd away): the reader's heartbeat says so, not an alert record.
            self._again.missed(exc)
            return
        if not answered:
            self._again.missed(None)  # what etcd holds now is not known yet

    def _read(self) -> bool:
        """Hand out the effective config if it changed. True when etcd answered the read, False
        when the cache did; StoreError when etcd did not answer."""
        with self._lock:
            try:
                active = self._rollouts.effective(self._component, self._instance)
            except NotFoundError:
                return True  # not registered yet: nothing to run (as `watch_active`)
            except EnvelopeError as exc:
                # Alerted already (client.open, record checks).
                self._fail(exc)
                return True
            except StoreError:
                raise
            except DefenderConfigError as exc:
                # As `ConfigStore.watch_active`: an ACTIVE that opens but is not a config (not
                # a JSON object, say) is alerted here, where it is found, for every reader.
                rollouts = self._rollouts
                path = rollouts.layout.active_config(self._component)
                rollouts.client.report(exc, path=path, component=self._component)
                self._fail(exc)
                return True
            if not active.stale:
                self.answers += 1
            if not active.outdated and active.digest != self._last:
                self._last = active.digest
                self._callback(active)
            return not active.stale

    def cancel(self) -> None:
        self._stopped.set()
        for handle in self._handles:
            handle.cancel()
