"""Monitor passes that reuse the component as they last read it (issue 17): with the change
watch trusted, a pass reads etcd only when a key its view reads changed, the operator wrote to
the component, the view is older than monitor_full_read_seconds, or the watch is not trusted.
Counted by `observe` calls on the in-memory Backend."""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from operator_core_support import LOG, NAME, NAMESPACE, Harness, spec

from defender_config import RecordAuthError, StoreUnavailableError, config_digest
from defender_operator import _api, _monitor, _reconcile
from defender_operator._backend import AlertRecord, Backend
from defender_operator._decisions import conditions as cond
from defender_operator._decisions.reads import ReadReason
from defender_operator._metrics import MONITOR_READS
from defender_operator._runtime import utcnow

SNIFFER_V2 = {"node_id": "sniffer-01", "version": "1.0.0", "interface": "eth1"}


def count(result: str, reason: ReadReason) -> float:
    return MONITOR_READS.labels(result, reason.value)._value.get()


def informed() -> Harness:
    """A settled component whose passes are fed by the change watch, after one pass that
    read (the reconcile's writes came after the view it read)."""
    h = Harness()
    h.add_pod("sniffer-a")
    h.beat("sniffer-a")
    asyncio.run(h.reconcile(spec(), first_pass=True))
    assert h.condition(cond.READY)["status"] == cond.TRUE
    h.inform()
    asyncio.run(h.monitor(spec()))
    h.backend.calls.clear()
    return h


def reads(h: Harness) -> int:
    return h.backend.calls.count("observe")


def test_a_new_components_first_pass_judges_from_what_its_seed_read() -> None:
    # The seed's transaction read the view (and wrote the cadence): the first pass reads
    # nothing more of etcd, and its scrub waits one interval.
    h = Harness()
    h.inform()
    h.add_pod("sniffer-a")
    h.beat("sniffer-a")
    skipped = count("skipped", ReadReason.UNCHANGED)
    asyncio.run(h.reconcile(spec(), first_pass=True))
    assert h.condition(cond.READY)["status"] == cond.TRUE
    assert h.condition("HeartbeatCadence")["reason"] == "FollowsSpec"
    assert "claim_and_seed" in h.backend.calls
    assert not {"observe", "cadence", "publish_cadence", "scrub", "state"} & set(h.backend.calls)
    assert count("skipped", ReadReason.UNCHANGED) == skipped + 1
    want = _reconcile.wanted_cadence(h.rt, _api.parse_spec(spec()))
    assert want.same_rhythm(h.backend.cadences[NAME])
    # Anything written after the seed is read by the next pass, as always.
    h.backend.touch(NAME)
    asyncio.run(h.monitor(spec()))
    assert reads(h) == 1


def test_a_seed_that_finds_the_name_held_leaves_no_view_to_reuse() -> None:
    h = Harness()
    h.inform()
    h.backend.seed(NAME, "sniffer", SNIFFER_V2, json_schema=None, modified_by="someone")
    h.add_pod("sniffer-a")
    h.beat("sniffer-a")
    no_view = count("read", ReadReason.NO_VIEW)
    asyncio.run(h.reconcile(spec(), first_pass=True))
    assert "claim_and_seed" in h.backend.calls and reads(h) == 1
    assert count("read", ReadReason.NO_VIEW) == no_view + 1


def test_without_a_change_passes_reuse_the_view_and_judge_the_same() -> None:
    h = informed()
    skipped = count("skipped", ReadReason.UNCHANGED)
    before = dict(h.kube.status)
    for _ in range(3):
        h.beat("sniffer-a")
        asyncio.run(h.monitor(spec()))
    assert reads(h) == 0
    assert count("skipped", ReadReason.UNCHANGED) == skipped + 3
    # Judged from the reused view exactly as from a read.
    assert h.condition(cond.READY)["status"] == cond.TRUE
    assert h.kube.status.get("activeVersion") == before.get("activeVersion") == 1
    # Heartbeats are not part of the view: they are still read every pass.
    assert h.backend.calls.count("last_seen") == 3


def test_a_change_by_someone_else_is_read_on_the_next_pass_then_reused() -> None:
    h = informed()
    changed = count("read", ReadReason.CHANGED)
    h.backend.touch(NAME)
    asyncio.run(h.monitor(spec()))
    assert reads(h) == 1
    assert count("read", ReadReason.CHANGED) == changed + 1
    asyncio.run(h.monitor(spec()))
    assert reads(h) == 1


def test_a_change_to_another_component_is_no_reason_to_read() -> None:
    h = informed()
    h.backend.touch("firewall")
    asyncio.run(h.monitor(spec()))
    assert reads(h) == 0


def test_a_deleted_record_is_a_change() -> None:
    # A freeze record removed (here by the in-memory unfreeze, as etcdctl del would).
    h = informed()
    h.backend.frozen[NAME] = "held by hand"
    h.backend.unfreeze(NAME)
    asyncio.run(h.monitor(spec()))
    assert reads(h) == 1


def test_a_forged_record_fails_the_next_pass_after_the_watch_delivers_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Someone with etcd write access replaced the metadata: the watch delivers the put, the
    # pass reads, verification fails as it did before views were reused.
    h = informed()
    forged = RecordAuthError("/defender/components/sniffer/metadata", "carries no MAC")
    h.backend.touch(NAME)
    h.backend.fail("observe", forged)
    h.backend.fail("state", forged)
    with caplog.at_level(logging.WARNING), pytest.raises(RecordAuthError):
        asyncio.run(h.monitor(spec()))
    assert "component records do not verify" in caplog.text
    assert h.mem.observation is None and h.mem.observed is None
    # No view kept from the failed read: the next pass reads again.
    no_view = count("read", ReadReason.NO_VIEW)
    asyncio.run(h.monitor(spec()))
    assert reads(h) == 2
    assert count("read", ReadReason.NO_VIEW) == no_view + 1
    assert h.kube.deleted == []


def test_a_read_that_failed_keeps_no_view() -> None:
    h = informed()
    h.backend.touch(NAME)
    h.backend.fail("observe", StoreUnavailableError(["127.0.0.1:2379"], "gone"))
    asyncio.run(h.monitor(spec()))
    assert h.mem.observation is None
    asyncio.run(h.monitor(spec()))
    assert reads(h) == 2


def test_while_the_watch_is_untrusted_every_pass_reads() -> None:
    h = informed()
    untrusted = count("read", ReadReason.UNTRUSTED)
    h.backend.break_change_watch(StoreUnavailableError(["127.0.0.1:2379"], "member down"))
    assert not h.rt.changes.trusted
    asyncio.run(h.monitor(spec()))
    asyncio.run(h.monitor(spec()))
    assert reads(h) == 2
    assert count("read", ReadReason.UNTRUSTED) == untrusted + 2
    # Reconnected and resynced (as `_loops.change_watch` does): views read before the resync
    # are read once more, then reused.
    h.backend.reconnect_change_watch()
    view = h.rt.changes
    assert view.resync(view.begin_resync(), h.backend.touch("firewall"))
    asyncio.run(h.monitor(spec()))
    asyncio.run(h.monitor(spec()))
    assert reads(h) == 3


def test_a_replayed_watch_makes_every_pass_read_until_the_resync() -> None:
    h = informed()
    h.backend.replay_changes()
    asyncio.run(h.monitor(spec()))
    assert reads(h) == 1 and not h.rt.changes.trusted


def test_a_view_as_old_as_the_bound_is_read_again() -> None:
    h = informed()
    stale = count("read", ReadReason.STALE)
    assert h.mem.observed is not None
    bound = timedelta(seconds=h.rt.settings.monitor_full_read_seconds)
    h.mem.observed = dataclasses.replace(h.mem.observed, at=utcnow() - bound)
    asyncio.run(h.monitor(spec()))
    assert reads(h) == 1
    assert count("read", ReadReason.STALE) == stale + 1
    asyncio.run(h.monitor(spec()))
    assert reads(h) == 1


def test_a_bound_of_zero_reads_every_pass() -> None:
    h = informed()
    h.rt.settings = h.rt.settings.model_copy(update={"monitor_full_read_seconds": 0})
    asyncio.run(h.monitor(spec()))
    asyncio.run(h.monitor(spec()))
    assert reads(h) == 2


def test_the_operators_own_write_is_read_before_the_watch_delivers_it() -> None:
    # A commit by a reconcile, its watch event still in flight: the next pass must not judge
    # from the view of version 1.
    h = informed()
    own = count("read", ReadReason.OWN_WRITE)
    h.backend.delay_changes()
    asyncio.run(h.reconcile(spec(SNIFFER_V2)))
    asyncio.run(h.monitor(spec(SNIFFER_V2)))
    assert reads(h) == 1
    assert count("read", ReadReason.OWN_WRITE) == own + 1
    assert h.kube.status["activeVersion"] == 2
    assert h.mem.observation is not None and h.mem.observation.state.active_version == 2
    # Delivered late, the commit is older than the view: nothing more to read.
    h.backend.reconnect_change_watch()
    asyncio.run(h.monitor(spec(SNIFFER_V2)))
    assert reads(h) == 1


def test_a_cadence_deleted_by_hand_is_put_right_and_the_write_read_back() -> None:
    h = informed()
    h.backend.cadences.clear()
    h.backend.touch(NAME)  # the delete, as the watch reports it
    asyncio.run(h.monitor(spec()))
    assert reads(h) == 1 and h.backend.calls.count("publish_cadence") == 1
    # The pass's own write: the next pass reads it back, and finds nothing to put right.
    asyncio.run(h.monitor(spec()))
    assert reads(h) == 2 and h.backend.calls.count("publish_cadence") == 1
    asyncio.run(h.monitor(spec()))
    assert reads(h) == 2


def test_reused_alerts_leave_the_window_with_time() -> None:
    h = informed()
    window = timedelta(seconds=h.rt.settings.misconfig_window_seconds)
    now = utcnow()
    h.backend.raised.append(AlertRecord(NAME, "sniffer-a-0", "UnknownKey", "x", now - window))
    h.backend.touch(NAME)
    p = _monitor._visit(h.rt, h.body(spec(), {}), NAMESPACE, NAME, LOG, dict(h.kube.status))
    first = asyncio.run(_monitor.observe(dataclasses.replace(p, now=now), h.mem))
    assert [a.reason for a in first.alerts] == ["UnknownKey"]
    later = asyncio.run(
        _monitor.observe(dataclasses.replace(p, now=now + timedelta(seconds=1)), h.mem)
    )
    assert later.alerts == [] and reads(h) == 1
    # The view kept holds only what is still in the window.
    assert h.mem.observation is not None and list(h.mem.observation.alerts) == []


# Backend calls that write a record some component's monitor view reads (or, for `declare`,
# change how the operator reads them): each must go through `Runtime.write`, which counts it.
VIEW_WRITES = {
    "seed",
    "commit",
    "rollback",
    "declare",
    "set_storage",
    "freeze",
    "unfreeze",
    "start_rollout",
    "promote_rollout",
    "abort_rollout",
    "end_rollout",
    "purge",
    "claim_and_seed",
    "publish_cadence",
    "alert",
    "restore_active",
}
# Reads, and writes no view reads: the owner record (`write_claim`), the key record, and the
# rewrap (it re-seals values without changing what they say; the watch still delivers it).
OTHER_CALLS = {
    "health",
    "cluster_id",
    "declare_storage",
    "state",
    "footprint",
    "owners",
    "rollout",
    "read_claim",
    "write_claim",
    "instances",
    "last_seen",
    "cadence",
    "all_instances",
    "watch_instances",
    "watch_changes",
    "revision",
    "alerts",
    "observe",
    "rewrap_all",
    "key_usage",
    "opens",
    "keyring_record",
    "record_keyring",
    "scrub",
    "close",
}


def test_every_backend_call_is_classified() -> None:
    declared = {n for n in vars(Backend) if not n.startswith("_")}
    assert declared == VIEW_WRITES | OTHER_CALLS, "classify the new Backend call above"


def test_every_write_a_view_reads_goes_through_runtime_write() -> None:
    # A write called directly would leave the component's reused view unaware of it until the
    # watch delivers it: a pass in between would judge from the view before the write.
    package = Path(_monitor.__file__).parent
    found, direct = 0, []
    for path in sorted(package.glob("*.py")):
        if path.name in ("_memory_backend.py", "_library_backend.py"):
            continue
        tree = ast.parse(path.read_text())
        # Backend write references passed as `<runtime>.write(component, <here>, ...)`.
        wrapped = {
            id(node.args[1])
            for node in ast.walk(tree)
            if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "write"
            and len(node.args) >= 2
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr in VIEW_WRITES
                and isinstance(node.value, ast.Attribute)
                and node.value.attr == "backend"
            ):
                found += 1
                if id(node) not in wrapped:
                    direct.append(f"{path.name}:{node.lineno} backend.{node.attr}")
    assert found > 20, "the scan found (almost) no backend write: it is broken"
    assert direct == []


def _threads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The blocking calls passes hand to a worker thread, by name."""
    handed: list[str] = []
    real = asyncio.to_thread

    async def counted(fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]
        handed.append(getattr(fn, "__name__", repr(fn)))
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", counted)
    return handed


def test_a_steady_pass_asks_no_thread_for_sightings_or_the_keyring_copy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h = informed()
    handed = _threads(monkeypatch)
    asyncio.run(h.monitor(spec()))
    assert "last_seen" not in handed and "copy_digest" not in handed, handed
    assert h.condition(cond.READY)["status"] == cond.TRUE
    # A lease that must be asked, and a stale keyring copy, still take the blocking path.
    h.backend.known_sightings = False
    h.rt.secrets.known_copy_digest = lambda ns, max_age: (None, False)  # type: ignore[method-assign]
    asyncio.run(h.monitor(spec()))
    assert "last_seen" in handed and "copy_digest" in handed, handed
    assert h.condition(cond.READY)["status"] == cond.TRUE
    assert h.condition(cond.KEY_CURRENT)["status"] == cond.TRUE


def test_the_spec_is_parsed_once_per_change_and_a_change_in_place_is_seen() -> None:
    h = informed()
    body = h.body(spec(), {})
    first = _monitor._visit(h.rt, body, NAMESPACE, NAME, LOG, {}).spec
    assert _monitor._visit(h.rt, body, NAMESPACE, NAME, LOG, {}).spec is first
    # kopf changes the body it keeps in place, with the new generation the API server gave
    # the changed spec: the parsed spec follows it.
    assert body["metadata"]["generation"] > 0
    body["spec"]["heartbeat"] = {"intervalSeconds": 7}
    body["metadata"]["generation"] += 1
    changed = _monitor._visit(h.rt, body, NAMESPACE, NAME, LOG, {}).spec
    assert changed is not first and changed.heartbeat.interval_seconds == 7
    body["spec"]["config"]["interface"] = "eth7"  # nested, in place
    body["metadata"]["generation"] += 1
    assert _monitor._visit(h.rt, body, NAMESPACE, NAME, LOG, {}).spec.config["interface"] == "eth7"
    # The same object created again (another uid) at the same generation: parsed anew.
    body["metadata"]["uid"] = "uid-again"
    body["spec"]["config"]["interface"] = "eth8"
    assert _monitor._visit(h.rt, body, NAMESPACE, NAME, LOG, {}).spec.config["interface"] == "eth8"
    h.spec_shown = None  # the harness numbers the next spec it is shown as a new generation
    asyncio.run(h.monitor(dict(body["spec"])))
    assert h.backend.cadences[NAME].interval_seconds == 7


def test_a_new_components_reconcile_parses_and_digests_its_spec_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A thousand components created at once (issue 17): the reconcile and the first pass it
    # runs judge by one parse of the spec, and the plan, the seed and the status by one digest
    # of the config; a later pass of the same generation parses nothing.
    parses: list[object] = []
    digests: list[object] = []
    real_parse, real_canonical = _api.parse_stored_spec, _reconcile.canonical_json

    def parse(raw: object) -> object:
        parses.append(raw)
        return real_parse(raw)  # type: ignore[arg-type]

    def canonical(config: object, **kwargs: Any) -> bytes:
        digests.append(config)
        return real_canonical(config, **kwargs)

    monkeypatch.setattr(_api, "parse_stored_spec", parse)
    monkeypatch.setattr(_reconcile, "canonical_json", canonical)
    h = Harness()
    h.inform()
    h.add_pod("sniffer-a")
    h.beat("sniffer-a")
    asyncio.run(h.reconcile(spec(), first_pass=True))
    assert h.condition(cond.READY)["status"] == cond.TRUE
    assert len(parses) == 1 and len(digests) == 1, (parses, digests)
    asyncio.run(h.monitor(spec()))
    assert len(parses) == 1
    assert h.kube.status["specConfigDigest"] == config_digest(digests[0])
