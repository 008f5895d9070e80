"""``StoreUnavailable`` and ``StoreAuth`` leave the instance record once etcd answers what
disproves them, with no new config.

The config side reports them (the watch could not be re-created, a read failed), but a watch
that comes back from the next revision, or a read that finds the config already delivered,
hands nothing to the applier: the error stayed in the heartbeat until the next commit (seen
after an etcd restore, and after any outage). The agent's main loop clears it once etcd
answered after it was reported (``store_error_over``: a beat, a record put, a read of the
config the watch reads again); errors of other reasons stay.

The agent on a store held in memory, its canary watch, and a heartbeater that only counts."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

# The in-memory store and the alert sink of the memory-budget tests (same directory).
from test_agent_memory import Alerts, MemoryStore

from defender_agent import load_agent_settings
from defender_agent._agent import Agent, EtcdAnswers, store_error_over
from defender_config import (
    DefenderClient,
    EnvelopeOptions,
    EtcdSettings,
    LibrarySettings,
    Rollouts,
    StoreAuthError,
    StoreError,
    StoreUnavailableError,
)
from defender_config._store._rules import classify_error
from defender_config.store import EtcdStore
from defender_devcluster import wait_for

UNAVAILABLE = StoreUnavailableError.reason
AUTH = StoreAuthError.reason


def _down() -> StoreUnavailableError:
    return StoreUnavailableError(["https://127.0.0.1:2379"], "connection refused")


def _refused() -> StoreAuthError:
    return StoreAuthError("etcd did not accept the credentials (UNAUTHENTICATED)")


def _denied() -> StoreAuthError:
    return StoreAuthError(
        "the etcd user lacks permission (PERMISSION_DENIED)", credentials_refused=False
    )


@pytest.fixture(autouse=True)
def _no_defender_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("DEFENDER_"):
            monkeypatch.delenv(name)


class FailingWatchStore(MemoryStore):
    """Keeps each watch's ``on_error``, as the store's watch thread calls it when the watch
    cannot be re-created (once per outage). While ``failing`` holds an error, every read
    raises it (etcd away, or refusing this user), and the watch's reads again with it."""

    def __init__(self) -> None:
        super().__init__()
        self.on_errors: list[Callable[[StoreError], None]] = []
        self.failing: StoreError | None = None

    def get(self, key: str, revision: int | None = None) -> Any:
        if self.failing is not None:
            raise self.failing
        return super().get(key, revision)

    def watch_key(self, key: str, callback: Callable[[Any], None], **kw: Any) -> Any:
        self.on_errors.append(kw["on_error"])
        return super().watch_key(key, callback, **kw)

    def watch_lost(self, error: StoreError | None = None) -> None:
        self.failing = error or _down()
        self.on_errors[0](self.failing)


class CountingBeat:
    """What the agent asks of its heartbeater here: the fields it pushes, its beat count and
    its count of records put."""

    def __init__(self) -> None:
        self.beats = 1
        self.writes = 1
        self.fields: dict[str, Any] = {}
        self.status = "STARTING"

    def update(self, **fields: Any) -> None:
        self.fields.update(fields)

    def set_status(self, status: str) -> None:
        self.status = status


_PODS: list[Pod] = []


@pytest.fixture(autouse=True)
def _stop_pods() -> Any:
    yield
    while _PODS:
        _PODS.pop().stop()


class Pod:
    def __init__(self, tmp_path: Path) -> None:
        _PODS.append(self)
        self.output = tmp_path / "demo.json"
        settings = load_agent_settings(
            ["--component", "demo", "--instance", "demo-0", "--reload-method", "none",
             "--component-type", "custom", "--output-path", str(self.output)]
        )  # fmt: skip
        library = LibrarySettings(
            envelope=EnvelopeOptions(encrypt=False, compress=False),
            # The watch reads again on this backoff: quick here.
            etcd=EtcdSettings(backoff_base_seconds=0.01, backoff_max_seconds=0.02),
        )
        self.agent = Agent(settings, library)
        self.store, self.alerts = FailingWatchStore(), Alerts()
        self.agent.client = DefenderClient(
            library,
            store=self.store,  # type: ignore[arg-type]
            alert_sinks=[self.alerts],
        )
        self.agent.configs = self.agent.config_store(self.agent.client)
        self.beat = CountingBeat()
        self.agent.heartbeater = self.beat  # type: ignore[assignment]
        self.active = self.agent.configs.layout.active_config("demo")

    def put(self, config: Any) -> None:
        self.store.put(self.active, json.dumps(config).encode())

    def start(self) -> None:
        assert self.agent.configs is not None
        self.agent._watch = Rollouts(self.agent.configs).watch(
            "demo", "demo-0", self.agent._on_active, on_error=self.agent._on_watch_error
        )

    def stop(self) -> None:
        if self.agent._watch is not None:
            self.agent._watch.cancel()

    def etcd_back(self) -> None:
        """etcd answers reads again; waits until the watch's read again got an answer."""
        self.store.failing = None
        watch = self.agent._watch
        before = watch.answers
        wait_for("the watch to read again", lambda: watch.answers > before, timeout=10)

    def reason(self) -> str | None:
        error = self.agent.applier.last_error
        return error.reason if error is not None else None

    def reported(self) -> str | None:
        """The last_error the heartbeat record carries."""
        error = self.beat.fields.get("last_error")
        return error.reason if error is not None else None


def test_store_unavailable_clears_on_the_first_beat_after_it_no_config_change(
    tmp_path: Path,
) -> None:
    pod = Pod(tmp_path)
    pod.put({"v": 1})
    pod.start()
    assert json.loads(pod.output.read_text()) == {"v": 1}
    applied = pod.agent.applier.applied

    pod.store.watch_lost()
    assert pod.reason() == pod.reported() == UNAVAILABLE
    # etcd still away: no beat got through, the error is true and stays.
    for _ in range(3):
        pod.agent._tick()
    assert pod.reason() == pod.reported() == UNAVAILABLE

    pod.beat.beats += 1  # a lease renewed: etcd answered
    pod.agent._tick()
    assert pod.reason() is None
    assert "last_error" in pod.beat.fields and pod.reported() is None
    # Cleared without a config delivered: nothing new was written or applied.
    assert pod.agent.applier.applied == applied
    assert json.loads(pod.output.read_text()) == {"v": 1}
    # StoreUnavailable is transient: never an alert record.
    assert [a.kind for a in pod.alerts.seen] == []


def test_a_beat_before_the_error_was_reported_does_not_clear_it(tmp_path: Path) -> None:
    pod = Pod(tmp_path)
    pod.put({"v": 1})
    pod.start()
    pod.store.watch_lost()
    pod.beat.beats += 1
    pod.agent._tick()
    assert pod.reason() is None
    pod.etcd_back()
    # A second outage: the beats counted before it prove nothing about it.
    pod.beat.beats += 5
    pod.store.watch_lost()
    pod.agent._tick()
    assert pod.reason() == pod.reported() == UNAVAILABLE
    pod.beat.beats += 1
    pod.agent._tick()
    assert pod.reason() is None


def test_errors_of_other_reasons_stay_when_etcd_answers(tmp_path: Path) -> None:
    pod = Pod(tmp_path)
    pod.put({"v": 1})
    pod.start()
    pod.put([1, 2])  # not a config: refused, the last good file kept
    assert pod.reason() == pod.reported() == "ConfigInvalid"
    pod.beat.beats += 3
    pod.agent._tick()
    assert pod.reason() == pod.reported() == "ConfigInvalid"
    assert json.loads(pod.output.read_text()) == {"v": 1}


# --- what proves which error over (pure) ------------------------------------------------------

THEN = EtcdAnswers(beats=5, writes=3, reads=2)


@pytest.mark.parametrize(
    ("reason", "cause", "now", "over"),
    [
        # etcd away: any beat since, or a read of the config etcd answered.
        (UNAVAILABLE, _down(), EtcdAnswers(5, 3, 2), False),
        (UNAVAILABLE, _down(), EtcdAnswers(6, 3, 2), True),
        (UNAVAILABLE, _down(), EtcdAnswers(5, 3, 3), True),
        # Credentials refused: a put proves them taken; keep-alives are not counted (etcd
        # checks their token only from 3.6 on).
        (AUTH, _refused(), EtcdAnswers(9, 3, 2), False),
        (AUTH, _refused(), EtcdAnswers(6, 4, 2), True),
        (AUTH, _refused(), EtcdAnswers(5, 3, 3), True),
        # A right missing on the config's keys: only a read of them answered proves it gone.
        (AUTH, _denied(), EtcdAnswers(9, 9, 2), False),
        (AUTH, _denied(), EtcdAnswers(5, 3, 3), True),
        # Without the exception (not known how it was refused): as a missing right.
        (AUTH, None, EtcdAnswers(9, 9, 2), False),
        # Other reasons are not etcd's to clear.
        ("ConfigInvalid", None, EtcdAnswers(9, 9, 9), False),
        ("KeyringInvalid", None, EtcdAnswers(9, 9, 9), False),
    ],
)
def test_what_etcd_answered_since_decides_whether_a_store_error_is_over(
    reason: str, cause: BaseException | None, now: EtcdAnswers, over: bool
) -> None:
    assert store_error_over(reason, cause, THEN, now) is over


def test_the_store_names_a_missing_right_apart_from_refused_credentials() -> None:
    class Rpc(grpc.RpcError):
        def __init__(self, code: grpc.StatusCode) -> None:
            self._code = code

        def code(self) -> grpc.StatusCode:
            return self._code

        def details(self) -> str:
            return ""

    store = object.__new__(EtcdStore)  # _typed reads nothing of a store for these

    def typed(code: grpc.StatusCode) -> StoreError:
        exc = Rpc(code)
        rule = classify_error(exc)
        assert rule is not None
        return store._typed(rule, exc, "p", 1)

    denied = typed(grpc.StatusCode.PERMISSION_DENIED)
    refused = typed(grpc.StatusCode.UNAUTHENTICATED)
    assert isinstance(denied, StoreAuthError) and not denied.credentials_refused
    assert isinstance(refused, StoreAuthError) and refused.credentials_refused


# --- StoreAuth in the agent -------------------------------------------------------------------


def test_refused_credentials_clear_at_the_first_record_put_not_at_a_keep_alive(
    tmp_path: Path,
) -> None:
    """A password being changed: the watch's login was refused once. The record put after it
    (etcd took its token) proves the credentials accepted; keep-alives are not counted."""
    pod = Pod(tmp_path)
    pod.put({"v": 1})
    pod.start()
    pod.store.watch_lost(_refused())
    assert pod.reason() == pod.reported() == AUTH
    pod.beat.beats += 4  # leases renewed: not counted
    pod.agent._tick()
    assert pod.reason() == pod.reported() == AUTH
    pod.beat.writes += 1
    pod.agent._tick()
    assert pod.reason() is None and pod.reported() is None
    assert json.loads(pod.output.read_text()) == {"v": 1}


def test_a_missing_right_stays_through_puts_and_clears_at_a_read_of_the_config(
    tmp_path: Path,
) -> None:
    pod = Pod(tmp_path)
    pod.put({"v": 1})
    pod.start()
    applied = pod.agent.applier.applied
    pod.store.watch_lost(_denied())
    assert pod.reason() == pod.reported() == AUTH
    pod.beat.beats += 3
    pod.beat.writes += 3  # the instance key is writable: says nothing of the config's keys
    pod.agent._tick()
    assert pod.reason() == AUTH
    pod.etcd_back()  # the right given back: the watch's read again is answered
    pod.agent._tick()
    assert pod.reason() is None and pod.reported() is None
    # The config was already delivered: the read handed nothing new to the applier.
    assert pod.agent.applier.applied == applied


# --- StoreUnavailable while the component fails its health check -----------------------------


def test_store_unavailable_clears_at_a_read_answered_while_no_beat_is_sent(
    tmp_path: Path,
) -> None:
    """With a failing health check the heartbeater renews nothing: no beat comes to prove etcd
    back. The watch reads the config again until etcd answers, and that answer does."""
    pod = Pod(tmp_path)
    pod.put({"v": 1})
    pod.start()
    pod.store.watch_lost()
    assert pod.reason() == pod.reported() == UNAVAILABLE
    # No beats at all (held by the gate); reads still fail: the error is true and stays.
    for _ in range(3):
        pod.agent._tick()
    assert pod.reason() == UNAVAILABLE
    pod.etcd_back()
    pod.agent._tick()
    assert pod.reason() is None and pod.reported() is None
    assert json.loads(pod.output.read_text()) == {"v": 1}


def test_a_read_answered_from_the_cache_proves_nothing(tmp_path: Path) -> None:
    pod = Pod(tmp_path)
    pod.put({"v": 1})
    pod.start()
    pod.store.watch_lost()
    watch = pod.agent._watch
    before = watch.answers
    # etcd still away, but the library's cache answers (a stale value): not counted.
    stale = pod.store.values[pod.active]
    pod.store.failing = None
    pod.store.values[pod.active] = replace(stale, stale=True)
    time.sleep(0.2)  # many reads again on the test's backoff
    assert watch.answers == before
    pod.agent._tick()
    assert pod.reason() == UNAVAILABLE
