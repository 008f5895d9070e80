"""Scrub: open every sealed value of a component (MASTER, ACTIVE, the kept history) with the
keyring and check ACTIVE against its authenticated metadata digest; restore ACTIVE from the
history entry of the same version when that entry verifies.

Nothing here reports through the client's alerter: a scrub reads values nobody asked for, and
its findings are the caller's to announce once (the operator turns them into a condition, an
Event and an alert), not an alert per pass. Findings name keys and stable reasons, never
contents or key material.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from ._configs import ConfigMetadata, ConfigStore, _decode_config
from ._errors import DefenderConfigError, RecordAuthError, RepairRefusedError
from ._models import canonical_json, config_digest
from ._store_types import Compare, GetOp, PutOp, StoredValue

__all__ = ["ScrubReport", "ValueCheck", "restore_active", "scrub_component"]

log = logging.getLogger("defender_config.scrub")

ValueKind = Literal["master", "active", "history", "metadata"]

#: ACTIVE opened but is not the config its authenticated metadata names (an older sealed
#: value put back, or the metadata and ACTIVE of two different writes).
DIGEST_MISMATCH = "DigestMismatch"
MISSING = "Missing"


@dataclass(frozen=True, slots=True)
class ValueCheck:
    """One stored value as the scrub found it. `version`: the history entry's version, or for
    ACTIVE and metadata the version the metadata record names (None when unknown). `reason` is
    a stable word (the library error's reason, DigestMismatch, Missing); `detail` says why
    without any config content."""

    path: str
    kind: ValueKind
    ok: bool
    version: int | None = None
    reason: str = ""
    detail: str = ""


@dataclass(frozen=True, slots=True)
class ScrubReport:
    component: str
    checks: tuple[ValueCheck, ...]
    revision: int
    """The etcd revision every value was read at (one transaction)."""

    @property
    def failures(self) -> tuple[ValueCheck, ...]:
        return tuple(c for c in self.checks if not c.ok)

    @property
    def sealed_checked(self) -> int:
        """How many sealed values were opened (the metadata record is not one)."""
        return sum(1 for c in self.checks if c.kind != "metadata")


def _first(found: tuple[StoredValue, ...]) -> StoredValue | None:
    return found[0] if found else None


def _open(
    configs: ConfigStore, sv: StoredValue, component: str, meta: ConfigMetadata | None
) -> str:
    """The digest of the config in `sv`; raises the library's typed error when it does not open
    (wrong key, flipped byte, not an envelope, not JSON). Not alerted: the caller reports."""
    options = configs._read_options(component, meta)
    data = configs.client.envelope.open(sv.value, sv.key, options)
    if meta is not None:
        configs._check_value(sv.key, sv.value, component, meta.registration, report=False)
    return config_digest(_decode_config(sv.key, data, component))


def _failed(
    path: str, kind: ValueKind, version: int | None, exc: DefenderConfigError
) -> ValueCheck:
    # The reason and the error's own message: the library's messages name keys and key ids,
    # never contents (errors hold no material, docs/security.md).
    return ValueCheck(path, kind, False, version, exc.reason, str(exc)[:500])


def scrub_component(configs: ConfigStore, component: str) -> ScrubReport | None:
    """Check every sealed value of `component`, read in one transaction. None when the
    component has no values (never registered). StoreError when etcd cannot be read."""
    lay, c = configs.layout, configs.client
    master_key, active_key, meta_key = (
        lay.master_config(component),
        lay.active_config(component),
        lay.metadata(component),
    )
    result = c.store.txn(
        [],
        [
            GetOp(master_key),
            GetOp(active_key),
            GetOp(meta_key),
            GetOp(lay.history_dir(component), prefix=True),
        ],
    )
    master_sv, active_sv, meta_sv = (_first(g) for g in result.gets[:3])
    history = result.gets[3]
    if master_sv is None and active_sv is None and meta_sv is None and not history:
        return None
    checks: list[ValueCheck] = []
    meta: ConfigMetadata | None = None
    if meta_sv is None:
        checks.append(ValueCheck(meta_key, "metadata", False, None, MISSING, "no metadata record"))
    else:
        try:
            meta = configs._decode_metadata(meta_key, meta_sv.value, component, report=False)
            checks.append(ValueCheck(meta_key, "metadata", True, meta.version))
        except DefenderConfigError as exc:
            checks.append(_failed(meta_key, "metadata", None, exc))
    if master_sv is None:
        checks.append(ValueCheck(master_key, "master", False, None, MISSING, "no MASTER value"))
    else:
        try:
            _open(configs, master_sv, component, meta)
            checks.append(ValueCheck(master_key, "master", True))
        except DefenderConfigError as exc:
            checks.append(_failed(master_key, "master", None, exc))
    version = meta.version if meta is not None else None
    if active_sv is None:
        checks.append(ValueCheck(active_key, "active", False, version, MISSING, "no ACTIVE value"))
    else:
        checks.append(_check_against(configs, active_sv, "active", component, meta, version))
    for sv in history:
        parsed = lay.parse(sv.key)
        if parsed is None or parsed.version is None:
            continue
        if meta is not None and parsed.version == meta.version:
            checks.append(_check_against(configs, sv, "history", component, meta, parsed.version))
            continue
        try:
            _open(configs, sv, component, meta)
            checks.append(ValueCheck(sv.key, "history", True, parsed.version))
        except DefenderConfigError as exc:
            checks.append(_failed(sv.key, "history", parsed.version, exc))
    return ScrubReport(component, tuple(checks), result.revision)


def _check_against(
    configs: ConfigStore,
    sv: StoredValue,
    kind: ValueKind,
    component: str,
    meta: ConfigMetadata | None,
    version: int | None,
) -> ValueCheck:
    """A value that must hold the config the metadata names: it opens and its digest is the
    metadata's (only an authenticated metadata record can vouch for it)."""
    try:
        digest = _open(configs, sv, component, meta)
    except DefenderConfigError as exc:
        return _failed(sv.key, kind, version, exc)
    if meta is None:
        return ValueCheck(sv.key, kind, True, version)
    if digest != meta.digest:
        return ValueCheck(
            sv.key,
            kind,
            False,
            version,
            DIGEST_MISMATCH,
            f"opens, but is not the config of metadata version {meta.version} (digest"
            f" {digest[:12]}, metadata says {meta.digest[:12]})",
        )
    return ValueCheck(sv.key, kind, True, version)


def restore_active(configs: ConfigStore, component: str, version: int, *, by: str) -> None:
    """Rewrite ACTIVE from `history/<version>`, re-sealed for ACTIVE's path, when the metadata
    verifies and names `version`, and that entry opens and holds the metadata's digest. In one
    transaction guarded by the mod revisions of all three as checked (a commit or rewrap
    landing meanwhile wins). RepairRefusedError otherwise: nothing is written from an
    unverified source. MASTER is never touched."""
    lay, c = configs.layout, configs.client
    active_key, meta_key, hist_key = (
        lay.active_config(component),
        lay.metadata(component),
        lay.history(component, version),
    )
    gets = c.store.txn([], [GetOp(active_key), GetOp(meta_key), GetOp(hist_key)]).gets
    active_sv, meta_sv, hist_sv = (_first(g) for g in gets)
    if meta_sv is None:
        raise RepairRefusedError(active_key, "the metadata record is missing")
    try:
        meta = configs._decode_metadata(meta_key, meta_sv.value, component, report=False)
    except RecordAuthError as exc:
        raise RepairRefusedError(
            active_key, f"the metadata record does not verify ({exc.reason})"
        ) from exc
    if meta.version != version:
        raise RepairRefusedError(
            active_key, f"the metadata names version {meta.version}, not {version}"
        )
    if hist_sv is None:
        raise RepairRefusedError(active_key, f"history version {version} is not kept")
    options = configs._read_options(component, meta)
    try:
        plain = c.envelope.open(hist_sv.value, hist_key, options)
        configs._check_value(hist_key, hist_sv.value, component, meta.registration, report=False)
        config = _decode_config(hist_key, plain, component)
    except DefenderConfigError as exc:
        raise RepairRefusedError(
            active_key, f"history version {version} does not open ({exc.reason})"
        ) from exc
    if config_digest(config) != meta.digest:
        raise RepairRefusedError(
            active_key, f"history version {version} is not the config its metadata names"
        )
    write = meta.storage.write_options(c.envelope.options) if meta.storage is not None else None
    compares = [
        Compare.mod_revision_is(meta_key, meta_sv.mod_revision),
        Compare.mod_revision_is(hist_key, hist_sv.mod_revision),
        Compare.mod_revision_is(active_key, active_sv.mod_revision if active_sv else 0),
    ]
    put = PutOp(
        active_key,
        c.seal(active_key, canonical_json(config), write, registration=meta.registration),
    )
    if not c.store.txn(compares, [put], []).succeeded:
        raise RepairRefusedError(
            active_key, "the component changed while it was repaired; scrub again"
        )
    c.alerter.event(
        "ActiveRestored",
        component,
        f"ACTIVE of {component!r} restored from history version {version} by {by}",
        instance=c.instance,
    )
    log.warning(
        "component %s: ACTIVE restored from history version %d by %s", component, version, by
    )
