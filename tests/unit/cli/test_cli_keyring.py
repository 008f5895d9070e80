"""The plugin's keyring commands without a cluster: flags, passphrase sources and their errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from defender_cli._app import build_parser
from defender_cli._errors import CliError
from defender_cli._keyring_commands import load_import, read_passphrase
from defender_config import Keyring, KeyringBackupError, WrongPassphraseError, write_keyring_backup


def test_export_and_import_flags() -> None:
    args = build_parser().parse_args(
        ["keyring", "export", "-f", "k.json", "--passphrase-file", "p", "--force"]
    )
    assert (args.command, args.keyring_command, args.force) == ("keyring", "export", True)
    args = build_parser().parse_args(["keyring", "import", "-f", "k.json", "--raw", "--replace"])
    assert (args.keyring_command, args.raw, args.replace) == ("import", True, True)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["keyring", "export"])  # -f is required


def test_passphrase_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "p"
    file.write_text("first line\nsecond\n")
    assert read_passphrase(str(file), None) == "first line"
    assert read_passphrase(None, None) is None
    monkeypatch.setenv("KEYRING_TEST_PASSPHRASE", "from env")
    assert read_passphrase(None, "KEYRING_TEST_PASSPHRASE") == "from env"


def test_passphrase_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CliError, match="cannot read the passphrase file"):
        read_passphrase(str(tmp_path / "absent"), None)
    empty = tmp_path / "empty"
    empty.write_text("")
    with pytest.raises(CliError, match="is empty"):
        read_passphrase(str(empty), None)
    monkeypatch.delenv("KEYRING_TEST_UNSET", raising=False)
    with pytest.raises(CliError, match="not set or empty"):
        read_passphrase(None, "KEYRING_TEST_UNSET")


def test_load_import_forms_and_errors(tmp_path: Path) -> None:
    keyring = Keyring.generate()
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_bytes(write_keyring_backup(keyring, "pw"))
    got, exported = load_import(wrapped, "pw", raw=False)
    assert got == keyring and exported is not None
    with pytest.raises(WrongPassphraseError):
        load_import(wrapped, "other", raw=False)
    raw = tmp_path / "keyring.json"
    raw.write_bytes(keyring.to_json())
    assert load_import(raw, None, raw=True) == (keyring, None)
    with pytest.raises(KeyringBackupError, match="--raw"):
        load_import(raw, None, raw=False)  # a Secret's keyring.json is not an export
    with pytest.raises(CliError, match="cannot read"):
        load_import(tmp_path / "absent.json", None, raw=False)
