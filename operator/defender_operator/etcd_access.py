"""etcd users, roles and authentication for a deployment: `python -m defender_operator.etcd_access`.

The chart runs this as the operator pod's init container (every start, so it must be
idempotent): it creates the root user, one user and role for the operator (read-write on the
whole prefix) and one per component's agents, grants exactly the permissions below (revoking
any others, so a narrowed role takes effect on upgrade) and turns authentication on.

What an agent may touch follows what the library and the agent really do (defender_config's
Layout, Heartbeater, EtcdAlertSink, ConfigStore.watch_active):

=========================================  =====  ==========================================
key range                                   right  why
=========================================  =====  ==========================================
``components/<c>/`` (prefix)               read   ACTIVE, metadata, history, MASTER: what it
                                                  runs and the records that check it
``control/<c>/`` (prefix)                  read   the freeze and other control records
``components/<c>/instances/`` (prefix)     write  its lease-bound heartbeats
``components/<c>/status``                  write  STARTING/RUNNING/STOPPED of the component
``alerts/<c>/`` (prefix)                   write  its alert records
=========================================  =====  ==========================================

No write on ACTIVE, MASTER, metadata, history or control records, nothing of another component.
Passwords come from files (the chart mounts its Secret), never from the command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from defender_config import EtcdSettings, Layout, load_settings
from defender_config.store import (
    AuthPermission,
    AuthRight,
    AuthRootRefusedError,
    EtcdAuthError,
    EtcdAuthSession,
)

__all__ = [
    "AccessPlan",
    "AgentAccess",
    "EtcdAccessError",
    "Grant",
    "apply_plan",
    "main",
    "role_grants",
]

log = logging.getLogger("defender_operator.etcd_access")

Right = AuthRight
ROOT = "root"

T = TypeVar("T")


class EtcdAccessError(Exception):
    """The plan cannot be applied (bad plan, unreadable password, etcd refused)."""


class AgentAccess(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    component: str
    user: str
    password_file: str


class AccessPlan(BaseModel):
    """What the chart renders into the config ConfigMap (`etcd-access.json`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prefix: str = "/ml-defender"
    root_password_file: str
    operator_user: str
    operator_password_file: str
    agents: list[AgentAccess] = Field(default_factory=list)
    health_user: str | None = None
    """A user without any right, for `helm test`: etcd answers its reads "permission denied",
    which proves the member serves requests (what `etcdctl endpoint health` checks)."""
    health_password_file: str | None = None


@dataclass(frozen=True, order=True)
class Grant:
    """One etcd permission: `key` alone, or every key starting with it when `prefix`."""

    key: str
    prefix: bool
    right: Right

    @property
    def range_end(self) -> bytes:
        if not self.prefix:
            return b""
        raw = self.key.encode()
        # etcd's prefix range end: the prefix with its last byte incremented.
        return raw[:-1] + bytes([raw[-1] + 1])


def role_grants(layout: Layout, component: str | None) -> frozenset[Grant]:
    """The permissions of the operator's role (component None) or of one component's agents."""
    if component is None:
        return frozenset({Grant(layout.prefix + "/", True, "readwrite")})
    instances = layout.instances_dir(component)
    return frozenset(
        {
            Grant(layout.component_dir(component), True, "read"),
            Grant(f"{layout.control_dir}{component}/", True, "read"),
            Grant(instances, True, "readwrite"),
            Grant(layout.status(component), False, "readwrite"),
            Grant(layout.component_alerts_dir(component), True, "readwrite"),
        }
    )


@dataclass(frozen=True)
class _Role:
    """An etcd user and its role of the same name; `grants` None: a user without any role."""

    user: str
    password: str = field(repr=False)
    grants: frozenset[Grant] | None


def _read_password(path: str) -> str:
    try:
        value = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise EtcdAccessError(f"cannot read the password file {path!r}: {exc.strerror}") from exc
    if len(value) < 12:
        raise EtcdAccessError(f"the password in {path!r} is shorter than 12 characters")
    return value


def _roles(plan: AccessPlan) -> list[_Role]:
    layout = Layout(plan.prefix)
    roles = [
        _Role(
            plan.operator_user,
            _read_password(plan.operator_password_file),
            role_grants(layout, None),
        )
    ]
    seen = {plan.operator_user, ROOT}
    if plan.health_user is not None:
        if plan.health_password_file is None:
            raise EtcdAccessError("health_user needs health_password_file")
        roles.append(_Role(plan.health_user, _read_password(plan.health_password_file), None))
        seen.add(plan.health_user)
    for agent in plan.agents:
        if agent.user in seen:
            raise EtcdAccessError(f"etcd user {agent.user!r} appears twice in the plan")
        seen.add(agent.user)
        roles.append(
            _Role(
                agent.user,
                _read_password(agent.password_file),
                role_grants(layout, agent.component),
            )
        )
    return roles


def _ensure_user(auth: EtcdAuthSession, name: str, password: str) -> None:
    if auth.add_user(name, password):
        log.info("etcd user %s created", name)
    # A password changed in the Secret takes effect; an unchanged one is left alone, since
    # every change of users or roles makes etcd bump its auth revision.
    elif not auth.accepts(name, password):
        auth.change_password(name, password)
        log.info("etcd user %s: password set from the Secret", name)


def _ensure_role(auth: EtcdAuthSession, name: str, grants: Iterable[Grant] | None) -> None:
    """Create the role; with `grants`, make its permissions exactly those."""
    auth.add_role(name)
    if grants is None:
        return
    wanted = {AuthPermission(g.key.encode(), g.range_end, g.right) for g in grants}
    current = auth.role_permissions(name)
    for perm in sorted(current - wanted):
        auth.revoke_permission(name, perm.key, perm.range_end)
    for perm in sorted(wanted - current):
        auth.grant_permission(name, perm)
        log.info("etcd role %s: %s on %r", name, perm.right, perm.key.decode())


def _ensure_user_roles(auth: EtcdAuthSession, user: str, roles: Sequence[str]) -> None:
    have = auth.user_roles(user)
    for role in sorted(have - set(roles)):
        auth.revoke_role(user, role)
    for role in roles:
        if role not in have:
            auth.grant_role(user, role)


def apply_plan(plan: AccessPlan, settings: EtcdSettings) -> None:
    """Create or correct every user and role of `plan`, then enable authentication. Safe to run
    any number of times, also concurrently (operator replicas)."""
    root_password = _read_password(plan.root_password_file)
    roles = _roles(plan)
    try:
        with EtcdAuthSession(settings, ROOT, root_password) as auth:
            _ensure_user(auth, ROOT, root_password)
            # etcd's built-in root role: only created, never reconciled (etcd reports a
            # synthetic "everything" permission for it that cannot be revoked).
            _ensure_role(auth, ROOT, None)
            _ensure_user_roles(auth, ROOT, [ROOT])
            for role in roles:
                if role.grants is not None:
                    _ensure_role(auth, role.user, role.grants)
                _ensure_user(auth, role.user, role.password)
                _ensure_user_roles(auth, role.user, [] if role.grants is None else [role.user])
            if not auth.enabled:
                auth.enable()
                log.info("etcd authentication enabled")
    except AuthRootRefusedError as exc:
        raise EtcdAccessError(
            "etcd authentication is on and refused the root password of the auth "
            "Secret (authentication failed): was the Secret replaced?"
        ) from exc
    except EtcdAuthError as exc:
        raise EtcdAccessError(str(exc)) from exc


def _retrying(fn: Callable[[], T], until: float) -> T:
    delay = 0.5
    while True:
        try:
            return fn()
        except EtcdAccessError as exc:
            # Members still starting or electing: retry; a wrong root password does not heal.
            if time.monotonic() + delay > until or "authentication failed" in str(exc):
                raise
            log.warning("etcd access not applied yet, retrying in %.1fs: %s", delay, exc)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m defender_operator.etcd_access")
    parser.add_argument("--plan", required=True, help="JSON access plan (the chart renders it)")
    parser.add_argument("--settings", help="library settings file (etcd endpoints and TLS)")
    parser.add_argument(
        "--wait-seconds", type=float, default=120.0, help="retry while etcd is not up yet"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        plan = AccessPlan.model_validate(json.loads(Path(args.plan).read_text(encoding="utf-8")))
        settings = load_settings(args.settings).etcd
        _retrying(lambda: apply_plan(plan, settings), time.monotonic() + args.wait_seconds)
    except (OSError, ValueError, ValidationError, EtcdAccessError) as exc:
        print(f"etcd_access: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        print(f"etcd_access: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
