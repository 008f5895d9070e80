"""Keyring: invariants, rotation stages, Secret form, mounted-Secret reload like kubelet does it."""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from defender_config import (
    AuthenticationFailedError,
    Envelope,
    Key,
    Keyring,
    KeyringError,
    KeyringSource,
    KeyState,
    StaticKeyringSource,
    UnknownKeyError,
    inspect,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def key(key_id: str, state: KeyState = KeyState.PRIMARY) -> Key:
    return Key(key_id, os.urandom(32), state, NOW)


class SecretMount:
    """A directory laid out like kubelet's Secret volume, updated the way kubelet updates it:
    write a new timestamped dir, point `..data_tmp` at it, rename it over `..data`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.generation = 0
        root.mkdir(exist_ok=True)

    def write(self, content: bytes) -> None:
        self.generation += 1
        new_dir = self.root / f"..2026_01_01_00_00_{self.generation:02d}.000000001"
        new_dir.mkdir()
        (new_dir / "keyring.json").write_bytes(content)
        data = self.root / "..data"
        old = os.readlink(data) if data.is_symlink() else None
        tmp = self.root / "..data_tmp"
        os.symlink(new_dir.name, tmp)
        os.replace(tmp, data)
        link = self.root / "keyring.json"
        if not link.is_symlink():
            os.symlink("..data/keyring.json", link)
        if old is not None:
            shutil.rmtree(self.root / old)


# --- keys and invariants -------------------------------------------------------------------------


def test_generate() -> None:
    ring = Keyring.generate()
    assert len(ring) == 1 and ring.primary.state is KeyState.PRIMARY
    assert len(ring.primary.material) == 32
    assert len(ring.primary_fingerprint) == 16
    int(ring.primary_fingerprint, 16)
    assert Keyring.generate().primary_fingerprint != ring.primary_fingerprint
    assert ring.fingerprints() == {ring.primary.key_id: ring.primary_fingerprint}
    assert ring.primary.key_id in ring and "nope" not in ring


@pytest.mark.parametrize(
    ("key_id", "material", "created", "match"),
    [
        ("bad id!", os.urandom(32), NOW, "must be 1-64"),
        ("k" * 65, os.urandom(32), NOW, "must be 1-64"),
        ("k1\n", os.urandom(32), NOW, "must be 1-64"),  # `$` matches before a final newline
        ("k1", os.urandom(16), NOW, "16 bytes of material, need 32"),
        ("k1", os.urandom(32), datetime(2026, 1, 1), "without a time zone"),
    ],
)
def test_bad_keys(key_id: str, material: bytes, created: datetime, match: str) -> None:
    with pytest.raises(KeyringError, match=match) as info:
        Key(key_id, material, KeyState.PRIMARY, created)
    assert info.value.reason == "KeyringInvalid"


def test_keyring_invariants() -> None:
    with pytest.raises(KeyringError, match="no keys"):
        Keyring([])
    with pytest.raises(KeyringError, match="exactly one primary key, found 2"):
        Keyring([key("a"), key("b")])
    with pytest.raises(KeyringError, match="found 0"):
        Keyring([key("a", KeyState.DECRYPT_ONLY)])
    with pytest.raises(KeyringError, match="appears twice"):
        Keyring([key("a"), key("a", KeyState.DECRYPT_ONLY)])
    same = os.urandom(32)
    with pytest.raises(KeyringError, match="same material"):
        Keyring(
            [
                Key("a", same, KeyState.PRIMARY, NOW),
                Key("b", same, KeyState.DECRYPT_ONLY, NOW),
            ]
        )


def test_rotation_stages_are_new_keyrings() -> None:
    stage0 = Keyring.generate()
    old = stage0.primary.key_id
    stage1 = stage0.with_new_decrypt_only("k-new")
    assert stage0.key_ids == (old,)  # unchanged
    assert stage1.key_ids == (old, "k-new")
    assert stage1.primary.key_id == old
    assert stage1.get("k-new").state is KeyState.DECRYPT_ONLY  # type: ignore[union-attr]

    stage2 = stage1.promote("k-new")
    assert stage2.primary.key_id == "k-new"
    assert stage2.get(old).state is KeyState.DECRYPT_ONLY  # type: ignore[union-attr]
    assert stage2.promote("k-new") is stage2
    # Material survives every stage.
    assert stage2.get("k-new").material == stage1.get("k-new").material  # type: ignore[union-attr]

    stage4 = stage2.retire(old)
    assert stage4.get(old).state is KeyState.RETIRED  # type: ignore[union-attr]
    assert stage4.decryption_key("k-new").key_id == "k-new"
    with pytest.raises(UnknownKeyError, match="retired") as info:
        stage4.decryption_key(old, "/p")
    assert info.value.retired and info.value.path == "/p"

    stage5 = stage4.remove(old)
    assert stage5.key_ids == ("k-new",)
    with pytest.raises(UnknownKeyError, match="does not hold") as info2:
        stage5.decryption_key(old)
    assert not info2.value.retired


def test_rotation_stage_errors() -> None:
    ring = Keyring.generate().with_new_decrypt_only("k2")
    primary = ring.primary.key_id
    with pytest.raises(KeyringError, match="already exists"):
        ring.with_new_decrypt_only("k2")
    with pytest.raises(KeyringError, match="no key 'zz'"):
        ring.promote("zz")
    with pytest.raises(KeyringError, match="is the primary"):
        ring.retire(primary)
    with pytest.raises(KeyringError, match="retire it before removal"):
        ring.remove("k2")
    with pytest.raises(KeyringError, match="add a new key instead"):
        ring.retire("k2").promote("k2")
    with pytest.raises(KeyringError, match="no key 'zz'"):
        ring.fingerprint("zz")
    assert ring.fingerprint("k2") == ring.get("k2").fingerprint  # type: ignore[union-attr]


def test_equality_and_hash() -> None:
    ring = Keyring.generate()
    copy = Keyring(ring.keys)
    assert ring == copy and hash(ring) == hash(copy)
    assert ring != Keyring.generate()
    assert list(ring) == list(ring.keys)


# --- Secret form ---------------------------------------------------------------------------------


def test_secret_data_round_trip() -> None:
    ring = Keyring.generate().with_new_decrypt_only()
    data = ring.to_secret_data()
    assert set(data) == {"keyring.json"}
    assert Keyring.from_secret_data(data) == ring  # base64 str values (API `data`)
    raw = base64.b64decode(data["keyring.json"])
    assert Keyring.from_secret_data({"keyring.json": raw}) == ring  # mounted file bytes
    doc = json.loads(raw)
    assert doc["version"] == 1
    assert doc["keys"][0]["created"].endswith("Z")
    assert {k["state"] for k in doc["keys"]} == {"primary", "decrypt-only"}


def _doc(**overrides: object) -> bytes:
    entry = {
        "id": "k1",
        "state": "primary",
        "created": "2026-01-01T00:00:00Z",
        "material": base64.b64encode(b"\x01" * 32).decode(),
    }
    entry.update(overrides)
    return json.dumps({"version": 1, "keys": [entry]}).encode()


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"{not json", "not valid JSON"),
        (b"[" * 100_000, r"not valid JSON \(JSON nested too deeply"),
        (b"[1, 2]", 'must be an object with a "keys" list'),
        (b'{"version": 2, "keys": []}', "version 2 is not supported"),
        (b'{"keys": [5]}', r"keys\[0\] must be an object"),
        (b'{"keys": [{"id": "k1"}]}', "lacks state, created, material"),
        (_doc(id=7), r"keys\[0\].id must be a string"),
        (_doc(state="active"), "state 'active'; allowed: primary, decrypt-only, retired"),
        (_doc(created="yesterday"), "unreadable created time"),
        (_doc(material="!!not base64!!"), "material is not valid base64"),
        (_doc(material=12345), "material is not valid base64"),
        (_doc(material=base64.b64encode(b"\x01" * 31).decode()), "31 bytes of material"),
        (_doc(state="retired"), "exactly one primary"),
        (b'{"keys": []}', "no keys"),
    ],
)
def test_bad_secret_content(content: bytes, match: str) -> None:
    with pytest.raises(KeyringError, match=match) as info:
        Keyring.from_secret_data({"keyring.json": content}, source="ns/defender-keyring")
    assert "keyring ns/defender-keyring:" in str(info.value)


def test_secret_without_keyring_file() -> None:
    with pytest.raises(KeyringError, match=r"no keyring.json entry \(found: other\)"):
        Keyring.from_secret_data({"other": b"x"})
    with pytest.raises(KeyringError, match=r"Secret data keyring\.json is not valid base64"):
        Keyring.from_secret_data({"keyring.json": "%%%"})


# --- mounted Secrets -----------------------------------------------------------------------------


def test_from_path_dir_file_and_missing(tmp_path: Path) -> None:
    ring = Keyring.generate()
    mount = SecretMount(tmp_path / "secret")
    mount.write(ring.to_json())
    assert Keyring.from_path(mount.root) == ring
    assert Keyring.from_path(mount.root / "keyring.json") == ring
    plain = tmp_path / "plain.json"
    plain.write_bytes(ring.to_json())
    assert Keyring.from_path(plain) == ring
    with pytest.raises(KeyringError, match=r"cannot read .*check that the keyring Secret"):
        Keyring.from_path(tmp_path / "absent")
    with pytest.raises(KeyringError, match="cannot read"):
        Keyring.from_path(tmp_path)  # a dir without keyring.json


def test_from_path_unreadable_names_the_fsgroup_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A Secret volume without the pod's fsGroup: the file is there, owned by root, 0440. The
    # tests run as root, which reads any file, so the refusal open() gives a non-root process
    # is made here.
    mount = SecretMount(tmp_path / "secret")
    mount.write(Keyring.generate().to_json())

    def refuse(path: str | os.PathLike[str], max_bytes: int) -> bytes:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("defender_config._keyring.read_file_bounded", refuse)
    with pytest.raises(KeyringError) as info:
        Keyring.from_path(mount.root)
    message = str(info.value)
    assert "(Permission denied)" in message
    assert f"uid {os.getuid()}, gid {os.getgid()}" in message
    assert "securityContext.fsGroup" in message
    assert "check that the keyring Secret is mounted" not in message


def test_source_reloads_on_kubelet_swap(tmp_path: Path) -> None:
    stage0 = Keyring.generate()
    mount = SecretMount(tmp_path / "secret")
    mount.write(stage0.to_json())
    changes: list[tuple[Keyring, Keyring]] = []
    source = KeyringSource(
        mount.root, poll_seconds=0.0, on_change=lambda a, b: changes.append((a, b))
    )
    assert source.current() == stage0
    assert not source.refresh()  # nothing changed

    stage1 = stage0.with_new_decrypt_only()
    stage2 = stage1.promote(stage1.key_ids[-1])
    mount.write(stage2.to_json())
    assert source.current() == stage2
    assert changes == [(stage0, stage2)]
    assert source.last_error is None

    # Same content in a fresh directory (kubelet resync): not a change.
    mount.write(stage2.to_json())
    assert not source.refresh()
    assert len(changes) == 1


def test_envelope_follows_the_source(tmp_path: Path) -> None:
    stage0 = Keyring.generate()
    mount = SecretMount(tmp_path / "secret")
    mount.write(stage0.to_json())
    source = KeyringSource(mount.root, poll_seconds=0.0)
    env = Envelope(source)
    old_blob = env.seal(b"v" * 500, "/p")
    assert inspect(old_blob).key_id == stage0.primary.key_id

    stage2 = stage0.with_new_decrypt_only("k-next").promote("k-next")
    mount.write(stage2.to_json())
    assert inspect(env.seal(b"v" * 500, "/p")).key_id == "k-next"
    assert env.open(old_blob, "/p") == b"v" * 500


def test_a_key_removed_by_a_reload_does_not_stay_usable_through_the_envelope(
    tmp_path: Path,
) -> None:
    # The envelope keeps one AEAD per key for the keyring it saw last; every reload must
    # start over, so what decrypts is always what the current keyring allows.
    stage0 = Keyring.generate()
    old_id = stage0.primary.key_id
    mount = SecretMount(tmp_path / "secret")
    mount.write(stage0.to_json())
    source = KeyringSource(mount.root, poll_seconds=0.0)
    env = Envelope(source)
    old_blob = env.seal(b"v" * 500, "/p")
    assert env.open(old_blob, "/p") == b"v" * 500  # the old key's AEAD is now cached

    stage2 = stage0.with_new_decrypt_only("k-next").promote("k-next")
    mount.write(stage2.retire(old_id).to_json())
    with pytest.raises(UnknownKeyError, match="retired"):
        env.open(old_blob, "/p")

    mount.write(stage2.retire(old_id).remove(old_id).to_json())
    with pytest.raises(UnknownKeyError) as info:
        env.open(old_blob, "/p")
    assert not info.value.retired and info.value.known_key_ids == ("k-next",)


def test_a_key_id_reloaded_with_other_material_opens_nothing_sealed_with_the_old(
    tmp_path: Path,
) -> None:
    ring = Keyring.generate()
    mount = SecretMount(tmp_path / "secret")
    mount.write(ring.to_json())
    source = KeyringSource(mount.root, poll_seconds=0.0)
    env = Envelope(source)
    blob = env.seal(b"v" * 500, "/p")
    assert env.open(blob, "/p") == b"v" * 500

    impostor = Keyring([Key.generate(key_id=ring.primary.key_id)])
    mount.write(impostor.to_json())
    with pytest.raises(AuthenticationFailedError) as info:
        env.open(blob, "/p")
    assert info.value.fingerprint == impostor.primary.fingerprint


def test_broken_update_keeps_the_last_good_keyring(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = Keyring.generate()
    mount = SecretMount(tmp_path / "secret")
    mount.write(good.to_json())
    errors: list[KeyringError] = []
    source = KeyringSource(mount.root, poll_seconds=0.0, on_error=errors.append)

    mount.write(b'{"keys": []}')
    with caplog.at_level(logging.ERROR, logger="defender_config.keyring"):
        assert source.current() == good
    assert isinstance(source.last_error, KeyringError)
    assert "no keys" in str(source.last_error)
    assert errors == [source.last_error]
    assert "keeping the last good keyring" in caplog.text
    # Reported once per broken version, not on every poll.
    source.current()
    assert len(errors) == 1

    fixed = good.with_new_decrypt_only()
    mount.write(fixed.to_json())
    assert source.current() == fixed
    assert source.last_error is None


def test_mount_disappearing_keeps_the_last_good_keyring(tmp_path: Path) -> None:
    good = Keyring.generate()
    mount = SecretMount(tmp_path / "secret")
    mount.write(good.to_json())
    source = KeyringSource(mount.root, poll_seconds=0.0)
    shutil.rmtree(mount.root)
    assert source.current() == good
    assert "cannot read" in str(source.last_error)


def test_first_read_must_succeed(tmp_path: Path) -> None:
    with pytest.raises(KeyringError, match="cannot read"):
        KeyringSource(tmp_path / "absent")
    bad = tmp_path / "keyring.json"
    bad.write_bytes(b"{}")
    with pytest.raises(KeyringError, match="keys"):
        KeyringSource(bad)


def test_poll_interval_limits_file_checks(tmp_path: Path) -> None:
    now = [0.0]
    first = Keyring.generate()
    mount = SecretMount(tmp_path / "secret")
    mount.write(first.to_json())
    source = KeyringSource(mount.root, poll_seconds=10.0, clock=lambda: now[0])
    second = Keyring.generate()
    mount.write(second.to_json())
    now[0] = 9.9
    assert source.current() == first  # not yet due
    now[0] = 10.0
    assert source.current() == second


def test_background_poller_notices_changes(tmp_path: Path) -> None:
    first = Keyring.generate()
    mount = SecretMount(tmp_path / "secret")
    mount.write(first.to_json())
    seen = threading.Event()
    source = KeyringSource(mount.root, poll_seconds=0.05, on_change=lambda a, b: seen.set())
    source.start()
    source.start()  # idempotent
    try:
        mount.write(Keyring.generate().to_json())
        assert seen.wait(10), "the poller never reloaded the swapped Secret"
    finally:
        source.stop()
    assert source.current() != first


def test_poller_survives_a_failing_callback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mount = SecretMount(tmp_path / "secret")
    mount.write(Keyring.generate().to_json())
    calls: list[int] = []

    def boom(a: Keyring, b: Keyring) -> None:
        calls.append(1)
        raise RuntimeError("callback bug")

    source = KeyringSource(mount.root, poll_seconds=0.05, on_change=boom)
    with caplog.at_level(logging.ERROR, logger="defender_config.keyring"):
        source.start()
        try:
            mount.write(Keyring.generate().to_json())
            deadline = time.monotonic() + 10
            while len(calls) < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            third = Keyring.generate()
            mount.write(third.to_json())
            # The new keyring is visible before its callback has run: wait for both.
            while (source.current() != third or len(calls) < 2) and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            source.stop()
    assert len(calls) >= 2 and source.current() == third
    assert "keyring callback failed" in caplog.text


def test_a_failing_callback_never_reaches_a_reader(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # current() refreshes inline once the poll interval passed (seen in CI under load: the
    # poller thread was late, a reader did the refresh and got the callback's exception).
    mount = SecretMount(tmp_path / "secret")
    mount.write(Keyring.generate().to_json())
    now = [0.0]
    calls: list[str] = []

    def boom(*_: object) -> None:
        calls.append("called")
        raise RuntimeError("callback bug")

    source = KeyringSource(
        mount.root, poll_seconds=5, on_change=boom, on_error=boom, clock=lambda: now[0]
    )
    new = Keyring.generate()
    mount.write(new.to_json())
    now[0] += 10
    with caplog.at_level(logging.ERROR, logger="defender_config.keyring"):
        assert source.current() == new
        mount.write(b"not a keyring")
        now[0] += 10
        assert source.current() == new  # the last good one, and on_error's bug stays here
    assert calls == ["called", "called"]
    assert caplog.text.count("keyring callback failed") == 2


def test_concurrent_readers_always_see_a_whole_keyring(tmp_path: Path) -> None:
    rings = [Keyring.generate() for _ in range(5)]
    mount = SecretMount(tmp_path / "secret")
    mount.write(rings[0].to_json())
    source = KeyringSource(mount.root, poll_seconds=0.0)
    bad: list[object] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            current = source.current()
            if current not in rings:
                bad.append(current)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for ring in rings[1:] * 5:
        mount.write(ring.to_json())
        time.sleep(0.005)
    stop.set()
    for t in threads:
        t.join()
    assert bad == []
    assert source.current() == rings[-1]


def test_static_source() -> None:
    ring = Keyring.generate()
    source = KeyringSource.static(ring)
    assert isinstance(source, StaticKeyringSource)
    assert source.current() is ring and source.last_error is None
    assert ring.primary_fingerprint in repr(source)


def test_mount_back_with_the_same_keyring_clears_the_error(tmp_path: Path) -> None:
    # The Secret was deleted and re-created (or a bad edit undone) with the keyring in use: no
    # on_change, since nothing changed, but the error must not stay reported for ever.
    good = Keyring.generate()
    mount = SecretMount(tmp_path / "secret")
    mount.write(good.to_json())
    events: list[str] = []
    source = KeyringSource(
        mount.root,
        poll_seconds=0.0,
        on_change=lambda old, new: events.append("change"),
        on_error=lambda exc: events.append("error"),
        on_recover=lambda: events.append("recover"),
    )
    shutil.rmtree(mount.root)
    assert source.current() == good
    assert source.last_error is not None
    mount = SecretMount(tmp_path / "secret")
    mount.write(good.to_json())
    assert source.current() == good
    source.current()
    assert source.last_error is None
    assert events == ["error", "recover"]
