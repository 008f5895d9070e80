"""`kubectl defender keyring export` / `import`: the keyring as a file a person keeps safe.

The keyring Secret and its copies live in the cluster; an etcd snapshot without the keyring is
unreadable. The export is the one thing to keep apart from both (docs/security.md). Import
writes the source Secret back only when the keyring proves it opens every stored value, so an
old or foreign export cannot replace the key the data needs.
"""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from defender_config import (
    DefenderClient,
    FileWriteError,
    Keyring,
    KeyringLacksKeysError,
    key_usage,
    keys_opened,
    read_file_bounded,
    read_key_record,
    read_keyring_backup,
    write_file_atomic,
    write_keyring_backup,
)
from defender_config.contract import EXPORTED_ANNOTATION, EXPORTED_KEYS_ANNOTATION, KEYRING_LABELS

from ._errors import CliError, ExportNotStampedError, too_deep

LABELS = KEYRING_LABELS


def _listed(keyring: Keyring) -> list[dict[str, str]]:
    """Ids, states and fingerprints: what a person may see of a keyring."""
    return [
        {"id": k.key_id, "state": k.state.value, "fingerprint": k.fingerprint} for k in keyring.keys
    ]


# An export holds every key; scrypt makes each guess slow, so only the passphrase's length
# keeps an offline attack on a copied file from succeeding.
MIN_EXPORT_PASSPHRASE = 12


MAX_PASSPHRASE_FILE_BYTES = 64 * 1024
# An export wraps a keyring of at most 1 MiB (a Secret's limit) in base64 and JSON.
MAX_IMPORT_FILE_BYTES = 4 * 1024 * 1024


def read_passphrase(file: str | None, env: str | None, *, exporting: bool = False) -> str | None:
    """The passphrase from --passphrase-file (first line) or --passphrase-env NAME; None when
    neither was given. `exporting`: one shorter than MIN_EXPORT_PASSPHRASE characters is
    refused (an import takes what an older export was wrapped with)."""
    passphrase = _passphrase(file, env)
    if exporting and passphrase is not None and len(passphrase) < MIN_EXPORT_PASSPHRASE:
        raise CliError(
            f"the passphrase has {len(passphrase)} characters; an export needs at least"
            f" {MIN_EXPORT_PASSPHRASE}: the file holds every key, and a short passphrase falls to"
            " guessing despite scrypt"
        )
    return passphrase


def _passphrase(file: str | None, env: str | None) -> str | None:
    if file:
        try:
            # Bounded: only the first line is used, and a wrong path may name a huge file.
            text = read_file_bounded(file, MAX_PASSPHRASE_FILE_BYTES).decode("utf-8")
        except OSError as exc:
            raise CliError(f"cannot read the passphrase file {file}: {exc.strerror}") from None
        except UnicodeDecodeError:
            # Not the decoder's message: it quotes the bytes it could not read.
            raise CliError(f"the passphrase file {file} is not UTF-8 text") from None
        passphrase = text.splitlines()[0] if text else ""
        if not passphrase:
            raise CliError(f"the passphrase file {file} is empty")
        return passphrase
    if env:
        value = os.environ.get(env)
        if not value:
            raise CliError(f"environment variable {env} (--passphrase-env) is not set or empty")
        return value
    return None


def _read_secret(kube: Any, namespace: str, name: str) -> Any:
    from kubernetes.client import CoreV1Api
    from kubernetes.client.exceptions import ApiException

    try:
        return CoreV1Api(kube).read_namespaced_secret(name, namespace)
    except RecursionError:
        raise too_deep(f"the API server's answer for Secret {namespace}/{name}") from None
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise CliError(
            f"cannot read Secret {namespace}/{name}: {exc.status} {exc.reason}; check"
            " --operator-namespace / --secret and that you may get Secrets there"
        ) from None


def export_keyring(
    kube: Any,
    namespace: str,
    secret: str,
    path: Path,
    passphrase: str | None,
    *,
    force: bool = False,
) -> dict[str, Any]:
    found = _read_secret(kube, namespace, secret)
    if found is None:
        raise CliError(
            f"Secret {namespace}/{secret} does not exist: nothing to export. If it was deleted,"
            " see docs/troubleshooting.md#keyringmissing"
        )
    keyring = Keyring.from_secret_data(found.data or {}, source=f"Secret {namespace}/{secret}")
    content = write_keyring_backup(keyring, passphrase)
    _write_export(path, content, force=force)
    when = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    _stamp(kube, namespace, secret, when, path, keyring)
    return {
        "file": str(path),
        "secret": f"{namespace}/{secret}",
        "protected": passphrase is not None,
        "exported": when,
        "keys": _listed(keyring),
    }


def _write_export(path: Path, content: bytes, *, force: bool) -> None:
    """Write the export whole, owner-only (0600), or raise CliError and leave `path` as it was.

    The file holds the key (wrapped or not): it is written to a new 0600 file beside `path` and
    renamed over it, so an existing file's mode never carries over and no one sees a half-written
    keyring. A symbolic link at `path` is refused, --force or not: writing through it would put
    the key wherever it points, and replacing it would surprise whoever made it.
    """
    try:
        existing = os.lstat(path)
    except FileNotFoundError:
        existing = None
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror}") from None
    if existing is not None:
        if stat.S_ISLNK(existing.st_mode):
            raise CliError(
                f"{path} is a symbolic link; not writing the keyring through it or over it:"
                " give the path of a regular file"
            )
        if not force:
            raise CliError(f"{path} exists; pass --force to overwrite it")
    # A file created at `path` after the check above is replaced: rename(2) never follows a link
    # and, in a sticky directory such as /tmp, refuses to replace another user's file.
    try:
        # Complete on disk before the Secret says an export exists.
        write_file_atomic(path, content, 0o600)
    except FileWriteError as exc:
        raise CliError(
            f"{exc}; check that the directory exists, is writable and has room"
        ) from None


def export_stamp(when: str, keyring: Keyring) -> dict[str, str]:
    """The Secret's annotations recording an export of `keyring` at `when`: the key ids it
    holds too, so the operator can tell when a rotation added a key the export lacks."""
    return {
        EXPORTED_ANNOTATION: when,
        EXPORTED_KEYS_ANNOTATION: ",".join(sorted(k.key_id for k in keyring.keys)),
    }


def _stamp(kube: Any, namespace: str, secret: str, when: str, path: Path, keyring: Keyring) -> None:
    """Record the export on the Secret (the operator stops warning NoKeyringExport). The file
    is already complete: a failure here keeps it and says so (ExportNotStampedError, exit 3)."""
    from kubernetes.client import CoreV1Api
    from kubernetes.client.exceptions import ApiException

    stamp = export_stamp(when, keyring)
    try:
        # The patched Secret the server answers with is not read (as `_annotate_component`):
        # the stamp is set once it answers 2xx, and a Secret someone nested too deeply to
        # decode must not turn a recorded export into an error.
        answer: Any = CoreV1Api(kube).patch_namespaced_secret(
            secret, namespace, {"metadata": {"annotations": stamp}}, _preload_content=False
        )
        answer.close()
    except ApiException as exc:
        keys = ", ".join(f"{k.key_id} (fingerprint {k.fingerprint})" for k in keyring.keys)
        kept = f"{path} was written and is a complete export of key(s) {keys}: keep it"
        if exc.status == 404:
            raise ExportNotStampedError(
                f"{kept}. Secret {namespace}/{secret} was deleted while it was exported, so the"
                " export time could not be recorded; if the operator now reports KeyringMissing,"
                " import this file (docs/troubleshooting.md#keyringmissing)"
            ) from None
        raise ExportNotStampedError(
            f"{kept}. The export time could not be recorded on Secret {namespace}/{secret}"
            f" ({exc.status} {exc.reason}"
            + ("; you may read it but not patch it" if exc.status == 403 else "")
            + "), so the operator keeps warning NoKeyringExport. Grant `patch` on that"
            " Secret, or let someone who"
            f" may run: kubectl -n {namespace} annotate --overwrite secret {secret} "
            + " ".join(f"{k}={v}" for k, v in stamp.items())
        ) from None


def load_import(path: Path, passphrase: str | None, *, raw: bool) -> tuple[Keyring, str | None]:
    """The keyring in an export file (or with `raw`, a keyring.json) and when it was exported."""
    try:
        content = read_file_bounded(path, MAX_IMPORT_FILE_BYTES)
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None
    if raw:
        return Keyring.from_json(content, source=str(path)), None
    backup = read_keyring_backup(content, passphrase, source=str(path))
    return backup.keyring, backup.created.strftime("%Y-%m-%dT%H:%M:%SZ")


def check_opens_store(client: DefenderClient, keyring: Keyring, source: str) -> int:
    """KeyringLacksKeysError unless `keyring` opens a stored value of every key id in use (or,
    with no sealed value left, holds a key etcd records). Returns how many sealed values use
    keys it proved."""
    layout = client.layout
    usage = key_usage(client.store.list_prefix(layout.prefix + "/"))
    recorded = read_key_record(client.store, layout)
    opened = keys_opened(keyring, usage, client.envelope.options)
    lacking = usage.key_ids - opened
    if lacking:
        raise KeyringLacksKeysError(
            ((kid, recorded.get(kid)) for kid in sorted(lacking)), source=source
        )
    held = keyring.fingerprints()
    if (
        not usage.key_ids
        and recorded
        and not any(held.get(kid) == fp for kid, fp in recorded.items())
    ):
        raise KeyringLacksKeysError(recorded.items(), source=source)
    return usage.sealed


def import_keyring(
    kube: Any,
    client: DefenderClient,
    namespace: str,
    secret: str,
    path: Path,
    loaded: tuple[Keyring, str | None],
    *,
    replace: bool = False,
) -> dict[str, Any]:
    """Write the keyring `loaded` from `path` (`load_import`) to the Secret, if it opens every
    stored value."""
    from kubernetes.client import CoreV1Api, V1ObjectMeta, V1Secret
    from kubernetes.client.exceptions import ApiException

    keyring, exported = loaded
    sealed = check_opens_store(client, keyring, str(path))
    existing = _read_secret(kube, namespace, secret)
    if existing is not None and not replace:
        raise CliError(
            f"Secret {namespace}/{secret} exists; pass --replace to overwrite it with {path}"
            " (checked: the file opens every stored value)"
        )
    annotations = export_stamp(exported, keyring) if exported else {}
    body = V1Secret(
        metadata=V1ObjectMeta(
            name=secret,
            namespace=namespace,
            labels=LABELS,
            annotations=annotations,
            resource_version=existing.metadata.resource_version if existing is not None else None,
        ),
        type="Opaque",
        data=keyring.to_secret_data(),
    )
    core = CoreV1Api(kube)
    try:
        # The Secret written is not read back (as `_stamp`).
        written: Any = (
            core.create_namespaced_secret(namespace, body, _preload_content=False)
            if existing is None
            else core.replace_namespaced_secret(secret, namespace, body, _preload_content=False)
        )
        written.close()
    except ApiException as exc:
        # Only status and reason: the API's body may echo the Secret sent.
        raise CliError(
            f"cannot write Secret {namespace}/{secret}: {exc.status} {exc.reason}; check that"
            " you may create and update Secrets there"
        ) from None
    return {
        "file": str(path),
        "secret": f"{namespace}/{secret}",
        "replaced": existing is not None,
        "sealedValuesOpened": sealed,
        "keys": _listed(keyring),
    }


__all__ = [
    "EXPORTED_ANNOTATION",
    "check_opens_store",
    "export_keyring",
    "import_keyring",
    "load_import",
    "read_passphrase",
]
