"""_keyguard.settle around a refused source Secret: the keyring this process verified is set
aside, never used to seal, and a source that is then deleted or fixed is judged against it. And
the key record in etcd: a forged one is rewritten and reported, never a refusal of a keyring
that opens every stored value."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest
from operator_core_support import FakeSecretsApi, Harness

from defender_config import Keyring, KeyUsage
from defender_operator import _keyguard
from defender_operator._keys import KeyringSecrets, KeyringUnavailableError
from defender_operator._kube import ObjectRef

NS, NAME = "ml-defender", "ml-defender-keyring"
SOURCE = (NS, NAME)
# A keyring nobody verified (made at import: the tests forbid generating one).
STRANGER = Keyring.generate()


def harness() -> tuple[Harness, FakeSecretsApi, Keyring]:
    api = FakeSecretsApi()
    h = Harness()
    keyring = h.rt.keyring.current()
    h.backend.record_keyring(keyring)
    secrets: Any = KeyringSecrets(api, NS, NAME)  # type: ignore[arg-type]
    h.rt.secrets = secrets
    secrets.create(keyring)
    # Components in the operator's own namespace: no copies, memory is the only other holder.
    h.kube.namespaces = {NS}
    component = ObjectRef("mldefender.io/v1alpha1", "DefenderComponent", NS, "sniffer")
    h.kube.components = lambda watched=None: [component]  # type: ignore[method-assign]
    return h, api, keyring


def posted(h: Harness) -> list[str]:
    return [reason for _, reason in h.kube.posted]


def corrupt(api: FakeSecretsApi) -> None:
    api.stored[SOURCE].data = {"keyring.json": base64.b64encode(b"{not json").decode()}


def settle(h: Harness) -> bool:
    return asyncio.run(_keyguard.settle(h.rt))


def assert_paused(h: Harness) -> None:
    assert not h.rt.keyring_ready
    assert h.rt.keyring.peek() is None
    with pytest.raises(KeyringUnavailableError):
        h.rt.keyring.current()  # what the library seals with: nothing while refused


def harness_no_minting(monkeypatch: pytest.MonkeyPatch) -> tuple[Harness, FakeSecretsApi, Keyring]:
    made = harness()

    def mint() -> Keyring:
        raise AssertionError("a keyring was minted")

    monkeypatch.setattr(Keyring, "generate", staticmethod(mint))
    return made


def test_a_corrupted_then_deleted_source_is_restored_from_memory_with_the_same_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h, api, keyring = harness_no_minting(monkeypatch)
    corrupt(api)
    assert settle(h) is False
    assert h.rt.keyring_refused is not None
    assert h.rt.keyring_refused.reason == "SourceLacksKeys"
    assert "delete the Secret" in h.rt.keyring_refused.message
    assert_paused(h)
    # The runbook: delete the broken Secret and the operator writes it back.
    del api.stored[SOURCE]
    assert settle(h) is True
    restored = api.stored[SOURCE]
    assert Keyring.from_secret_data(restored.data) == keyring
    assert h.rt.keyring.current() == keyring
    assert h.rt.keyring_ready and h.rt.keyring_refused is None
    assert h.rt.keyring_kept is None
    assert "KeyringRestored" in posted(h) and "KeyringAvailable" in posted(h)


def test_a_corrupted_source_fixed_by_hand_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    h, api, keyring = harness_no_minting(monkeypatch)
    good = dict(api.stored[SOURCE].data)
    corrupt(api)
    assert settle(h) is False
    api.stored[SOURCE].data = good
    assert settle(h) is True
    assert h.rt.keyring.current() == keyring
    assert h.rt.keyring_refused is None and h.rt.keyring_kept is None
    assert "KeyringAvailable" in posted(h)


def test_a_replaced_source_then_deleted_is_restored_with_the_verified_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h, api, keyring = harness_no_minting(monkeypatch)
    api.stored[SOURCE].data = STRANGER.to_secret_data()  # holds none of the recorded keys
    assert settle(h) is False
    assert_paused(h)
    del api.stored[SOURCE]
    assert settle(h) is True
    assert Keyring.from_secret_data(api.stored[SOURCE].data) == keyring


def test_while_refused_nothing_is_written_or_sealed_round_after_round(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h, api, keyring = harness_no_minting(monkeypatch)
    corrupt(api)
    record = dict(h.backend.key_record)
    versions = api.version
    for _ in range(3):
        assert settle(h) is False
        assert_paused(h)
    assert api.version == versions  # no Secret written, no copy
    assert h.backend.key_record == record
    assert h.rt.keyring_kept == keyring
    # One announcement for the same refusal, not one a round.
    assert posted(h).count("KeyUnavailable") == 1


def test_a_refusal_before_any_keyring_was_verified_keeps_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h, api, _ = harness_no_minting(monkeypatch)
    h.rt.keyring_ready = False
    h.rt.keyring.set(None)
    corrupt(api)
    assert settle(h) is False
    assert h.rt.keyring_kept is None
    del api.stored[SOURCE]
    assert settle(h) is False  # recorded keys, no holder: refused, never minted
    assert h.rt.keyring_refused is not None
    assert h.rt.keyring_refused.reason == "KeyringMissing"
    assert SOURCE not in api.stored


# --- the key record in etcd: advisory, never a veto over a keyring that opens every value ---


def restarted_with_values(monkeypatch: pytest.MonkeyPatch) -> tuple[Harness, FakeSecretsApi]:
    """A fresh operator (nothing verified yet) over a store with a value sealed under the
    keyring's primary; the memory backend's `opens` opens every sample."""
    h, api, keyring = harness_no_minting(monkeypatch)
    h.rt.keyring_ready = False
    h.rt.keyring.set(None)
    usage = KeyUsage(samples={keyring.primary.key_id: ("/p/c/master", b"sealed")}, sealed=1)
    monkeypatch.setattr(h.backend, "key_usage", lambda: usage)
    return h, api


@pytest.mark.parametrize("forged", [{"bogus": "x"}, {"unreadable-record": "unknown"}])
def test_a_forged_record_is_rewritten_and_reported_not_a_refusal(
    monkeypatch: pytest.MonkeyPatch, forged: dict[str, str]
) -> None:
    h, api = restarted_with_values(monkeypatch)
    keyring = Keyring.from_secret_data(api.stored[SOURCE].data)
    h.backend.key_record = dict(forged)
    assert settle(h) is True
    assert h.rt.keyring.current() == keyring and h.rt.keyring_refused is None
    assert h.backend.key_record == keyring.fingerprints()  # rewritten from the keyring in use
    # (NoKeyringExport: this test Secret was never exported.)
    assert [r for r in posted(h) if r != "NoKeyringExport"] == ["KeyringRecordMismatch"]
    assert [a.reason for a in h.backend.raised] == ["KeyringRecordMismatch"]
    assert "names none of the key ids stored values use" in h.backend.raised[0].detail


def test_a_record_that_agrees_raises_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    h, _ = restarted_with_values(monkeypatch)
    assert settle(h) is True
    assert "KeyringRecordMismatch" not in posted(h)
    assert h.backend.raised == []
