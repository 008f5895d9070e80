"""Where every value lives in etcd. docs/etcd-layout.md documents the same tree for etcdctl users.

```
<prefix>/components/<name>/master_config                 sealed, create-only
<prefix>/components/<name>/active_config                 sealed, CAS on version
<prefix>/components/<name>/metadata                      JSON
<prefix>/components/<name>/status                        JSON
<prefix>/components/<name>/history/<version, 10 digits>  sealed, last N versions
<prefix>/components/<name>/instances/<instance>          JSON heartbeat, bound to a lease
<prefix>/alerts/<component>/<time-ns>-<rand>             JSON alert record
<prefix>/control/<component>/freeze                      JSON {reason, since}
<prefix>/keyring/record                                  JSON key ids + fingerprints (no key)
<prefix>/control/<component>/owner                       JSON {namespace, name, uid, released}
<prefix>/control/<component>/heartbeat                   JSON cadence the instances follow
<prefix>/components/<name>/candidate                     sealed, the config a canary rollout tries
<prefix>/control/<component>/rollout                     JSON signed: which instances run it
```

Only this module builds key strings, so a change of layout is a change of one file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from .contract import HIGHEST_VERSION, VERSION_DIGITS

__all__ = ["KeyKind", "Layout", "ParsedKey", "check_name"]

# A name is one path segment that etcdctl users can type without quoting: Kubernetes object
# names (DNS-1123), pod names and hostnames all fit. Validators use `fullmatch`: with `match`,
# `$` also matches before a final newline, and "fw\n" would pass.
_NAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,251}[A-Za-z0-9])?")
_PREFIX_RE = re.compile(r"/[A-Za-z0-9._/-]*[A-Za-z0-9._-]")

KeyKind = Literal[
    "master_config",
    "active_config",
    "metadata",
    "status",
    "history",
    "instance",
    "alert",
    "freeze",
    "owner",
    "cadence",
    "candidate",
    "rollout",
]

_COMPONENT_LEAVES: frozenset[str] = frozenset(
    {"master_config", "active_config", "metadata", "status", "candidate"}
)


def check_name(name: str, what: str = "name") -> str:
    """Return `name` if it is a safe single key segment, else raise ValueError saying why."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"{what} {name!r} is not a valid key segment: use 1-253 letters, digits, '.', '_' "
            "or '-', starting and ending with a letter or digit (no '/')"
        )
    return name


@dataclass(frozen=True, slots=True)
class ParsedKey:
    """What a key under the prefix means. `instance` is set for instance keys, `version` for
    history keys."""

    kind: KeyKind
    component: str
    instance: str | None = None
    version: int | None = None


class Layout:
    """Builds and parses the keys of one deployment, all under `prefix`."""

    def __init__(self, prefix: str = "/ml-defender") -> None:
        if not _PREFIX_RE.fullmatch(prefix):
            raise ValueError(
                f"prefix {prefix!r} must start with '/', not end with '/', and use only letters, "
                "digits, '.', '_', '-' and '/'"
            )
        self.prefix = prefix

    def __repr__(self) -> str:
        return f"Layout(prefix={self.prefix!r})"

    # --- directories (end with '/', for prefix listing and watches) ---------------------------

    @property
    def components_dir(self) -> str:
        return f"{self.prefix}/components/"

    def component_dir(self, component: str) -> str:
        return f"{self.components_dir}{check_name(component, 'component')}/"

    def history_dir(self, component: str) -> str:
        return f"{self.component_dir(component)}history/"

    def instances_dir(self, component: str) -> str:
        return f"{self.component_dir(component)}instances/"

    @property
    def alerts_dir(self) -> str:
        return f"{self.prefix}/alerts/"

    def component_alerts_dir(self, component: str) -> str:
        return f"{self.alerts_dir}{check_name(component, 'component')}/"

    @property
    def control_dir(self) -> str:
        return f"{self.prefix}/control/"

    @property
    def keyring_record(self) -> str:
        """Which key ids (and fingerprints) the keyring holds, written by the operator: a later
        start learns from it that keys exist even when no sealed value is left."""
        return f"{self.prefix}/keyring/record"

    # --- keys ------------------------------------------------------------------------------------

    def master_config(self, component: str) -> str:
        return self.component_dir(component) + "master_config"

    def active_config(self, component: str) -> str:
        return self.component_dir(component) + "active_config"

    def metadata(self, component: str) -> str:
        return self.component_dir(component) + "metadata"

    def status(self, component: str) -> str:
        return self.component_dir(component) + "status"

    def history(self, component: str, version: int) -> str:
        if not 0 < version <= HIGHEST_VERSION:
            raise ValueError(f"config version {version} is out of range 1..{HIGHEST_VERSION}")
        # Zero-padded so etcd's byte order (prefix listing) is version order.
        return f"{self.history_dir(component)}{version:0{VERSION_DIGITS}d}"

    def instance(self, component: str, instance: str) -> str:
        return self.instances_dir(component) + check_name(instance, "instance")

    def alert(self, component: str, time_ns: int, suffix: str) -> str:
        if time_ns < 0:
            raise ValueError("alert time must be non-negative nanoseconds since the epoch")
        # 19 digits cover nanoseconds until the year 2286, so keys sort by time.
        return (
            f"{self.component_alerts_dir(component)}{time_ns:019d}-{check_name(suffix, 'suffix')}"
        )

    def freeze(self, component: str) -> str:
        return f"{self.control_dir}{check_name(component, 'component')}/freeze"

    def owner(self, component: str) -> str:
        """Which DefenderComponent (namespace, name, uid) may write this component's keys."""
        return f"{self.control_dir}{check_name(component, 'component')}/owner"

    def cadence(self, component: str) -> str:
        """The heartbeat cadence the operator publishes from `spec.heartbeat`."""
        return f"{self.control_dir}{check_name(component, 'component')}/heartbeat"

    def candidate(self, component: str) -> str:
        """The config a canary rollout tries, sealed like ACTIVE (`_rollout`)."""
        return self.component_dir(component) + "candidate"

    def rollout(self, component: str) -> str:
        """The signed record naming the canary instances and the candidate they run."""
        return f"{self.control_dir}{check_name(component, 'component')}/rollout"

    # --- parsing ---------------------------------------------------------------------------------

    def parse(self, key: str | bytes) -> ParsedKey | None:
        """Classify a key found under the prefix; None for keys this layout does not define."""
        text = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
        root = self.prefix + "/"
        if not text.startswith(root):
            return None
        parts = text[len(root) :].split("/")
        if not all(_NAME_RE.fullmatch(p) for p in parts):
            return None
        match parts:
            case ["components", comp, leaf] if leaf in _COMPONENT_LEAVES:
                return ParsedKey(kind=leaf, component=comp)  # type: ignore[arg-type]
            case ["components", comp, "history", ver] if (
                ver.isdigit() and len(ver) == VERSION_DIGITS and int(ver) > 0
            ):
                return ParsedKey(kind="history", component=comp, version=int(ver))
            case ["components", comp, "instances", inst]:
                return ParsedKey(kind="instance", component=comp, instance=inst)
            case ["alerts", comp, _]:
                return ParsedKey(kind="alert", component=comp)
            case ["control", comp, "freeze"]:
                return ParsedKey(kind="freeze", component=comp)
            case ["control", comp, "owner"]:
                return ParsedKey(kind="owner", component=comp)
            case ["control", comp, "heartbeat"]:
                return ParsedKey(kind="cadence", component=comp)
            case ["control", comp, "rollout"]:
                return ParsedKey(kind="rollout", component=comp)
        return None
