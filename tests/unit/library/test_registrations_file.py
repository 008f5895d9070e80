"""`registrations.json`, the registrations the operator publishes in the keyring Secret: the
strict format, reading it from a Secret mounted as kubelet does, the reloading source, and
`ConfigStore.hold_registrations`, which only ever raises what a reader holds."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from defender_config import (
    REGISTRATIONS_FILE,
    Alert,
    CallableSink,
    ConfigStore,
    DefenderClient,
    DefenderConfigError,
    EtcdSettings,
    Keyring,
    LibrarySettings,
    RegistrationReplayError,
    RegistrationsFileError,
    RegistrationsSource,
    parse_registrations,
    read_registrations,
    render_registrations,
)
from defender_config._configs import ConfigMetadata

R1, R2, R3 = 1_767_225_600_000, 1_767_225_600_500, 1_767_225_601_000


def doc(registrations: Any, **top: Any) -> bytes:
    return json.dumps({"version": 1, "registrations": registrations, **top}).encode()


class SecretMount:
    """A keyring Secret volume laid out and updated as kubelet does it: each version in a new
    timestamped directory, `..data` swapped to it atomically, one `<name> -> ..data/<name>`
    link per key of the Secret."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.generation = 0
        root.mkdir()

    def write(self, registrations: bytes | None) -> None:
        """keyring.json, and registrations.json when given (None: the Secret has no such key)."""
        self.generation += 1
        new_dir = self.root / f"..2026_01_01_00_00_{self.generation:02d}.000000001"
        new_dir.mkdir()
        files = {"keyring.json": b"{}"}
        if registrations is not None:
            files[REGISTRATIONS_FILE] = registrations
        for name, content in files.items():
            (new_dir / name).write_bytes(content)
        data = self.root / "..data"
        old = os.readlink(data) if data.is_symlink() else None
        tmp = self.root / "..data_tmp"
        os.symlink(new_dir.name, tmp)
        os.replace(tmp, data)
        for name in ("keyring.json", REGISTRATIONS_FILE):
            link = self.root / name
            if name not in files:
                link.unlink(missing_ok=True)  # kubelet drops the link of a key gone
            elif not link.is_symlink():
                os.symlink(f"..data/{name}", link)
        if old is not None:
            shutil.rmtree(self.root / old)


# --- the format ----------------------------------------------------------------------------------


def test_render_is_canonical_and_parses_back() -> None:
    mapping = {"sniffer": R2, "firewall": R1, "a.b_c-d": 1}
    content = render_registrations(mapping)
    assert content == (
        b'{"registrations":{"a.b_c-d":1,"firewall":1767225600000,"sniffer":1767225600500},'
        b'"version":1}'
    )
    assert render_registrations(dict(reversed(mapping.items()))) == content
    assert parse_registrations(content, source="s") == mapping
    assert parse_registrations(render_registrations({}), source="s") == {}
    # Whitespace and key order are the writer's choice; the content is what counts.
    spaced = b'{ "version": 1,\n  "registrations": {"sniffer": 1767225600500} }\n'
    assert parse_registrations(spaced, source="s") == {"sniffer": R2}
    assert parse_registrations(doc({"x": 2**63 - 1}), source="s") == {"x": 2**63 - 1}


def test_a_newer_operators_extra_fields_are_ignored() -> None:
    # An operator upgraded before its agents may publish more; what they read still holds.
    content = doc({"sniffer": 5}, versions={"sniffer": 3}, note="x")
    assert parse_registrations(content, source="s") == {"sniffer": 5}


MALFORMED: list[tuple[str, bytes, str]] = [
    ("not-json", b'{"version": 1, "registrations": {', "not valid JSON"),
    ("empty", b"", "not valid JSON"),
    ("not-utf8", b'{"version": 1, "registrations": {"\xff": 1}}', "not UTF-8"),
    ("bom", b'\xef\xbb\xbf{"version": 1, "registrations": {}}', "not valid JSON"),
    ("too-deep", b"[" * 100_000, "not valid JSON"),
    ("list", b"[]", "must be a JSON object, not list"),
    ("string", b'"sniffer"', "must be a JSON object, not str"),
    ("version-2", doc({}, version=2), "version 2 is not supported"),
    ("version-string", doc({}, version="1"), "version str is not supported"),
    ("version-true", doc({}, version=True), "version bool is not supported"),
    ("no-version", b'{"registrations": {}}', "lacks version"),
    ("no-registrations", b'{"version": 1}', "lacks registrations"),
    ("registrations-list", doc([["sniffer", 1]]), '"registrations" must be an object, not list'),
    ("registrations-null", doc(None), '"registrations" must be an object, not NoneType'),
    ("string-registration", doc({"sniffer": "1767225600500"}), "is a str, not an integer"),
    ("float-registration", doc({"sniffer": 1.5}), "is a float, not an integer"),
    ("bool-registration", doc({"sniffer": True}), "is a bool, not an integer"),
    ("null-registration", doc({"sniffer": None}), "is a NoneType, not an integer"),
    ("zero", doc({"sniffer": 0}), "is 0, not between 1"),
    ("negative", doc({"sniffer": -5}), "is -5, not between 1"),
    ("too-large", doc({"sniffer": 2**63}), f"is {2**63}, not between 1"),
    ("slash-name", doc({"a/b": 1}), "component 'a/b' is not a valid component name"),
    ("empty-name", doc({"": 1}), "component '' is not a valid component name"),
    ("dash-start", doc({"-x": 1}), "component '-x' is not a valid component name"),
    ("space-name", doc({"fire wall": 1}), "is not a valid component name"),
]


@pytest.mark.parametrize(
    ("content", "match"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_every_malformed_file_is_a_registrations_file_error(content: bytes, match: str) -> None:
    with pytest.raises(RegistrationsFileError) as info:
        parse_registrations(content, source="/mnt/keyring/registrations.json")
    error = info.value
    assert isinstance(error, DefenderConfigError)
    assert error.reason == "RegistrationsFileInvalid"
    assert error.source == "/mnt/keyring/registrations.json"
    assert str(error).startswith("registrations file /mnt/keyring/registrations.json: ")
    assert match in str(error)


def test_a_bad_entry_is_named_but_the_content_never_dumped() -> None:
    long_name = "n" * 300 + "/"
    content = doc({"fine": R1, long_name: R2})
    with pytest.raises(RegistrationsFileError) as info:
        parse_registrations(content, source="f")
    assert long_name not in str(info.value) and "n" * 64 + "..." in str(info.value)
    assert str(R1) not in str(info.value)


def test_render_refuses_what_a_reader_would_refuse() -> None:
    for bad in ({"a/b": 1}, {"sniffer": 0}, {"sniffer": True}):
        with pytest.raises(RegistrationsFileError):
            render_registrations(bad)


# --- reading the mounted Secret --------------------------------------------------------------


def test_read_follows_the_kubelet_symlinks_from_the_directory_or_keyring_json(
    tmp_path: Path,
) -> None:
    mount = SecretMount(tmp_path / "keyring")
    mount.write(render_registrations({"sniffer": R1}))
    link = mount.root / REGISTRATIONS_FILE
    assert link.is_symlink() and os.readlink(link) == f"..data/{REGISTRATIONS_FILE}"
    assert read_registrations(mount.root) == {"sniffer": R1}
    assert read_registrations(str(mount.root / "keyring.json")) == {"sniffer": R1}
    mount.write(render_registrations({"sniffer": R2}))  # kubelet's atomic swap
    assert read_registrations(mount.root) == {"sniffer": R2}


def test_read_without_the_file_is_none(tmp_path: Path) -> None:
    mount = SecretMount(tmp_path / "keyring")
    mount.write(None)
    assert read_registrations(mount.root) is None
    assert read_registrations(mount.root / "keyring.json") is None
    assert read_registrations(tmp_path / "not-mounted") is None
    # A dangling link (the key gone from ..data) is no file either.
    os.symlink(f"..data/{REGISTRATIONS_FILE}", mount.root / REGISTRATIONS_FILE)
    assert read_registrations(mount.root) is None


def test_read_of_a_broken_or_unreadable_file_raises(tmp_path: Path) -> None:
    mount = SecretMount(tmp_path / "keyring")
    mount.write(doc({"sniffer": -1}))
    with pytest.raises(RegistrationsFileError, match="not between 1") as info:
        read_registrations(mount.root)
    assert info.value.source == str(mount.root / REGISTRATIONS_FILE)
    other = tmp_path / "other"
    (other / REGISTRATIONS_FILE).mkdir(parents=True)  # not a regular file
    with pytest.raises(RegistrationsFileError, match="cannot read it"):
        read_registrations(other)
    big = tmp_path / "big"
    big.mkdir()
    (big / REGISTRATIONS_FILE).write_bytes(b" " * (1 << 20) + b"{}")
    with pytest.raises(RegistrationsFileError, match="larger than"):
        read_registrations(big)


# --- the reloading source ------------------------------------------------------------------------


def test_source_follows_changes_and_reports_a_broken_file_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mount = SecretMount(tmp_path / "keyring")
    mount.write(render_registrations({"sniffer": R1}))
    source = RegistrationsSource(mount.root, poll_seconds=0.0)
    assert source.current() == {"sniffer": R1} and source.last_error is None
    assert not source.refresh()  # nothing changed

    mount.write(render_registrations({"sniffer": R2, "firewall": R1}))
    assert source.refresh()
    assert source.current() == {"sniffer": R2, "firewall": R1}

    # The same content in a new Secret version: nothing changed for a reader.
    mount.write(render_registrations({"firewall": R1, "sniffer": R2}))
    assert not source.refresh()

    with caplog.at_level(logging.ERROR, logger="defender_config.registrations"):
        mount.write(doc({"sniffer": "R3"}))
        assert not source.refresh()
        assert source.current() == {"sniffer": R2, "firewall": R1}  # the last good ones
        assert isinstance(source.last_error, RegistrationsFileError)
        assert "not an integer" in str(source.last_error)
        for _ in range(3):
            assert not source.refresh()
            assert source.current() == {"sniffer": R2, "firewall": R1}
    assert len([r for r in caplog.records if "re-read failed" in r.getMessage()]) == 1

    mount.write(render_registrations({"sniffer": R3}))
    assert source.refresh()
    assert source.current() == {"sniffer": R3} and source.last_error is None

    mount.write(None)  # the operator publishes none any more
    assert source.refresh()
    assert source.current() == {} and source.last_error is None


def test_source_without_a_file_is_empty_until_one_appears(tmp_path: Path) -> None:
    mount = SecretMount(tmp_path / "keyring")
    mount.write(None)
    source = RegistrationsSource(mount.root / "keyring.json", poll_seconds=0.0)
    assert source.current() == {} and source.path == mount.root / REGISTRATIONS_FILE
    mount.write(render_registrations({"sniffer": R1}))
    assert source.refresh() and source.current() == {"sniffer": R1}


def test_source_construction_with_a_broken_file_raises(tmp_path: Path) -> None:
    mount = SecretMount(tmp_path / "keyring")
    mount.write(b"{}")
    with pytest.raises(RegistrationsFileError, match="lacks registrations"):
        RegistrationsSource(mount.root)


def test_a_lenient_source_starts_with_none_and_the_error_then_reads_a_fixed_file(
    tmp_path: Path,
) -> None:
    mount = SecretMount(tmp_path / "keyring")
    mount.write(b"{}")
    now = [0.0]
    source = RegistrationsSource(mount.root, strict=False, poll_seconds=1.0, clock=lambda: now[0])
    assert source.current() == {} and source.registration("sniffer") is None
    assert source.last_error is not None and "lacks registrations" in str(source.last_error)
    mount.write(render_registrations({"sniffer": R1}))
    now[0] = 1.0
    assert source.registration("sniffer") == R1 and source.last_error is None
    assert source.registration("other") is None


def test_source_checks_the_file_at_most_every_poll(tmp_path: Path) -> None:
    mount = SecretMount(tmp_path / "keyring")
    mount.write(render_registrations({"sniffer": R1}))
    now = [0.0]
    source = RegistrationsSource(mount.root, poll_seconds=10.0, clock=lambda: now[0])
    mount.write(render_registrations({"sniffer": R2}))
    now[0] = 9.0
    assert source.current() == {"sniffer": R1}
    now[0] = 10.0
    assert source.current() == {"sniffer": R2}
    copy = source.current()
    copy["sniffer"] = 1
    assert source.current() == {"sniffer": R2}  # callers get a copy


# --- ConfigStore.hold_registrations ----------------------------------------------------------


@pytest.fixture
def alerts() -> list[Alert]:
    return []


@pytest.fixture
def configs(alerts: list[Alert]) -> Iterator[ConfigStore]:
    etcd = EtcdSettings(endpoints=["127.0.0.1:1"])  # never contacted
    client = DefenderClient(
        LibrarySettings(etcd=etcd), Keyring.generate(), alert_sinks=[CallableSink(alerts.append)]
    )
    yield ConfigStore(client)
    client.close()


def meta(registration: int | None, version: int = 1) -> ConfigMetadata:
    return ConfigMetadata(
        version=version,
        last_modified=datetime.now(UTC),
        modified_by="test",
        digest="0" * 64,
        type="sniffer",
        registration=registration,
    )


def test_hold_registrations_holds_what_the_reader_lacks_and_refuses_earlier_ones(
    configs: ConfigStore, alerts: list[Alert]
) -> None:
    configs.hold_registrations({"sniffer": R2, "firewall": R1})
    assert configs.held_registration("sniffer") == R2
    assert configs.held_registration("firewall") == R1
    assert configs.held_registration("rag") is None
    # A record of an earlier registration put back: refused by a reader that was told, even
    # though it never read the current one itself.
    with pytest.raises(RegistrationReplayError) as info:
        configs._check_registration("sniffer", meta(R1, version=5))
    assert (info.value.found, info.value.expected) == (R1, R2)
    assert [a.kind for a in alerts] == ["RegistrationReplayed"]
    with pytest.raises(RegistrationReplayError):
        configs._check_registration("sniffer", meta(None))
    configs._check_registration("sniffer", meta(R2))  # the current one reads


def test_hold_registrations_raises_but_never_lowers(configs: ConfigStore) -> None:
    configs._check_registration("sniffer", meta(R2))  # the reader saw R2 itself
    configs.hold_registrations({"sniffer": R1})  # a stale file
    assert configs.held_registration("sniffer") == R2
    configs._check_registration("sniffer", meta(R2))  # still reads the current one
    with pytest.raises(RegistrationReplayError):
        configs._check_registration("sniffer", meta(R1))
    configs.hold_registrations({"sniffer": R2})  # the same: nothing changes
    assert configs.held_registration("sniffer") == R2
    configs.hold_registrations({"sniffer": R3})  # a newer registration: raised
    assert configs.held_registration("sniffer") == R3
    with pytest.raises(RegistrationReplayError):
        configs._check_registration("sniffer", meta(R2))
    # Unlike `hold_registration`, which sets what the caller anchors.
    configs.hold_registration("sniffer", R1)
    assert configs.held_registration("sniffer") == R1
