"""How the plugin reaches etcd (library settings) and Kubernetes (kubeconfig), and where it
gets a keyring when a command must decrypt."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from defender_config import (
    DefenderClient,
    DefenderConfigError,
    Keyring,
    KeyringError,
    LibrarySettings,
    SettingsError,
    StoreUnavailableError,
    load_settings,
    override_settings,
)
from defender_config.store import EtcdStore

from ._errors import CliError, NeedsKeyringError, too_deep


@dataclass
class Connection:
    """Built from the parsed flags; opens what a command needs, once."""

    args: argparse.Namespace
    _kube: Any = field(default=None, repr=False)
    _clients: list[DefenderClient] = field(default_factory=list, repr=False)

    def settings(self, *, decrypting: bool) -> LibrarySettings:
        try:
            settings = load_settings(self.args.settings)
        except DefenderConfigError as exc:
            raise CliError(f"settings: {exc}") from exc
        etcd: dict[str, Any] = {}
        update: dict[str, Any] = {}
        flags: dict[str, tuple[str, str]] = {}
        if self.args.etcd_endpoints:
            flags["etcd.endpoints"] = ("--etcd-endpoints", self.args.etcd_endpoints)
            etcd["endpoints"] = [
                e.strip() for e in self.args.etcd_endpoints.split(",") if e.strip()
            ]
        if self.args.prefix:
            flags["prefix"] = ("--prefix", self.args.prefix)
            update["prefix"] = self.args.prefix
        if not decrypting:
            # Without a keyring nothing sealed is opened: status, alerts and plain dumps read
            # plaintext records and envelope headers only.
            update["envelope"] = settings.envelope.model_copy(update={"encrypt": False})
        try:
            return override_settings(settings, etcd=etcd, **update)
        except SettingsError as exc:
            raise _refused(exc.problems, flags) from None

    def keyring(self, command: str) -> Keyring:
        """The keyring from --keyring or --keyring-secret; NeedsKeyringError when neither."""
        try:
            if self.args.keyring:
                return Keyring.from_path(Path(self.args.keyring))
            if self.args.keyring_secret:
                # (namespace, name), each checked by the flag's type (`secret_ref`)
                return self._keyring_from_secret(*self.args.keyring_secret)
        except KeyringError as exc:
            raise CliError(f"keyring: {exc}") from exc
        raise NeedsKeyringError(command)

    def _keyring_from_secret(self, namespace: str, name: str) -> Keyring:
        from kubernetes.client import CoreV1Api
        from kubernetes.client.exceptions import ApiException

        try:
            secret = CoreV1Api(self.kube()).read_namespaced_secret(name, namespace)
        except RecursionError:
            raise too_deep(f"the API server's answer for Secret {namespace}/{name}") from None
        except ApiException as exc:
            raise CliError(
                f"cannot read Secret {namespace}/{name}: {exc.status} {exc.reason};"
                " check the name and that you may get Secrets there"
            ) from None
        return Keyring.from_secret_data(secret.data or {}, source=f"Secret {namespace}/{name}")

    def client(self, *, keyring: Keyring | None = None) -> DefenderClient:
        settings = self.settings(decrypting=keyring is not None)
        try:
            # Logged in now: an etcd that does not answer is one StoreUnavailableError, which
            # main() words with what to check, not a "login deferred" warning followed by
            # the same failure (and the same retries) at the command's first call.
            store = EtcdStore(settings.etcd, defer_login=False)
        except StoreUnavailableError:
            raise
        except DefenderConfigError as exc:
            raise CliError(str(exc)) from exc
        try:
            # No alert sinks: a read-only look must not write alerts into the store.
            client = DefenderClient(settings, keyring, store=store, alert_sinks=[])
        except DefenderConfigError as exc:
            store.close()
            raise CliError(str(exc)) from exc
        self._clients.append(client)
        return client

    def kube(self) -> Any:
        if self._kube is None:
            from kubernetes import config
            from yaml import YAMLError

            from ._kube import bounded_client

            where = self.args.kubeconfig or "(from KUBECONFIG or ~/.kube/config)"
            try:
                self._kube = bounded_client(
                    self.args.kubeconfig, self.args.context, self.args.request_timeout
                )
            except RecursionError:
                # Its YAML loader recurses once per level of a flow collection (`[[[...`).
                raise too_deep(f"kubeconfig {where}") from None
            except config.ConfigException as exc:
                unnamed = _not_a_name(str(exc))
                if unnamed is None:
                    raise CliError(
                        f"kubeconfig: {exc}; pass --kubeconfig or set KUBECONFIG"
                    ) from exc
                # The loader's message shows the YAML node's repr, not what is wrong.
                raise CliError(
                    f"kubeconfig {where} is not a valid kubeconfig ({unnamed}); check the file,"
                    " or pass --kubeconfig"
                ) from None
            except OSError as exc:
                raise CliError(f"kubeconfig: {exc}; pass --kubeconfig or set KUBECONFIG") from exc
            except (YAMLError, UnicodeDecodeError, TypeError, AttributeError, ValueError) as exc:
                # The client's loader fails on a malformed file with whatever its parsing hit
                # (a YAML error, a list where a mapping belongs, bad base64). Their messages are
                # not shown: a kubeconfig holds tokens and keys, and they may quote its text.
                raise CliError(
                    f"kubeconfig {where} is not a valid kubeconfig ({_malformed(exc)}); check the"
                    " file, or pass --kubeconfig"
                ) from None
        return self._kube

    def close(self) -> None:
        for client in self._clients:
            client.close()
            # Passed in by `client()`, so the client leaves it open.
            client.store.close()
        self._clients.clear()
        if self._kube is not None:
            self._kube.close()
            self._kube = None


def _malformed(exc: Exception) -> str:
    """Where a kubeconfig is malformed, without quoting any of it."""
    from yaml import MarkedYAMLError, YAMLError

    if isinstance(exc, MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"not valid YAML at line {mark.line + 1}, column {mark.column + 1}"
    if isinstance(exc, YAMLError):
        return "not valid YAML"
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8 text"
    if isinstance(exc, ValueError):
        return "a value that does not decode, such as base64 certificate data"
    return "an entry of the wrong shape: clusters, contexts and users must be lists of mappings"


# Which field names an entry of which list: the loader looks each name up in its list.
_NAMED_BY = {
    "contexts": "current-context",
    "clusters": "a context's cluster",
    "users": "a context's user",
}
_NODE_IN_LIST = re.compile(
    r"Expected object with name <[\w.]*ConfigNode object at 0x[0-9a-f]+> in .*/(\w+) list"
)


def _not_a_name(message: str) -> str | None:
    """For the loader's error on a name that is a list or mapping (`current-context: [x]`): which
    field, and what it should be. None for any other error. Nothing of the file is quoted."""
    match = _NODE_IN_LIST.search(message)
    if match is None:
        return None
    listed = match.group(1)
    field = _NAMED_BY.get(listed, f"a name looked up in {listed}")
    return f"{field} is a list or mapping; it must be a string, the name of an entry of {listed}"


def _refused(problems: tuple[tuple[str, str], ...], flags: dict[str, tuple[str, str]]) -> CliError:
    """One line for what the library refused: `--flag 'value': why` for a value given on the
    command line (`flags` maps a field's dotted location to its flag and value; an item of it,
    `etcd.endpoints.0`, is the flag's too), `settings: field: why` for anything else."""
    parts = []
    for where, why in problems:
        flag = next(
            (f for loc, f in flags.items() if where == loc or where.startswith(loc + ".")), None
        )
        if flag is not None:
            parts.append(f"{flag[0]} {flag[1]!r}: {why}")
        else:
            parts.append(f"settings: {where or '(top)'}: {why}")
    return CliError("; ".join(parts))
