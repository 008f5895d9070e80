"""No message, repr or log line carries key material: raw, hex or base64, whole or in part."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from defender_config import (
    DefenderConfigError,
    Envelope,
    EnvelopeOptions,
    Key,
    Keyring,
    KeyringSource,
    KeyState,
)

PATH = "/ml-defender/components/x/active_config"


def _forms(material: bytes) -> list[str]:
    full = [
        material.hex(),
        material.hex().upper(),
        base64.b64encode(material).decode(),
        base64.urlsafe_b64encode(material).decode(),
        base64.b64encode(material).decode().rstrip("="),
        repr(material),
        material.decode("latin-1"),
    ]
    # A 12-character window of any form is already a leak worth failing on.
    return full + [f[:12] for f in full] + [f[-12:] for f in full]


def _assert_clean(text: str, *materials: bytes) -> None:
    for material in materials:
        for form in _forms(material):
            assert form not in text, f"key material ({form[:4]}...) leaked"


def _raised(fn: Callable[[], object]) -> DefenderConfigError:
    with pytest.raises(DefenderConfigError) as info:
        fn()
    return info.value


def test_reprs_never_show_material(tmp_path: Path) -> None:
    ring = Keyring.generate().with_new_decrypt_only()
    materials = [k.material for k in ring]
    (tmp_path / "keyring.json").write_bytes(ring.to_json())
    source = KeyringSource(tmp_path)
    env = Envelope(source)
    for obj in (ring, *ring.keys, source, env, KeyringSource.static(ring)):
        _assert_clean(repr(obj), *materials)
        _assert_clean(str(obj), *materials)
    _assert_clean(repr(ring.fingerprints()), *materials)


def test_envelope_errors_never_show_material(config: bytes = b"x" * 4000) -> None:
    ring = Keyring.generate()
    other = Keyring(
        [Key(ring.primary.key_id, b"\x07" * 32, KeyState.PRIMARY, ring.primary.created)]
    )
    env = Envelope(ring)
    blob = env.seal(config, PATH)
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    errors = [
        _raised(lambda: Envelope(other).open(blob, PATH)),  # AuthenticationFailed
        _raised(lambda: env.open(bytes(tampered), PATH)),
        _raised(lambda: env.open(blob, "/elsewhere")),
        _raised(lambda: Envelope(Keyring.generate()).open(blob, PATH)),  # UnknownKey
        _raised(lambda: env.open(blob[:30], PATH)),
        _raised(lambda: env.open(b"plain", PATH)),
        _raised(lambda: env.seal(b"y" * 2000, PATH, EnvelopeOptions(max_decompressed_bytes=10))),
    ]
    for err in errors:
        for text in (str(err), repr(err), repr(err.__dict__), str(err.__cause__)):
            _assert_clean(text, ring.primary.material, b"\x07" * 32)


def _doc_with(material_b64: str) -> bytes:
    return json.dumps(
        {
            "keys": [
                {
                    "id": "k1",
                    "state": "primary",
                    "created": "2026-01-01T00:00:00Z",
                    "material": material_b64,
                }
            ]
        }
    ).encode()


@pytest.mark.parametrize("cut", [31, 33])
def test_keyring_errors_on_bad_material_never_echo_it(cut: int) -> None:
    material = bytes(range(100, 100 + cut))
    err = _raised(lambda: Keyring.from_json(_doc_with(base64.b64encode(material).decode())))
    assert f"{cut} bytes of material" in str(err)
    _assert_clean(str(err) + repr(err) + str(err.__cause__), material)


def test_keyring_errors_on_mangled_base64_never_echo_it() -> None:
    material = bytes(range(32))
    mangled = base64.b64encode(material).decode()[:-2] + "*!"
    err = _raised(lambda: Keyring.from_json(_doc_with(mangled)))
    assert "not valid base64" in str(err)
    assert mangled[:12] not in str(err) + repr(err)
    assert err.__cause__ is None and err.__suppress_context__


def test_keyring_json_syntax_errors_never_echo_the_file() -> None:
    material = bytes(range(32, 64))
    broken = _doc_with(base64.b64encode(material).decode())[:-3]
    err = _raised(lambda: Keyring.from_json(broken))
    _assert_clean(str(err) + repr(err) + str(err.__cause__), material)


def test_reload_logs_never_show_material(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ring = Keyring.generate()
    file = tmp_path / "keyring.json"
    file.write_bytes(ring.to_json())
    source = KeyringSource(file, poll_seconds=0.0)
    new = ring.with_new_decrypt_only()
    with caplog.at_level(logging.DEBUG, logger="defender_config"):
        file.write_bytes(new.to_json())
        source.current()
        file.write_bytes(_doc_with(base64.b64encode(bytes(range(1, 32))).decode()))
        source.current()
    assert "keyring reloaded" in caplog.text and "reload failed" in caplog.text
    _assert_clean(caplog.text, *[k.material for k in new], bytes(range(1, 32)))


def _entry(**fields: object) -> dict[str, object]:
    material = base64.b64encode(bytes(32)).decode()
    return {
        "id": "k1",
        "state": "primary",
        "created": "2026-01-01T00:00:00Z",
        "material": material,
        **fields,
    }


@pytest.mark.parametrize(
    "doc",
    [
        # A hand edit that swapped two fields, or pasted the material into the wrong one: the
        # error names the field, never echoes its value (it reaches the agent's log, heartbeat,
        # alert and unauthenticated GET /status as KeyringInvalid).
        lambda m: {"keys": [_entry(id=m, material="k1")]},
        lambda m: {"keys": [_entry(id=m, material=m)]},
        lambda m: {"keys": [_entry(state=m, material=m)]},
        lambda m: {"version": m, "keys": [_entry(material=m)]},
        lambda m: {"keys": [_entry(created=m, material=m)]},
    ],
    ids=["id-swapped", "id", "state", "version", "created"],
)
def test_keyring_errors_on_material_in_another_field_never_echo_it(
    doc: Callable[[str], dict[str, object]],
) -> None:
    material = bytes(range(7, 39))
    text = base64.b64encode(material).decode()
    err = _raised(lambda: Keyring.from_json(json.dumps(doc(text)).encode()))
    cause = err.__cause__
    _assert_clean(str(err) + repr(err) + str(cause) + repr(cause), material)


def test_a_keyring_error_still_shows_a_plain_wrong_state_and_version() -> None:
    # What a careless edit usually holds is a word, which helps to see.
    state = _raised(
        lambda: Keyring.from_json(json.dumps({"keys": [_entry(state="active")]}).encode())
    )
    assert "'active'" in str(state)
    version = _raised(lambda: Keyring.from_json(json.dumps({"version": 2, "keys": []}).encode()))
    assert "version 2" in str(version)
