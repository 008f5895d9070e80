"""Rollouts against the real cluster: only the instances an authentic rollout record names run
the candidate; forged, tampered, replayed or key-less records leave every instance on ACTIVE."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from defender_config import (
    ActiveConfig,
    ChangeKind,
    ConfigFrozenError,
    ConfigStore,
    ConfigValidationError,
    ConflictError,
    DefenderClient,
    Keyring,
    LibrarySettings,
    NotFoundError,
    RecordReplayError,
    Rollouts,
    config_digest,
    inspect,
)
from defender_devcluster import wait_for

pytestmark = pytest.mark.etcd

SNIFFER: dict[str, Any] = {"node_id": "sniffer-01", "version": "1.0.0", "interface": "eth0"}


def snaplen(n: int) -> dict[str, Any]:
    return {**SNIFFER, "snaplen": n}


@pytest.fixture
def rollouts(client: DefenderClient) -> Rollouts:
    configs = ConfigStore(client)
    configs.seed("sniffer", SNIFFER, "sniffer", by="test")
    return Rollouts(configs)


def alert_reasons(client: DefenderClient) -> list[str]:
    prefix = client.layout.component_alerts_dir("sniffer")
    return [json.loads(v.value).get("kind", "") for v in client.store.list_prefix(prefix)]


def test_only_the_named_canaries_run_the_candidate(rollouts: Rollouts) -> None:
    record = rollouts.start("sniffer", snaplen(512), ["pod-a"], by="alice")
    assert (record.version, record.base_version, record.canaries) == (2, 1, ("pod-a",))
    canary = rollouts.effective("sniffer", "pod-a")
    assert (canary.version, canary.config["snaplen"]) == (2, 512)
    other = rollouts.effective("sniffer", "pod-b")
    assert (other.version, other.config["snaplen"]) == (1, 256)
    assert rollouts.configs.get_active("sniffer").version == 1
    # The candidate is sealed like ACTIVE, never plaintext in etcd.
    raw = rollouts.client.store.get(rollouts.layout.candidate("sniffer"))
    assert raw is not None and b"snaplen" not in raw.value


def test_promote_commits_the_candidate_with_its_author(rollouts: Rollouts) -> None:
    rollouts.start("sniffer", snaplen(512), ["pod-a"], by="alice")
    assert rollouts.promote("sniffer", by="operator:x") == 2
    active = rollouts.configs.get_active("sniffer")
    assert active.config["snaplen"] == 512
    assert active.metadata is not None and active.metadata.modified_by == "alice"
    assert "promoted by operator:x" in (active.metadata.note or "")
    assert rollouts.record("sniffer") is None
    assert rollouts.client.store.get(rollouts.layout.candidate("sniffer")) is None
    with pytest.raises(NotFoundError, match="no canary rollout"):
        rollouts.promote("sniffer", by="operator:x")


def kept(rollouts: Rollouts) -> list[int]:
    return [e.version for e in rollouts.configs.history("sniffer")]


def test_a_promotion_keeps_the_history_limit_it_is_given_below_the_stores(
    rollouts: Rollouts,
) -> None:
    # The store keeps 3 (the settings'); the component asks for 1, as its commits did.
    for n in (300, 301, 302):
        rollouts.configs.commit("sniffer", snaplen(n), "alice", history_limit=1)
    assert kept(rollouts) == [4]
    rollouts.start("sniffer", snaplen(512), ["pod-a"], by="alice")
    assert rollouts.promote("sniffer", by="operator:x", history_limit=1) == 5
    assert kept(rollouts) == [5]


def test_a_promotion_keeps_the_history_limit_it_is_given_above_the_stores(
    rollouts: Rollouts,
) -> None:
    # Rollback points the component asked to keep (5) are not pruned to the store's 3.
    for n in (300, 301, 302, 303):
        rollouts.configs.commit("sniffer", snaplen(n), "alice", history_limit=5)
    assert kept(rollouts) == [1, 2, 3, 4, 5]
    rollouts.start("sniffer", snaplen(512), ["pod-a"], by="alice")
    assert rollouts.promote("sniffer", by="operator:x", history_limit=5) == 6
    assert kept(rollouts) == [2, 3, 4, 5, 6]


def test_a_promotion_with_a_history_limit_below_1_is_refused_with_nothing_written(
    rollouts: Rollouts,
) -> None:
    record = rollouts.start("sniffer", snaplen(512), ["pod-a"], by="alice")
    with pytest.raises(ValueError, match="history_limit must be at least 1, not 0"):
        rollouts.promote("sniffer", by="operator:x", history_limit=0)
    with pytest.raises(ValueError, match="history_limit must be at least 1, not 0"):
        rollouts.configs.commit("sniffer", snaplen(300), "alice", history_limit=0)
    assert rollouts.configs.get_active("sniffer").version == 1
    assert rollouts.record("sniffer") == record
    assert kept(rollouts) == [1]


def test_an_abort_keeps_the_history_limit_it_is_given_below_and_above_the_stores(
    rollouts: Rollouts,
) -> None:
    # The abort writes the base again as a new version: the commit that prunes, like any.
    for n in (300, 301, 302, 303):
        rollouts.configs.commit("sniffer", snaplen(n), "alice", history_limit=5)
    rollouts.start("sniffer", snaplen(512), ["pod-a"], by="alice")
    assert rollouts.abort("sniffer", "canary failed", "operator:x", history_limit=5) == 6
    assert kept(rollouts) == [2, 3, 4, 5, 6]  # the store's 3 would keep [4, 5, 6]
    rollouts.configs.unfreeze("sniffer")
    rollouts.start("sniffer", snaplen(512), ["pod-a"], by="alice")
    assert rollouts.abort("sniffer", "canary failed", "operator:x", history_limit=1) == 7
    assert kept(rollouts) == [7]


def test_an_abort_with_a_history_limit_below_1_is_refused_with_nothing_written(
    rollouts: Rollouts,
) -> None:
    record = rollouts.start("sniffer", snaplen(512), ["pod-a"], by="alice")
    with pytest.raises(ValueError, match="history_limit must be at least 1, not 0"):
        rollouts.abort("sniffer", "canary failed", "operator:x", history_limit=0)
    # Not frozen, the rollout running, no version: refused before the freeze is written.
    assert rollouts.configs.frozen("sniffer") is None
    assert rollouts.record("sniffer") == record
    assert rollouts.configs.get_active("sniffer").version == 1


def test_abort_freezes_and_makes_a_replayed_record_stale(rollouts: Rollouts) -> None:
    rollouts.start("sniffer", snaplen(9999), ["pod-a"], by="alice")
    store, layout = rollouts.client.store, rollouts.layout
    saved = [store.get(layout.rollout("sniffer")), store.get(layout.candidate("sniffer"))]
    assert rollouts.abort("sniffer", "canary failed", by="operator:x") == 2
    assert rollouts.configs.frozen("sniffer") is not None
    active = rollouts.configs.get_active("sniffer")
    assert (active.version, active.config["snaplen"]) == (2, 256)
    assert active.metadata is not None and active.metadata.change is ChangeKind.CANARY_ABORT
    with pytest.raises(ConfigFrozenError):
        rollouts.start("sniffer", snaplen(1024), ["pod-a"], by="alice")
    # An attacker puts the authentic record and candidate back: built on version 1, stale.
    for sv in saved:
        assert sv is not None
        store.put(sv.key, sv.value)
    assert rollouts.record("sniffer") is not None
    assert rollouts.effective("sniffer", "pod-a").config["snaplen"] == 256
    # Without a rollout an abort still freezes, and writes no version; its marker goes above
    # the lifted freeze the caller names (the operator's anchor).
    rollouts.end("sniffer")
    rollouts.configs.unfreeze("sniffer")
    far = 10**15
    assert rollouts.abort("sniffer", "by hand", by="oncall", freeze_after=far) is None
    frozen = rollouts.configs.frozen("sniffer")
    assert frozen is not None and frozen.sequence == far + 1


def test_a_forged_record_is_alerted_and_ignored(rollouts: Rollouts) -> None:
    store, layout = rollouts.client.store, rollouts.layout
    evil = snaplen(4096)
    store.put(layout.candidate("sniffer"), json.dumps(evil).encode())
    store.put(
        layout.rollout("sniffer"),
        json.dumps(
            {
                "version": 2,
                "base_version": 1,
                "digest": "0" * 64,
                "canaries": ["pod-a"],
                "since": "2026-01-01T00:00:00Z",
                "by": "mallory",
            }
        ).encode(),
    )
    assert rollouts.record("sniffer") is None
    assert rollouts.effective("sniffer", "pod-a").config["snaplen"] == 256
    assert "RecordUnauthenticated" in alert_reasons(rollouts.client)


def test_a_record_nested_too_deeply_to_parse_is_alerted_and_ignored(rollouts: Rollouts) -> None:
    # What an agent's canary watch reads on connect: refused like a forged record, where json
    # alone would raise RecursionError through effective() and end the agent.
    rollouts.start("sniffer", snaplen(512), ["pod-a"], by="alice")
    rollouts.client.store.put(rollouts.layout.rollout("sniffer"), b"[" * 100_000)
    assert rollouts.record("sniffer") is None
    assert rollouts.effective("sniffer", "pod-a").config["snaplen"] == 256
    assert "RecordUnauthenticated" in alert_reasons(rollouts.client)


def test_a_signed_record_that_is_no_rollout_record_is_ignored(rollouts: Rollouts) -> None:
    rollouts.client.put_record(rollouts.layout.rollout("sniffer"), {"canaries": "everyone"})
    assert rollouts.record("sniffer") is None
    assert rollouts.effective("sniffer", "pod-a").version == 1


def test_a_candidate_that_is_not_the_records_is_refused(rollouts: Rollouts) -> None:
    rollouts.start("sniffer", snaplen(512), ["pod-a"], by="alice")
    store, layout = rollouts.client.store, rollouts.layout
    # Another authentic sealed value (ACTIVE's) moved to the candidate key: the AEAD binds the
    # path, so it does not open; the instance stays on ACTIVE.
    active = store.get(layout.active_config("sniffer"))
    assert active is not None
    store.put(layout.candidate("sniffer"), active.value)
    assert rollouts.effective("sniffer", "pod-a").config["snaplen"] == 256
    # A candidate sealed for this key (and this registration) but with another config:
    # digest mismatch, alerted.
    path = layout.candidate("sniffer")
    meta = rollouts.configs.get_metadata("sniffer")
    assert meta is not None
    sealed = rollouts.client.seal(
        path, json.dumps(snaplen(4096)).encode(), registration=meta.registration
    )
    store.put(path, sealed)
    assert rollouts.effective("sniffer", "pod-a").config["snaplen"] == 256
    assert "RecordReplayed" in alert_reasons(rollouts.client)


def test_a_reader_without_a_keyring_ignores_rollouts(
    rollouts: Rollouts, settings: LibrarySettings
) -> None:
    rollouts.start("sniffer", snaplen(512), ["pod-a"], by="alice")
    plain = settings.model_copy(
        update={"envelope": settings.envelope.model_copy(update={"encrypt": False})}
    )
    keyless = DefenderClient(plain, None, registry=CollectorRegistry(), alert_sinks=[])
    try:
        assert Rollouts(ConfigStore(keyless)).record("sniffer") is None
    finally:
        keyless.close()


def test_start_refuses_bad_input(rollouts: Rollouts) -> None:
    with pytest.raises(ValueError, match="at least one canary"):
        rollouts.start("sniffer", snaplen(512), [], by="alice")
    with pytest.raises(ConfigValidationError):
        rollouts.start("sniffer", {**SNIFFER, "snaplen": 1}, ["pod-a"], by="alice")
    with pytest.raises(NotFoundError):
        rollouts.start("ghost", snaplen(512), ["pod-a"], by="alice")


def test_watch_follows_the_rollout_for_one_instance(rollouts: Rollouts) -> None:
    seen: dict[str, list[int]] = {"pod-a": [], "pod-b": []}
    lock = threading.Lock()

    def recorder(name: str) -> Any:
        def on(active: ActiveConfig) -> None:
            with lock:
                seen[name].append(int(active.config["snaplen"]))

        return on

    watches = [rollouts.watch("sniffer", n, recorder(n)) for n in seen]
    try:
        rollouts.start("sniffer", snaplen(512), ["pod-a"], by="alice")
        wait_for("pod-a on the candidate", lambda: seen["pod-a"] == [256, 512])
        rollouts.end("sniffer")
        wait_for("pod-a back on ACTIVE", lambda: seen["pod-a"] == [256, 512, 256])
        rollouts.start("sniffer", snaplen(640), ["pod-a"], by="alice")
        wait_for("pod-a on the second candidate", lambda: seen["pod-a"][-1] == 640)
        rollouts.promote("sniffer", by="operator:x")
        wait_for("pod-b on the promoted version", lambda: seen["pod-b"] == [256, 640])
        assert seen["pod-a"] == [256, 512, 256, 640]
    finally:
        for w in watches:
            w.cancel()


def test_a_key_rotation_reseals_the_candidate_and_resigns_the_record(
    rollouts: Rollouts, settings: LibrarySettings, keyring: Keyring
) -> None:
    rollouts.start("sniffer", snaplen(512), ["pod-a"], by="alice")
    staged = keyring.with_new_decrypt_only()
    new_id = next(k for k in staged.key_ids if k != keyring.primary.key_id)
    with DefenderClient(
        settings, staged.promote(new_id), registry=CollectorRegistry(), alert_sinks=[]
    ) as c2:
        assert ConfigStore(c2).rewrap_all().failed == 0
        candidate = c2.store.get(c2.layout.candidate("sniffer"))
        assert candidate is not None and inspect(candidate.value).key_id == new_id
        record = c2.store.get(c2.layout.rollout("sniffer"))
        assert record is not None and json.loads(record.value)["auth"]["kid"] == new_id
        after = Rollouts(ConfigStore(c2))
        assert after.effective("sniffer", "pod-a").config["snaplen"] == 512
        assert after.effective("sniffer", "pod-b").config["snaplen"] == 256


# --- saved records put back after the rollout ended (docs/security.md, "Replays") ---------------


def saved_pair(rollouts: Rollouts) -> list[Any]:
    store, layout = rollouts.client.store, rollouts.layout
    pair = [store.get(layout.rollout("sniffer")), store.get(layout.candidate("sniffer"))]
    assert all(sv is not None for sv in pair)
    return pair


def put_back(rollouts: Rollouts, pair: list[Any]) -> None:
    """The attacker's raw etcd put of authentic values saved earlier."""
    for sv in pair:
        rollouts.client.store.put(sv.key, sv.value)


def test_end_leaves_an_ended_record_under_a_higher_sequence(rollouts: Rollouts) -> None:
    record = rollouts.start("sniffer", snaplen(512), ["pod-a"], by="alice")
    assert record.sequence > 0
    assert rollouts.end("sniffer")
    assert rollouts.record("sniffer") is None
    ended = rollouts.record("sniffer", ended=True)
    assert ended is not None and ended.ended and ended.sequence > record.sequence
    assert rollouts.client.store.get(rollouts.layout.candidate("sniffer")) is None
    assert rollouts.effective("sniffer", "pod-a").config["snaplen"] == 256
    # A new rollout goes above the ended record, even when the caller names a lower sequence
    # (another replica's clock behind), and so does the next end.
    again = rollouts.start("sniffer", snaplen(640), ["pod-a"], by="alice", sequence=5)
    assert again.sequence == ended.sequence + 1
    assert rollouts.end("sniffer", sequence=6)
    last = rollouts.record("sniffer", ended=True)
    assert last is not None and last.sequence == again.sequence + 1
    # Ending with nothing authentic there deletes what there is, as before.
    rollouts.client.store.put(rollouts.layout.rollout("sniffer"), b"junk")
    assert rollouts.end("sniffer")
    assert rollouts.client.store.get(rollouts.layout.rollout("sniffer")) is None


def test_a_running_reader_refuses_a_saved_rollout_put_back_after_it_ended(
    rollouts: Rollouts,
) -> None:
    rollouts.start("sniffer", snaplen(9999), ["pod-a"], by="alice")
    assert rollouts.effective("sniffer", "pod-a").config["snaplen"] == 9999
    saved = saved_pair(rollouts)
    rollouts.end("sniffer")  # spec.config went back: ACTIVE stays version 1
    assert rollouts.effective("sniffer", "pod-a").config["snaplen"] == 256
    put_back(rollouts, saved)
    # Authentic and built on the current ACTIVE: only the sequence tells it is old.
    with pytest.raises(RecordReplayError, match="older than sequence"):
        rollouts.effective("sniffer", "pod-a")
    assert "RecordReplayed" in alert_reasons(rollouts.client)
    # Every running instance refuses it (and keeps what it runs), named or not.
    with pytest.raises(RecordReplayError):
        rollouts.effective("sniffer", "pod-b")
    # Residual (documented): a reader started after the put-back has nothing to compare with
    # and follows it until the operator's next pass ends it again.
    fresh = Rollouts(ConfigStore(rollouts.client))
    assert fresh.effective("sniffer", "pod-a").config["snaplen"] == 9999
    rollouts.end("sniffer")
    assert fresh.effective("sniffer", "pod-a").config["snaplen"] == 256


def test_a_watch_keeps_the_current_candidate_when_an_older_rollout_is_put_back(
    rollouts: Rollouts,
) -> None:
    loaded: list[int] = []
    lock = threading.Lock()
    errors: list[str] = []

    def on(active: ActiveConfig) -> None:
        with lock:
            loaded.append(int(active.config["snaplen"]))

    watch = rollouts.watch("sniffer", "pod-a", on, on_error=lambda e: errors.append(e.reason))
    try:
        rollouts.start("sniffer", snaplen(512), ["pod-a"], by="alice")
        wait_for("pod-a on the first candidate", lambda: loaded[-1:] == [512])
        saved = saved_pair(rollouts)
        # spec.config changed during the rollout: the next one starts on the same base.
        rollouts.start("sniffer", snaplen(640), ["pod-a"], by="alice")
        wait_for("pod-a on the second candidate", lambda: loaded[-1:] == [640])
        put_back(rollouts, saved)
        wait_for("the replay refused", lambda: "RecordReplayed" in errors)
        # The operator writes the current rollout again, under a higher sequence: same
        # config, so nothing is loaded again.
        rollouts.start("sniffer", snaplen(640), ["pod-a"], by="alice")
        rollouts.end("sniffer")
        wait_for("pod-a back on ACTIVE", lambda: loaded[-1:] == [256])
        assert loaded == [256, 512, 640, 256]
    finally:
        watch.cancel()


def test_a_record_without_a_sequence_is_not_followed(rollouts: Rollouts) -> None:
    rollouts.start("sniffer", snaplen(512), ["pod-a"], by="alice")
    record = rollouts.record("sniffer")
    assert record is not None
    legacy = record.model_dump(mode="json", exclude={"sequence"})
    rollouts.client.put_record(rollouts.layout.rollout("sniffer"), legacy)
    found = rollouts.record("sniffer")
    assert found is not None and found.sequence == 0
    assert rollouts.effective("sniffer", "pod-a").config["snaplen"] == 256
    # Started without a sequence of the caller's: one above it, and the rollout runs again.
    again = rollouts.start("sniffer", snaplen(512), ["pod-a"], by="alice")
    assert again.sequence > 0
    assert rollouts.effective("sniffer", "pod-a").config["snaplen"] == 512


def test_start_with_another_configs_digest_writes_nothing(rollouts: Rollouts) -> None:
    with pytest.raises(ConflictError, match="not the one with digest"):
        rollouts.start(
            "sniffer", snaplen(512), ["pod-a"], by="alice", digest=config_digest(snaplen(640))
        )
    assert rollouts.record("sniffer", ended=True) is None
    assert rollouts.client.store.get(rollouts.layout.candidate("sniffer")) is None
    kept = rollouts.start(
        "sniffer",
        snaplen(640),
        ["pod-a"],
        by="alice",
        digest=config_digest(rollouts.configs._validate("sniffer", "sniffer", snaplen(640), None)),
        sequence=42,
    )
    assert kept.sequence == 42


def test_a_saved_ended_record_put_back_over_a_rollout_does_not_end_it(rollouts: Rollouts) -> None:
    rollouts.start("sniffer", snaplen(512), ["pod-a"], by="alice")
    rollouts.end("sniffer")
    ended = rollouts.client.store.get(rollouts.layout.rollout("sniffer"))
    assert ended is not None
    rollouts.start("sniffer", snaplen(640), ["pod-a"], by="alice")
    assert rollouts.effective("sniffer", "pod-a").config["snaplen"] == 640
    rollouts.client.store.put(ended.key, ended.value)
    # It would send the canary back to ACTIVE, ending the rollout for it: refused instead.
    with pytest.raises(RecordReplayError):
        rollouts.effective("sniffer", "pod-a")
    # A reader started afterwards reads it as what it is, an ended rollout: ACTIVE.
    fresh = Rollouts(ConfigStore(rollouts.client))
    assert fresh.effective("sniffer", "pod-a").config["snaplen"] == 256
