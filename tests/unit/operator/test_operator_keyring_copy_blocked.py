"""The namespace's keyring copy, when the operator cannot write or read it: a reconcile blocked by
a foreign Secret or a 403 says so on the resource (KeyCurrent False KeyringCopyBlocked, Ready
naming it) with one Warning Event however often kopf retries, and heals at the next retry once
the cause is gone; a monitor pass that cannot read the copy still publishes what it did."""

from __future__ import annotations

import asyncio
from typing import Any

import kopf
import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from operator_core_support import NAMESPACE, FakeSecretsApi, Harness, spec

from defender_config import Keyring
from defender_operator._decisions import conditions as cond
from defender_operator._decisions import keycopy
from defender_operator._errors import KeySecretError
from defender_operator._keys import KeyringSecrets

SECRET = "ml-defender-keyring"


def real_secrets(h: Harness) -> FakeSecretsApi:
    """The operator's own `KeyringSecrets` over a fake API server's Secrets."""
    api = FakeSecretsApi()
    h.rt.secrets = KeyringSecrets(api, "ml-defender", SECRET)  # type: ignore[arg-type]
    return api


def foreign(api: FakeSecretsApi) -> None:
    """Someone's own Secret under the keyring copy's name (no operator label)."""
    meta = client.V1ObjectMeta(name=SECRET, labels={"app": "mine"})
    api._keep(NAMESPACE, client.V1Secret(metadata=meta, data={"keyring.json": "e30="}))


def attempt(h: Harness, *, retry: bool = False) -> None:
    """kopf's create handler; `retry`: its retry of the same generation."""
    if retry:
        h.generation -= 1
    asyncio.run(h.reconcile(spec(), first_pass=True))


def blocked(h: Harness, times: int) -> str:
    """`times` attempts, each failing as a retry; the last retry's message."""
    message = ""
    for i in range(times):
        with pytest.raises(kopf.TemporaryError) as info:
            attempt(h, retry=i > 0)
        message = str(info.value)
    return message


def test_a_foreign_secret_blocks_with_one_event_and_heals_once_removed() -> None:
    h = Harness()
    api = real_secrets(h)
    foreign(api)
    h.add_pod("sniffer-a")
    h.beat("sniffer-a")
    message = blocked(h, 3)
    assert "HTTP None" not in message and "RBAC" not in message
    assert "not managed by the operator" in message and "Rename or delete it" in message
    key = h.condition(cond.KEY_CURRENT)
    assert (key["status"], key["reason"]) == (cond.FALSE, "KeyringCopyBlocked")
    assert key["observedGeneration"] == 1
    ready = h.condition(cond.READY)
    assert (ready["status"], ready["reason"]) == (cond.FALSE, "KeyringCopyBlocked")
    config = h.condition(cond.CONFIG_SYNCED)
    assert config["status"] == cond.UNKNOWN and "keyring copy" in config["message"]
    # One Warning Event for three attempts; the Secret left as it was.
    assert h.reasons() == ["KeyringCopyBlocked"]
    assert h.events[0].type == "Warning"
    assert api.stored[(NAMESPACE, SECRET)].metadata.labels == {"app": "mine"}

    del api.stored[(NAMESPACE, SECRET)]  # the person deletes it; kopf retries
    attempt(h, retry=True)
    assert h.reasons() == ["KeyringCopyBlocked", "KeyringCopied"]
    assert h.condition(cond.KEY_CURRENT)["status"] == cond.TRUE
    assert h.condition(cond.READY)["status"] == cond.TRUE
    assert h.kube.status["observedGeneration"] == 1
    copy = api.stored[(NAMESPACE, SECRET)]
    assert copy.metadata.labels["app.kubernetes.io/managed-by"]


def test_a_forbidden_copy_names_rbac_and_heals_when_granted() -> None:
    h = Harness()
    api = real_secrets(h)
    api.down = ApiException(status=403, reason="Forbidden")
    h.add_pod("sniffer-a")
    h.beat("sniffer-a")
    message = blocked(h, 2)
    assert "HTTP 403 Forbidden" in message and "create on Secrets in default" in message
    key = h.condition(cond.KEY_CURRENT)
    assert (key["status"], key["reason"]) == (cond.FALSE, "KeyringCopyBlocked")
    assert h.condition(cond.READY)["reason"] == "KeyringCopyBlocked"
    assert h.reasons() == ["KeyringCopyBlocked"]

    api.down = None  # RBAC granted
    attempt(h, retry=True)
    assert h.condition(cond.READY)["status"] == cond.TRUE
    assert h.reasons()[-1] == "KeyringCopied"


def test_an_api_server_that_fails_shows_unknown_without_an_event() -> None:
    h = Harness()
    api = real_secrets(h)
    api.down = ApiException(status=500, reason="Internal Server Error")
    blocked(h, 2)
    key = h.condition(cond.KEY_CURRENT)
    assert (key["status"], key["reason"]) == (cond.UNKNOWN, "KeyringCopyFailed")
    assert "HTTP 500" in key["message"]
    assert h.reasons() == []


def test_a_restarted_operator_does_not_announce_the_same_block_again() -> None:
    h = Harness()
    foreign(real_secrets(h))
    blocked(h, 1)
    assert h.reasons() == ["KeyringCopyBlocked"]
    h2 = Harness(backend=h.backend, kube=h.kube)  # a new operator; the status as left
    foreign(real_secrets(h2))
    h2.generation = h.generation
    blocked(h2, 1)
    assert h2.reasons() == []


def test_a_pass_that_cannot_read_the_copy_still_publishes_its_restart() -> None:
    h = Harness()
    raw = spec(heartbeat={"intervalSeconds": 1, "missedBeforeRestart": 2})
    asyncio.run(h.reconcile(raw))
    h.add_pod("sniffer-a")  # never beats
    h.mem.watch_started = h.pods["sniffer-a"].created
    secrets: Any = h.rt.secrets
    secrets.known_copy_digest = lambda ns, max_age: (None, False)

    def forbidden(*_: Any, **__: Any) -> str:
        raise KeySecretError("read", NAMESPACE, SECRET, 403, "Forbidden")

    secrets.copy_digest = forbidden
    asyncio.run(h.monitor(raw))
    assert h.kube.deleted == ["sniffer-a"]
    assert h.kube.status["restarts"] == 1
    assert len(h.kube.status["recentRestartTimes"]) == 1  # the budget survives a restart
    key = h.condition(cond.KEY_CURRENT)
    assert (key["status"], key["reason"]) == (cond.UNKNOWN, "CopyUnreadable")
    assert "HTTP 403 Forbidden" in key["message"]
    assert h.condition(cond.HEARTBEATING)["status"] == cond.FALSE


def test_a_block_stands_until_the_copy_is_current() -> None:
    block = keycopy.blocked_condition(
        keycopy.CopyFailure(keycopy.CopyBlock.FOREIGN, NAMESPACE, SECRET, "x")
    )
    kept = keycopy.copy_condition(
        copy_digest=None, source_digest="d", unreadable=None, previous=block
    )
    assert kept == block
    assert (
        keycopy.copy_condition(copy_digest="d", source_digest="d", unreadable=None, previous=block)
        is None
    )
    assert keycopy.announce(None, block)
    assert not keycopy.announce(block.message, block)
    assert keycopy.classify(403) is keycopy.CopyBlock.FORBIDDEN
    assert keycopy.classify(None, foreign=True) is keycopy.CopyBlock.FOREIGN
    assert keycopy.classify(0) is keycopy.CopyBlock.FAILED


class ContradictingApi(FakeSecretsApi):
    """An API server whose creates say the Secret exists while its reads say it does not."""

    def create_namespaced_secret(self, namespace: str, body: client.V1Secret) -> client.V1Secret:
        self._answer()
        raise ApiException(status=409, reason="AlreadyExists")


def test_a_create_that_keeps_conflicting_with_the_read_gives_up_typed() -> None:
    api = ContradictingApi()
    secrets = KeyringSecrets(api, "ml-defender", SECRET)  # type: ignore[arg-type]
    with pytest.raises(KeySecretError, match="409") as info:
        secrets.fan_out(Keyring.generate(), NAMESPACE)
    assert info.value.status == 409
    assert api.calls == 8  # the first read and create, then three more of each: no loop


def test_a_create_that_lost_a_race_judges_the_copy_it_lost_to() -> None:
    api = FakeSecretsApi()
    secrets = KeyringSecrets(api, "ml-defender", SECRET)  # type: ignore[arg-type]
    keyring = Keyring.generate()
    real_read = api.read_namespaced_secret
    reads = 0

    def read_before_the_other_writer(name: str, namespace: str) -> client.V1Secret:
        nonlocal reads
        reads += 1
        if reads == 1:
            # Another replica writes the same copy between this read and the create.
            other = KeyringSecrets(FakeSecretsApi(stored=api.stored), "ml-defender", SECRET)  # type: ignore[arg-type]
            other.fan_out(keyring, namespace)
            raise ApiException(status=404, reason="Not Found")
        return real_read(name, namespace)

    api.read_namespaced_secret = read_before_the_other_writer  # type: ignore[method-assign]
    assert secrets.fan_out(keyring, NAMESPACE) is False  # already the same keyring
    assert reads == 2
