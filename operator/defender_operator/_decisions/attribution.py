"""Who changed spec.config: the admission stamp and its check.

The mutating webhook sees the requesting user (admission `userInfo`, authenticated by the API
server); the reconcile later sees only the object. The stamp carries the user from one to the
other as two annotations. The writer of the object can set any annotation, so:

- the webhook overwrites both on every create and every update of spec.config, and puts the
  stored ones back on any other update (a client cannot keep or set a stamp of its choosing
  while the webhook is consulted);
- the seal is an HMAC over namespace, name, user and the config digest, keyed with a secret
  only the operator holds, so a stamp written while the webhook was not consulted (down, with
  failurePolicy Ignore) or copied from another object or config does not verify.

A seal verifies for the same object and the same config only: re-applying a config someone
else stamped, with their annotations copied, names the person who did write that config.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

STAMP_ANNOTATION = "mldefender.io/last-modified-by"
SEAL_ANNOTATION = "mldefender.io/last-modified-by-seal"
UNATTRIBUTED = "unattributed"
_SEAL_VERSION = "v1"


def seal(key: bytes, namespace: str, name: str, user: str, config_digest: str) -> str:
    message = "\x00".join((_SEAL_VERSION, namespace, name, user, config_digest)).encode()
    return f"{_SEAL_VERSION}:{hmac.new(key, message, hashlib.sha256).hexdigest()}"


def stamp_changes(
    *,
    key: bytes,
    namespace: str,
    name: str,
    user: str,
    config_digest: str,
    old_config_digest: str | None,
    annotations: Mapping[str, str],
    old_annotations: Mapping[str, str],
) -> dict[str, str | None]:
    """The annotation values the webhook must set (None: remove) so the object carries the
    stamp it should: a fresh one when the config is new (create, or a changed config), the
    stored one otherwise. Empty when the object already carries exactly that."""
    wanted: dict[str, str | None]
    if old_config_digest is None or config_digest != old_config_digest:
        wanted = {
            STAMP_ANNOTATION: user,
            SEAL_ANNOTATION: seal(key, namespace, name, user, config_digest),
        }
    else:
        wanted = {k: old_annotations.get(k) for k in (STAMP_ANNOTATION, SEAL_ANNOTATION)}
    return {k: v for k, v in wanted.items() if annotations.get(k) != v}


def verified_author(
    key: bytes, namespace: str, name: str, annotations: Mapping[str, str], config_digest: str
) -> str | None:
    """The stamped user when the seal verifies for this object and this config, else None."""
    user = annotations.get(STAMP_ANNOTATION)
    given = annotations.get(SEAL_ANNOTATION)
    if not user or not given:
        return None
    expected = seal(key, namespace, name, user, config_digest)
    return user if hmac.compare_digest(expected, given) else None
