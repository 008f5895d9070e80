"""The public face: `__all__` complete and sorted, the error tree as the contract states it."""

from __future__ import annotations

import inspect as pyinspect
import types

import defender_config
from defender_config import _errors


def _isort_key(name: str) -> tuple[int, str]:
    # The order ruff's RUF022 keeps: CONSTANTS, then Classes, then functions.
    return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)


def test_all_is_sorted_and_unique() -> None:
    names = defender_config.__all__
    assert names == sorted(names, key=_isort_key)
    assert len(set(names)) == len(names)


def test_all_is_complete() -> None:
    public = {
        name
        for name, value in vars(defender_config).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public == set(defender_config.__all__)
    for name in defender_config.__all__:
        assert hasattr(defender_config, name), name


def test_every_error_is_exported() -> None:
    for name in _errors.__all__:
        assert name in defender_config.__all__, name


def test_error_tree_matches_the_contract() -> None:
    e = defender_config
    tree = {
        e.SettingsError: e.DefenderConfigError,
        e.EnvelopeError: e.DefenderConfigError,
        e.UnknownKeyError: e.EnvelopeError,
        e.AuthenticationFailedError: e.EnvelopeError,
        e.CodecError: e.EnvelopeError,
        e.UnknownCodecError: e.CodecError,
        e.CodecMismatchError: e.CodecError,
        e.SizeAnomalyError: e.EnvelopeError,
        e.NotAnEnvelopeError: e.EnvelopeError,
        e.UnexpectedEnvelopeError: e.EnvelopeError,
        e.ValueTooLargeError: e.EnvelopeError,
        e.UnsupportedFormatError: e.EnvelopeError,
        e.KeyringError: e.DefenderConfigError,
        e.StoreError: e.DefenderConfigError,
        e.StoreUnavailableError: e.StoreError,
        e.ConflictError: e.StoreError,
        e.NotFoundError: e.StoreError,
        e.ConfigValidationError: e.DefenderConfigError,
        e.StoreAuthError: e.StoreError,
        e.ConfigFrozenError: e.DefenderConfigError,
        e.FileWriteError: e.DefenderConfigError,
        e.CompactionLagError: e.MaintenanceError,
        e.DefragIncompleteError: e.MaintenanceError,
    }
    for child, parent in tree.items():
        assert child.__bases__ == (parent,), child
    assert issubclass(e.DefenderConfigError, Exception)


def test_reasons_are_unique_camel_case_and_in_the_docstring() -> None:
    classes = [
        obj
        for _, obj in pyinspect.getmembers(_errors, pyinspect.isclass)
        if issubclass(obj, _errors.DefenderConfigError)
    ]
    reasons = [c.reason for c in classes]
    assert len(set(reasons)) == len(reasons)
    doc = _errors.__doc__ or ""
    for cls in classes:
        assert cls.reason.isalnum() and cls.reason[0].isupper(), cls
        assert cls.__name__ in doc and cls.reason in doc, cls


def test_errors_render_structured_fields() -> None:
    e = defender_config
    assert "at '/p'" in str(e.UnknownCodecError(7, path="/p"))
    assert "after 3 attempts" in str(e.StoreUnavailableError(["http://a:1"], "timeout", attempts=3))
    assert "endpoints: none" in str(e.StoreUnavailableError([], "no endpoints"))
    conflict = e.ConflictError("/p", expected=4, found=5)
    assert "expected revision 4, found 5" in str(conflict) and conflict.path == "/p"
    assert "re-read" in str(e.ConflictError("/p", detail="lost the race"))
    assert str(e.NotFoundError("/p", detail="register first")) == "no value at '/p'; register first"
    assert e.SettingsError("bad").message == "settings: bad"
    assert repr(e.KeyringError("x")) == "KeyringError('keyring: x')"
    sized = e.SizeAnomalyError(None, None, "odd")
    assert "declared" not in str(sized) and "odd" in str(sized)
    assert str(e.ConfigValidationError("x", [])).endswith("(0 errors): no detail")
    assert "check etcd.user/etcd.password" in str(e.StoreAuthError("permission denied", path="/p"))
    frozen = e.ConfigFrozenError("fw", why="bad rollout", since="2026-01-01T00:00:00Z", marker="/m")
    assert "reason: bad rollout, since 2026-01-01T00:00:00Z" in str(frozen)
    assert "delete '/m'" in str(frozen)
    assert "unfreeze it" in str(e.ConfigFrozenError("fw"))


def test_thousands_of_config_errors_make_a_message_of_a_few_kilobytes() -> None:
    # It goes into a condition (the CRD caps a message at 32 KiB: over it, the API server
    # refuses the whole status patch), Events and logs; each error may quote a huge value.
    e = defender_config
    errors = [e.FieldError(f"ports.{i}", f"{'9' * 1000} is too large") for i in range(5000)]
    message = str(e.ConfigValidationError("fw", errors))
    assert len(message) < 4000
    assert message.startswith("config for 'fw' rejected (5000 errors): ports.0: 999")
    assert message.endswith("…; and 4980 more")
    assert message.count("ports.") == 20
    assert e.brief_listing(["a", "b"]) == "a; b"
    assert e.brief_listing(["abcdef"] * 3, most=2, chars=4) == "abc…; abc…; and 1 more"


def test_the_store_layer_has_its_own_public_face() -> None:
    from defender_config import store

    names = store.__all__
    assert names == sorted(names, key=_isort_key) and len(set(names)) == len(names)
    public = {n for n, v in vars(store).items() if not n.startswith("_")} - {"annotations"}
    assert public == set(names)
    # Split, not duplicated: the domain API does not re-export the store's names.
    assert not set(names) & set(defender_config.__all__)


def test_no_result_shows_a_config_in_its_repr() -> None:
    # Results get logged and printed whole (`log.debug("%s", result)`, a REPL, a debugger):
    # the decrypted config they carry (MASTER, ACTIVE, a history entry, a candidate, a
    # decrypting dump) stays out of their repr.
    from datetime import UTC, datetime

    from defender_config import (
        ActiveConfig,
        ComponentOverview,
        ComponentView,
        ConfigMetadata,
        DumpEntry,
        HistoryEntry,
        Registration,
        RolloutRecord,
        SealedValue,
        SeedResult,
    )
    from defender_config._rollout import _Candidate
    from defender_config.store import StoredValue

    secret = {"api_token": "S3CRET-9f8e7d"}
    meta = ConfigMetadata(
        version=1,
        last_modified=datetime(2026, 1, 1, tzinfo=UTC),
        modified_by="ops",
        digest="ab" * 32,
        type="custom",
    )
    overview = ComponentOverview(meta, secret, None)
    seed = SeedResult(True, meta, True, overview=overview)
    active = ActiveConfig("fw", secret, 1, "ab" * 32, 5, metadata=meta)
    record = RolloutRecord(
        version=2,
        base_version=1,
        digest="cd" * 32,
        canaries=("fw-0",),
        since=datetime(2026, 1, 1, tzinfo=UTC),
        by="ops",
    )
    stored = StoredValue("/p/components/fw/active_config", b"sealed", 5, 5, 1)
    results: list[object] = [
        overview,
        seed,
        active,
        HistoryEntry(1, secret, "ab" * 32),
        ComponentView(overview=overview, cadence=None, rollout=None, alerts=()),
        Registration("fw", "fw-0", seed, active, heartbeater=None),  # type: ignore[arg-type]
        _Candidate(record, secret, 5),
        DumpEntry(stored.key, 5, 1, 0, 6, True, None, secret),
        SealedValue(b'{"api_token": "S3CRET-9f8e7d"}', stored),
    ]
    for result in results:
        assert "S3CRET" not in repr(result), type(result).__name__
        assert "S3CRET" not in str(result), type(result).__name__
