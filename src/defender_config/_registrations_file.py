"""The registrations the operator publishes beside the keyring: `registrations.json`.

The operator anchors each component's current registration in its DefenderComponent's
`status.registration` and publishes those of a namespace in the keyring Secret, next to
`keyring.json`, as

    {"version": 1, "registrations": {"<component>": <registration>, ...}}

A reader that holds them (`ConfigStore.hold_registrations`) refuses a metadata record and ACTIVE
of an earlier registration put back in etcd even when it starts after they were put back, when it
has seen nothing of the current registration itself (docs/security.md, "Replays across a record's
lifetime: registrations").

The Secret is mounted like the keyring (`<dir>/registrations.json -> ..data/registrations.json`,
`..data` swapped atomically by kubelet); reading through the symlinks sees one whole version. A
Secret without the entry (an operator that publishes none yet) has no file: nothing is held.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from ._errors import RegistrationsFileError
from ._files import read_regular_file
from ._json_parse import parse_json
from ._keyring import KEYRING_FILE, _stat_signature
from ._layout import check_name

__all__ = [
    "REGISTRATIONS_FILE",
    "RegistrationsSource",
    "parse_registrations",
    "read_registrations",
    "render_registrations",
]

log = logging.getLogger("defender_config.registrations")

REGISTRATIONS_FILE = "registrations.json"
# A Secret holds at most 1 MiB in all.
_MAX_FILE_BYTES = 1 << 20
_VERSION = 1
# As `ConfigMetadata.registration` allows.
_HIGHEST = 2**63 - 1
_FIELDS = frozenset({"version", "registrations"})


def _shown(name: str) -> str:
    """A name from the file for a message: quoted, cut short."""
    return repr(name if len(name) <= 64 else name[:64] + "...")


def _checked(entries: Iterable[tuple[Any, Any]], source: str | None) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, registration in entries:
        if not isinstance(name, str):
            raise RegistrationsFileError(
                f"component name of type {type(name).__name__} (need a string)", source=source
            )
        try:
            check_name(name)
        except ValueError:
            raise RegistrationsFileError(
                f"component {_shown(name)} is not a valid component name (1-253 letters, "
                "digits, '.', '_' or '-', starting and ending with a letter or digit)",
                source=source,
            ) from None
        # bool is an int subclass; JSON true is not a registration.
        if type(registration) is not int:
            raise RegistrationsFileError(
                f"registration of component {_shown(name)} is a "
                f"{type(registration).__name__}, not an integer",
                source=source,
            )
        if not 1 <= registration <= _HIGHEST:
            raise RegistrationsFileError(
                f"registration of component {_shown(name)} is {registration}, not between 1 "
                f"and {_HIGHEST}",
                source=source,
            )
        out[name] = registration
    return out


def render_registrations(mapping: Mapping[str, int]) -> bytes:
    """The `registrations.json` content for `mapping` (component -> registration): canonical
    (sorted keys, no spaces), so the same registrations always give the same bytes. Raises
    RegistrationsFileError for an entry a reader would refuse."""
    checked = _checked(mapping.items(), None)
    doc = {"version": _VERSION, "registrations": dict(sorted(checked.items()))}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")


def parse_registrations(content: bytes, *, source: str) -> dict[str, int]:
    """The component -> registration mapping of `registrations.json` content. Strict about
    what it reads (a wrong version, a missing field, a bad entry is a RegistrationsFileError
    naming `source` and the entry, never quoting the content); top-level fields it does not
    know are ignored."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        raise RegistrationsFileError("is not UTF-8", source=source) from None
    try:
        doc = parse_json(text)
    except ValueError as exc:
        # The decoder's message quotes no input, only a position.
        raise RegistrationsFileError(f"is not valid JSON ({exc})", source=source) from None
    if not isinstance(doc, dict):
        raise RegistrationsFileError(
            f"must be a JSON object, not {type(doc).__name__}", source=source
        )
    # Fields this reader does not know are a newer operator's additions: ignored, so an
    # operator upgraded before its agents does not cut them off what they do read. A change
    # they would misread bumps `version`.
    missing = sorted(_FIELDS - set(doc))
    if missing:
        raise RegistrationsFileError(f"lacks {', '.join(missing)}", source=source)
    version = doc["version"]
    if type(version) is not int or version != _VERSION:
        shown = version if type(version) is int else type(version).__name__
        raise RegistrationsFileError(
            f"version {shown} is not supported (need {_VERSION}); upgrade this component",
            source=source,
        )
    registrations = doc["registrations"]
    if not isinstance(registrations, dict):
        raise RegistrationsFileError(
            f'"registrations" must be an object, not {type(registrations).__name__}',
            source=source,
        )
    return _checked(registrations.items(), source)


def _file_of(path: str | os.PathLike[str]) -> Path:
    """Where `registrations.json` is for a keyring path: in the mounted Secret directory `path`,
    or beside `path` when it names `keyring.json` (or another existing file)."""
    p = Path(path)
    try:
        a_file = p.name == KEYRING_FILE or (p.exists() and not p.is_dir())
    except OSError:  # not searchable: read as a directory, which reports why
        a_file = False
    return p.parent / REGISTRATIONS_FILE if a_file else p / REGISTRATIONS_FILE


def read_registrations(path: str | os.PathLike[str]) -> dict[str, int] | None:
    """The registrations published in the keyring Secret mounted at `path` (its directory, or
    its `keyring.json`); None when it has no `registrations.json`. Symlinks are followed (the
    `..data` layout of a Kubernetes Secret volume). RegistrationsFileError when the file cannot
    be read or is malformed."""
    file = _file_of(path)
    try:
        content = read_regular_file(file, _MAX_FILE_BYTES)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RegistrationsFileError(
            f"cannot read it ({exc.strerror or exc}); check the keyring Secret mount",
            source=str(file),
        ) from None
    return parse_registrations(content, source=str(file))


class RegistrationsSource:
    """The registrations of a mounted keyring Secret, re-read when `registrations.json` changes.
    Thread-safe.

    `current()` checks the file at most every `poll_seconds` (a stat; the content only when that
    changed). A broken new file keeps the last good registrations, is logged once and exposed as
    `last_error`, never raised; a file that goes away means none. Construction fails if the
    first read fails (a missing file is not a failure: none are published), unless `strict` is
    False: then it starts with none and the error as `last_error` (a library reader must not
    fail over a file it only reads to refuse more).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        poll_seconds: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        strict: bool = True,
    ) -> None:
        self._path = Path(path)
        self._poll = poll_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._file = _file_of(self._path)
        self._signature = _stat_signature(self._file)
        self._last_error: RegistrationsFileError | None = None
        try:
            self._registrations: dict[str, int] = read_registrations(self._path) or {}
        except RegistrationsFileError as exc:
            if strict:
                raise
            self._registrations, self._last_error = {}, exc
            log.error("registrations not read, none held: %s", exc, extra={"reason": exc.reason})
        self._next_check = clock() + poll_seconds

    @property
    def path(self) -> Path:
        """The file read."""
        return self._file

    @property
    def last_error(self) -> RegistrationsFileError | None:
        """The error of the latest failed re-read, None once one succeeds."""
        return self._last_error

    def current(self) -> dict[str, int]:
        """The latest good registrations (component -> registration; empty when none)."""
        self._check()
        return dict(self._registrations)

    def registration(self, component: str) -> int | None:
        """The latest good registration of `component` (None: none published); no copy of the
        whole mapping, for a reader's every check."""
        self._check()
        return self._registrations.get(component)

    def _check(self) -> None:
        # While another thread re-reads the file, answer from what is held.
        if self._clock() >= self._next_check and not self._lock.locked():
            self.refresh()

    def refresh(self) -> bool:
        """Check the file now. True when the registrations changed."""
        with self._lock:
            self._next_check = self._clock() + self._poll
            signature = _stat_signature(self._file)
            if signature == self._signature:
                return False
            try:
                new = read_registrations(self._path)
            except RegistrationsFileError as exc:
                # Remember the signature so a broken file is reported once, not every poll;
                # the next change is read again.
                self._signature = signature
                self._last_error = exc
                log.error(
                    "registrations re-read failed, keeping the last good ones (%d): %s",
                    len(self._registrations),
                    exc,
                    extra={"reason": exc.reason},
                )
                return False
            self._signature = signature
            if self._last_error is not None:
                self._last_error = None
                log.info("registrations file readable again: %s", self._file)
            registrations = new or {}
            if registrations == self._registrations:
                return False
            self._registrations = registrations
            log.info(
                "registrations re-read: %d component(s) from %s", len(registrations), self._file
            )
            return True

    def __repr__(self) -> str:
        return f"RegistrationsSource({str(self._file)!r}, {len(self._registrations)} held)"
