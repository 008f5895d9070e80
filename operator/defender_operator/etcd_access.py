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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import grpc
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pyetcd import etcdrpc

from defender_config import EtcdSettings, Layout, load_settings
from defender_config.store import parse_endpoint

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

Right = Literal["read", "write", "readwrite"]
_PERM_TYPE: dict[Right, int] = {"read": 0, "write": 1, "readwrite": 2}
_RIGHT_OF = {v: k for k, v in _PERM_TYPE.items()}
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
    password: str
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


class _Auth:
    """The Auth service of one reachable member, logged in as root once auth is on."""

    def __init__(self, settings: EtcdSettings, root_password: str) -> None:
        self._settings = settings
        self._root_password = root_password
        self._metadata: tuple[tuple[str, str], ...] = ()
        self._channel: grpc.Channel | None = None
        self._stub: Any = None

    def connect(self) -> bool:
        """Reach one member and log in as root; False when authentication is not on yet (this
        etcd version's Auth service has no status call: a login attempt tells)."""
        errors = []
        for endpoint in self._settings.endpoints:
            host, port, secure = parse_endpoint(endpoint)
            target = f"{host}:{port}"
            if secure or self._settings.ca_file is not None:
                channel = grpc.secure_channel(target, self._credentials())
            else:
                channel = grpc.insecure_channel(target)
            stub = etcdrpc.AuthStub(channel)
            request = etcdrpc.AuthenticateRequest(name=ROOT, password=self._root_password)
            try:
                answer = stub.Authenticate(request, timeout=self._timeout)
            except grpc.RpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.FAILED_PRECONDITION:
                    self._channel, self._stub = channel, stub
                    return False
                channel.close()
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    raise EtcdAccessError(
                        "etcd authentication is on and refused the root password of the auth "
                        "Secret (authentication failed): was the Secret replaced?"
                    ) from exc
                errors.append(f"{endpoint}: {code.name}")
                continue
            self._channel, self._stub = channel, stub
            self._metadata = (("token", answer.token),)
            return True
        raise EtcdAccessError("no etcd member answered: " + "; ".join(errors))

    @property
    def _timeout(self) -> float:
        return float(self._settings.timeout_seconds)

    def _credentials(self) -> grpc.ChannelCredentials:
        s = self._settings

        def read(path: Path | None) -> bytes | None:
            return Path(path).read_bytes() if path is not None else None

        return grpc.ssl_channel_credentials(read(s.ca_file), read(s.key_file), read(s.cert_file))

    def call(self, method: str, request: Any) -> Any:
        return getattr(self._stub, method)(request, timeout=self._timeout, metadata=self._metadata)

    def accepts(self, name: str, password: str) -> bool:
        """True if etcd (with authentication on) logs `name` in with `password`."""
        try:
            self._stub.Authenticate(
                etcdrpc.AuthenticateRequest(name=name, password=password), timeout=self._timeout
            )
        except grpc.RpcError:
            return False
        return True

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()


def _exists(exc: grpc.RpcError) -> bool:
    return "already exists" in (exc.details() or "")


def _ensure_user(auth: _Auth, name: str, password: str) -> None:
    try:
        auth.call("UserAdd", etcdrpc.AuthUserAddRequest(name=name, password=password))
        log.info("etcd user %s created", name)
    except grpc.RpcError as exc:
        if not _exists(exc):
            raise
        # A password changed in the Secret takes effect; an unchanged one is left alone, since
        # every change of users or roles makes etcd bump its auth revision.
        if not auth.accepts(name, password):
            auth.call(
                "UserChangePassword",
                etcdrpc.AuthUserChangePasswordRequest(name=name, password=password),
            )
            log.info("etcd user %s: password set from the Secret", name)


def _ensure_role(auth: _Auth, name: str, grants: Iterable[Grant] | None) -> None:
    """Create the role; with `grants`, make its permissions exactly those."""
    try:
        auth.call("RoleAdd", etcdrpc.AuthRoleAddRequest(name=name))
    except grpc.RpcError as exc:
        if not _exists(exc):
            raise
    if grants is None:
        return
    wanted = {(g.key.encode(), g.range_end): _PERM_TYPE[g.right] for g in grants}
    current = {
        (bytes(p.key), bytes(p.range_end)): int(p.permType)
        for p in auth.call("RoleGet", etcdrpc.AuthRoleGetRequest(role=name)).perm
    }
    for (key, end), perm in current.items():
        if wanted.get((key, end)) != perm:
            auth.call(
                "RoleRevokePermission",
                etcdrpc.AuthRoleRevokePermissionRequest(role=name, key=key, range_end=end),
            )
    for (key, end), perm in wanted.items():
        if current.get((key, end)) != perm:
            auth.call(
                "RoleGrantPermission",
                etcdrpc.AuthRoleGrantPermissionRequest(
                    name=name, perm=etcdrpc.Permission(permType=perm, key=key, range_end=end)
                ),
            )
            log.info("etcd role %s: %s on %r", name, _RIGHT_OF[perm], key.decode())


def _ensure_user_roles(auth: _Auth, user: str, roles: Sequence[str]) -> None:
    have = set(auth.call("UserGet", etcdrpc.AuthUserGetRequest(name=user)).roles)
    for role in sorted(have - set(roles)):
        auth.call("UserRevokeRole", etcdrpc.AuthUserRevokeRoleRequest(name=user, role=role))
    for role in roles:
        if role not in have:
            auth.call("UserGrantRole", etcdrpc.AuthUserGrantRoleRequest(user=user, role=role))


def apply_plan(plan: AccessPlan, settings: EtcdSettings) -> None:
    """Create or correct every user and role of `plan`, then enable authentication. Safe to run
    any number of times, also concurrently (operator replicas)."""
    root_password = _read_password(plan.root_password_file)
    roles = _roles(plan)
    auth = _Auth(settings, root_password)
    enabled = auth.connect()
    try:
        _ensure_user(auth, ROOT, root_password)
        # etcd's built-in root role: only created, never reconciled (etcd reports a synthetic
        # "everything" permission for it that cannot be revoked).
        _ensure_role(auth, ROOT, None)
        _ensure_user_roles(auth, ROOT, [ROOT])
        for role in roles:
            if role.grants is not None:
                _ensure_role(auth, role.user, role.grants)
            _ensure_user(auth, role.user, role.password)
            _ensure_user_roles(auth, role.user, [] if role.grants is None else [role.user])
        if not enabled:
            auth.call("AuthEnable", etcdrpc.AuthEnableRequest())
            log.info("etcd authentication enabled")
    except grpc.RpcError as exc:
        raise EtcdAccessError(f"etcd refused: {exc.code().name}: {exc.details()}") from exc
    finally:
        auth.close()


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
