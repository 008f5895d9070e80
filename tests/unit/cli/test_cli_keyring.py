"""The plugin's keyring commands without a cluster: flags, passphrase sources and their errors."""

from __future__ import annotations

import errno
import io
import os
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from defender_cli._app import build_parser, main
from defender_cli._errors import CliError
from defender_cli._keyring_commands import MIN_EXPORT_PASSPHRASE, load_import, read_passphrase
from defender_config import (
    Keyring,
    KeyringBackupError,
    WrongPassphraseError,
    read_keyring_backup,
    write_keyring_backup,
)


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


def test_an_export_refuses_a_short_passphrase_an_import_takes_it(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_text("x" * (MIN_EXPORT_PASSPHRASE - 1) + "\n")
    with pytest.raises(CliError, match="11 characters; an export needs at least 12") as caught:
        read_passphrase(str(short), None, exporting=True)
    assert "xxxx" not in str(caught.value)  # never echoed
    # An older export wrapped with it still imports.
    assert read_passphrase(str(short), None) == "x" * (MIN_EXPORT_PASSPHRASE - 1)
    enough = tmp_path / "enough"
    enough.write_text("y" * MIN_EXPORT_PASSPHRASE)
    assert read_passphrase(str(enough), None, exporting=True) == "y" * MIN_EXPORT_PASSPHRASE
    # No passphrase at all is a clear-text export, asked for on purpose (documented).
    assert read_passphrase(None, None, exporting=True) is None


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


class Exporting:
    """`keyring export` through main() against a stand-in API server: one keyring Secret to
    read, the export stamps it records."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        from kubernetes.client import CoreV1Api

        self.keyring = Keyring.generate()
        self.stamped: list[Any] = []
        self.kubeconfig = tmp_path / "kubeconfig"
        self.kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
            "clusters: [{name: c, cluster: {server: 'https://127.0.0.1:1'}}]\n"
            "users: [{name: u, user: {token: t}}]\n"
            "contexts: [{name: c, context: {cluster: c, user: u}}]\n"
        )
        data = self.keyring.to_secret_data()
        monkeypatch.setattr(
            CoreV1Api, "read_namespaced_secret", lambda _, *a: SimpleNamespace(data=data)
        )
        monkeypatch.setattr(CoreV1Api, "patch_namespaced_secret", self._patched)
        self.err = io.StringIO()

    def _patched(self, _api: Any, *args: Any, **kw: Any) -> Any:
        # Unread, as the plugin asks (`_preload_content=False`): the raw answer, closed.
        assert kw.get("_preload_content") is False
        self.stamped.append(args)
        return SimpleNamespace(close=lambda: None)

    def __call__(self, path: Path, *flags: str) -> int:
        self.err = io.StringIO()
        argv = ["keyring", "export", "-f", str(path), "--kubeconfig", str(self.kubeconfig)]
        return main([*argv, *flags], out=io.StringIO(), err=self.err)


@pytest.fixture
def export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Exporting:
    return Exporting(tmp_path, monkeypatch)


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_export_force_over_a_world_readable_file_leaves_an_owner_only_export(
    export: Exporting, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    path = out / "keyring.export"
    path.write_bytes(b"an older export")
    path.chmod(0o644)
    assert export(path, "--force") == 0, export.err.getvalue()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_keyring_backup(path.read_bytes(), None).keyring == export.keyring
    assert _listing(out) == ["keyring.export"]  # no temporary file left
    assert len(export.stamped) == 1


def test_export_without_force_keeps_an_existing_file(export: Exporting, tmp_path: Path) -> None:
    path = tmp_path / "keyring.export"
    path.write_bytes(b"an older export")
    assert export(path) == 2
    assert "exists; pass --force" in export.err.getvalue()
    assert path.read_bytes() == b"an older export" and not export.stamped


@pytest.mark.parametrize("force", [False, True])
def test_export_refuses_a_symbolic_link(export: Exporting, tmp_path: Path, force: bool) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"someone else's file")
    elsewhere.chmod(0o644)
    link = tmp_path / "keyring.export"
    link.symlink_to(elsewhere)
    assert export(link, *(["--force"] if force else [])) == 2
    assert "is a symbolic link" in export.err.getvalue()
    assert link.is_symlink() and elsewhere.read_bytes() == b"someone else's file"
    assert _listing(tmp_path) == ["elsewhere", "keyring.export", "kubeconfig"]
    assert not export.stamped


def test_export_that_cannot_be_written_is_one_line_and_leaves_nothing(
    export: Exporting, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    path = out / "keyring.export"
    path.write_bytes(b"an older export")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    assert export(path, "--force") == 2
    message = export.err.getvalue()
    assert message.startswith(f"kubectl defender keyring: cannot write {path}:")
    assert "No space left on device" in message and len(message.splitlines()) == 1
    assert path.read_bytes() == b"an older export"
    assert _listing(out) == ["keyring.export"]
    assert not export.stamped  # the Secret does not claim an export that is not there


@pytest.mark.parametrize(
    ("where", "why"),
    [
        ("missing/keyring.export", "cannot create a temporary file in"),
        ("a-file/keyring.export", "Not a directory"),
    ],
)
def test_export_to_a_path_that_cannot_hold_a_file(
    export: Exporting, tmp_path: Path, where: str, why: str
) -> None:
    (tmp_path / "a-file").write_text("x")
    assert export(tmp_path / where) == 2
    message = export.err.getvalue()
    assert f"cannot write {tmp_path / where}" in message and why in message
    assert "Traceback" not in message and not export.stamped


@pytest.mark.parametrize("flag", ["--passphrase-file", "--passphrase-env"])
def test_a_raw_import_refuses_a_passphrase(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flag: str
) -> None:
    """A plain keyring.json has no passphrase; one given with --raw was silently ignored, while
    its giver expects it to be used. Refused before Kubernetes or etcd is reached."""
    raw = tmp_path / "keyring.json"
    raw.write_bytes(Keyring.generate().to_json())
    passphrase = tmp_path / "passphrase"
    passphrase.write_text("a long enough passphrase\n")
    monkeypatch.setenv("KEYRING_TEST_PASSPHRASE", "a long enough passphrase")
    value = str(passphrase) if flag == "--passphrase-file" else "KEYRING_TEST_PASSPHRASE"
    out, err = io.StringIO(), io.StringIO()
    argv = ["keyring", "import", "-f", str(raw), "--raw", flag, value, "--no-color"]
    code = main([*argv, "--kubeconfig", str(tmp_path / "absent")], out=out, err=err)
    assert (code, out.getvalue()) == (2, "")
    assert err.getvalue() == (
        "kubectl defender keyring: --raw reads a plain keyring.json, which has no passphrase:"
        " drop --passphrase-file / --passphrase-env, or drop --raw for a passphrase-protected"
        " export\n"
    )
