"""The registrations the operator publishes to readers: `registrations.json` in the keyring
Secret each namespace's readers mount, so a reader started after an earlier registration's
data was put back in etcd is told the current one (docs/security.md, registrations)."""

from __future__ import annotations

import asyncio
import base64
import copy
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from operator_core_support import NAME, NAMESPACE, FakeSecretsApi, Harness, spec, unanswered, until

from defender_config import REGISTRATIONS_FILE, Keyring, parse_registrations
from defender_operator import _loops
from defender_operator._decisions.conditions import Cond
from defender_operator._decisions.registration import REGISTRATION_FIELD, registrations_to_publish
from defender_operator._decisions.rotation import RotationState
from defender_operator._errors import KeySecretError
from defender_operator._keys import MEMORY, KeyringSecrets
from defender_operator._metrics import ERRORS
from defender_operator._settings import OperatorSettings

SOURCE = ("ml-defender", "ml-defender-keyring")
TENANT = "tenant"


def keyring_secrets(api: FakeSecretsApi) -> tuple[KeyringSecrets, Keyring]:
    """The source Secret in the operator's namespace and its copy in TENANT."""
    secrets = KeyringSecrets(api, *SOURCE)  # type: ignore[arg-type]
    keyring = Keyring.generate()
    secrets.create(keyring)
    assert secrets.fan_out(keyring, TENANT)
    return secrets, keyring


def on_file(api: FakeSecretsApi, namespace: str) -> dict[str, int] | None:
    data = api.stored[(namespace, SOURCE[1])].data or {}
    raw = data.get(REGISTRATIONS_FILE)
    return None if raw is None else parse_registrations(base64.b64decode(raw), source="test")


def keyring_on_file(api: FakeSecretsApi, namespace: str) -> Keyring:
    return Keyring.from_secret_data(api.stored[(namespace, SOURCE[1])].data)


# --- the decision ---------------------------------------------------------------------------


def test_what_a_namespace_file_holds_next() -> None:
    # Known registrations win, deleted components go, components not visited yet stay.
    assert registrations_to_publish({"a": 1, "b": 2, "c": 3}, {"a": 5, "d": 4}, {"b"}) == {
        "a": 5,
        "c": 3,
        "d": 4,
    }
    # Deleted and created again before the round: its new registration, not nothing.
    assert registrations_to_publish({"a": 1}, {"a": 7}, {"a"}) == {"a": 7}
    assert registrations_to_publish({}, {}, {"gone"}) == {}


# --- the Secret -----------------------------------------------------------------------------


def test_published_beside_the_keyring_in_a_copy_and_the_source_and_written_once() -> None:
    api = FakeSecretsApi()
    secrets, keyring = keyring_secrets(api)
    for namespace in (TENANT, SOURCE[0]):
        assert secrets.publish_registrations(namespace, {"sniffer": 100}) is True
        assert on_file(api, namespace) == {"sniffer": 100}
        assert keyring_on_file(api, namespace) == keyring  # the keyring untouched
    version = api.version
    assert secrets.publish_registrations(TENANT, {"sniffer": 100}) is False  # read, unchanged
    calls = api.calls
    assert secrets.publish_registrations(TENANT, {"sniffer": 100}, max_age=30) is False
    assert api.calls == calls  # what it wrote is trusted within max_age: not even a read
    assert api.version == version
    assert secrets.publish_registrations(TENANT, {"sniffer": 200}, max_age=30) is True
    assert on_file(api, TENANT) == {"sniffer": 200}


def test_an_operator_restarted_keeps_what_it_has_not_visited_yet_and_drops_the_deleted() -> None:
    api = FakeSecretsApi()
    secrets, _ = keyring_secrets(api)
    secrets.publish_registrations(TENANT, {"sniffer": 100, "firewall": 300})
    restarted = KeyringSecrets(api, *SOURCE)  # type: ignore[arg-type]
    assert restarted.publish_registrations(TENANT, {}) is False
    assert on_file(api, TENANT) == {"sniffer": 100, "firewall": 300}
    assert restarted.publish_registrations(TENANT, {"sniffer": 101}, {"firewall"}) is True
    assert on_file(api, TENANT) == {"sniffer": 101}


def test_a_rotation_and_a_copy_created_again_carry_the_registrations() -> None:
    api = FakeSecretsApi()
    secrets, keyring = keyring_secrets(api)
    secrets.publish_registrations(TENANT, {"sniffer": 100})
    secrets.publish_registrations(SOURCE[0], {"rag": 50})
    rotated = keyring.with_new_decrypt_only()
    # The copy replaced with the rotated keyring: what was on file is kept.
    assert secrets.fan_out(rotated, TENANT) is True
    assert keyring_on_file(api, TENANT) == rotated
    assert on_file(api, TENANT) == {"sniffer": 100}
    # The source replaced at a rotation stage: what this operator published there is kept.
    stored = secrets.load()
    assert stored is not None
    secrets.save(rotated, RotationState(), None, stored.resource_version)
    assert keyring_on_file(api, SOURCE[0]) == rotated
    assert on_file(api, SOURCE[0]) == {"rag": 50}
    # A careless `kubectl delete secret` of the copy: created again with them.
    del api.stored[(TENANT, SOURCE[1])]
    # A publish round in between finds no Secret: it writes nothing, and forgets nothing.
    assert secrets.publish_registrations(TENANT, {"sniffer": 100}) is False
    assert (TENANT, SOURCE[1]) not in api.stored
    assert secrets.fan_out(rotated, TENANT) is True
    assert on_file(api, TENANT) == {"sniffer": 100}
    # The source deleted too: written back from memory, with them.
    del api.stored[SOURCE]
    secrets.restore(rotated, MEMORY)
    assert on_file(api, SOURCE[0]) == {"rag": 50}


def test_no_secret_yet_or_a_foreign_one_gets_nothing() -> None:
    api = FakeSecretsApi()
    secrets, _ = keyring_secrets(api)
    assert secrets.publish_registrations("empty", {"sniffer": 100}) is False
    assert ("empty", SOURCE[1]) not in api.stored  # creating the copy is fan_out's business
    foreign = client.V1Secret(metadata=client.V1ObjectMeta(name=SOURCE[1]), data={"other": "eA=="})
    api.create_namespaced_secret("foreign", foreign)
    assert secrets.publish_registrations("foreign", {"sniffer": 100}) is False
    assert api.stored[("foreign", SOURCE[1])].data == {"other": "eA=="}


@pytest.mark.parametrize(
    "raw",
    [
        base64.b64encode(b"not json").decode(),
        "not base64 !",
        base64.b64encode(b'{"version": 1, "registrations": {"sniffer": -1}}').decode(),
    ],
)
def test_an_unreadable_file_is_written_again_from_what_the_operator_knows(raw: str) -> None:
    api = FakeSecretsApi()
    secrets, keyring = keyring_secrets(api)
    api.stored[(TENANT, SOURCE[1])].data[REGISTRATIONS_FILE] = raw
    assert secrets.publish_registrations(TENANT, {"sniffer": 100}) is True
    assert on_file(api, TENANT) == {"sniffer": 100}
    assert keyring_on_file(api, TENANT) == keyring


def test_a_change_between_the_read_and_the_write_is_not_overwritten(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    api = FakeSecretsApi()
    secrets, _ = keyring_secrets(api)
    secrets.publish_registrations(TENANT, {"sniffer": 100})
    real_read = api.read_namespaced_secret

    def read_then_someone_writes(name: str, namespace: str) -> client.V1Secret:
        seen = copy.deepcopy(real_read(name, namespace))
        api._keep(namespace, copy.deepcopy(api.stored[(namespace, name)]))  # a new version
        return seen

    monkeypatch.setattr(api, "read_namespaced_secret", read_then_someone_writes)
    assert secrets.publish_registrations(TENANT, {"sniffer": 200}) is False  # 409: left
    assert on_file(api, TENANT) == {"sniffer": 100}
    monkeypatch.undo()
    # What it last wrote is no longer trusted: the next round reads again and writes.
    assert secrets.publish_registrations(TENANT, {"sniffer": 200}, max_age=30) is True
    assert on_file(api, TENANT) == {"sniffer": 200}


def test_refusals_and_silence_are_typed_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    api = FakeSecretsApi()
    secrets, _ = keyring_secrets(api)

    def forbidden(*_: Any) -> None:
        raise ApiException(status=403, reason="Forbidden")

    monkeypatch.setattr(api, "replace_namespaced_secret", forbidden)
    with pytest.raises(KeySecretError, match="cannot publish registrations to Secret tenant/"):
        secrets.publish_registrations(TENANT, {"sniffer": 100})
    monkeypatch.undo()
    api.down = unanswered()
    with pytest.raises(KeySecretError, match="cannot read Secret tenant/") as caught:
        secrets.publish_registrations(TENANT, {"sniffer": 100})
    assert caught.value.status is not None


# --- the loop -------------------------------------------------------------------------------


def monitored(h: Harness) -> Harness:
    """Its monitor daemon running in this replica (`_monitor.run` counts itself)."""
    h.mem.monitors = 1
    return h


def test_the_round_publishes_what_the_status_anchors_and_drops_a_deleted_component() -> None:
    h = Harness()
    asyncio.run(h.reconcile(spec()))
    monitored(h)
    anchored = h.kube.status[REGISTRATION_FIELD]
    asyncio.run(_loops.publish_registrations(h.rt))
    published = h.rt.secrets.published  # type: ignore[attr-defined]
    assert published == {NAMESPACE: {NAME: anchored}}
    h.rt.forget(NAMESPACE, NAME, "uid-1")  # its deletion handled
    asyncio.run(_loops.publish_registrations(h.rt))
    assert published == {NAMESPACE: {}}
    assert h.rt.registrations_removed == {}


def test_a_component_refused_its_name_publishes_nothing() -> None:
    h = Harness()
    asyncio.run(h.reconcile(spec()))
    monitored(h).mem.conflict = Cond("NameConflict", "False", "NameHeld", "held elsewhere")
    assert h.rt.anchored_registrations() == {}


def test_a_failed_round_keeps_the_deletion_for_the_next_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h = Harness()
    asyncio.run(h.reconcile(spec()))
    monitored(h)
    asyncio.run(_loops.publish_registrations(h.rt))
    h.rt.forget(NAMESPACE, NAME, "uid-1")
    failures = ERRORS.labels("registrations")._value.get()

    def refused(*_: Any, **__: Any) -> bool:
        raise KeySecretError("publish registrations to", NAMESPACE, "k", 403, "Forbidden")

    monkeypatch.setattr(h.rt.secrets, "publish_registrations", refused)
    asyncio.run(_loops.publish_registrations(h.rt))
    assert h.rt.registrations_removed == {NAMESPACE: {NAME}}
    assert ERRORS.labels("registrations")._value.get() == failures + 1
    monkeypatch.undo()
    asyncio.run(_loops.publish_registrations(h.rt))
    assert h.rt.secrets.published == {NAMESPACE: {}}  # type: ignore[attr-defined]
    assert h.rt.registrations_removed == {}


def test_the_loop_waits_for_a_verified_keyring_then_publishes() -> None:
    h = Harness()
    h.rt.settings = OperatorSettings(registrations_publish_seconds=0.01)
    asyncio.run(h.reconcile(spec()))
    monitored(h)
    h.rt.keyring_ready = False
    published = h.rt.secrets.published  # type: ignore[attr-defined]

    async def scenario() -> None:
        task = asyncio.create_task(_loops.registrations(h.rt))
        try:
            await asyncio.sleep(0.1)
            assert published == {}  # no keyring checked against the store: nothing yet
            h.rt.keyring_ready = True
            await until("published", lambda: NAMESPACE in published)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(scenario())
    assert published[NAMESPACE] == {NAME: h.kube.status[REGISTRATION_FIELD]}


def test_a_replica_that_only_remembers_a_component_publishes_nothing() -> None:
    # Peering paused this replica: its daemons stopped, its memory of the component stays (and
    # goes stale while another replica manages it). It must not publish that memory.
    h = Harness()
    asyncio.run(h.reconcile(spec()))
    assert h.rt.anchored_registrations() == {}
    monitored(h)
    assert h.rt.anchored_registrations() == {NAMESPACE: {NAME: h.kube.status[REGISTRATION_FIELD]}}
    h.mem.monitors = 0
    asyncio.run(_loops.publish_registrations(h.rt))
    assert h.rt.secrets.published == {}  # type: ignore[attr-defined]
