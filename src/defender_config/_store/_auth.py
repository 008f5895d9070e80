"""etcd's Auth service: users, roles, permissions and switching authentication on.

Only deployment tooling needs it (the chart's init step, `defender_operator.etcd_access`); the
store proper logs in with a user but never administers them. It lives here because this layer
alone speaks gRPC to etcd: callers get plain values and `EtcdAuthError`, never a gRPC type.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import grpc
from pyetcd import etcdrpc

from .._settings import EtcdSettings
from ._pyetcd import parse_endpoint

AuthRight = Literal["read", "write", "readwrite"]
_PERM_TYPE: dict[AuthRight, int] = {"read": 0, "write": 1, "readwrite": 2}
_RIGHT_OF: dict[int, AuthRight] = {v: k for k, v in _PERM_TYPE.items()}


class EtcdAuthError(Exception):
    """etcd's Auth service refused a call or no member answered. `code` is the gRPC status name
    (e.g. ``PERMISSION_DENIED``), None when no member could be reached."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class AuthRootRefusedError(EtcdAuthError):
    """Authentication is on and etcd refused the root password given."""


@dataclass(frozen=True, slots=True, order=True)
class AuthPermission:
    """One permission of a role: `key` alone (empty `range_end`) or the range [key, range_end)."""

    key: bytes
    range_end: bytes
    right: AuthRight


class EtcdAuthSession:
    """The Auth service of the first member that answers, logged in as root when authentication
    is already on (`enabled`). Use it as a context manager."""

    def __init__(self, settings: EtcdSettings, root_user: str, root_password: str) -> None:
        self._settings = settings
        self._metadata: tuple[tuple[str, str], ...] = ()
        self._channel: grpc.Channel | None = None
        self._stub: Any = None
        self.enabled = self._connect(root_user, root_password)

    def __enter__(self) -> EtcdAuthSession:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    @property
    def _timeout(self) -> float:
        return float(self._settings.timeout_seconds)

    def _credentials(self) -> grpc.ChannelCredentials:
        s = self._settings

        def read(path: Path | None) -> bytes | None:
            return Path(path).read_bytes() if path is not None else None

        return grpc.ssl_channel_credentials(read(s.ca_file), read(s.key_file), read(s.cert_file))

    def _connect(self, root_user: str, root_password: str) -> bool:
        # This etcd version's Auth service has no status call: a root login attempt tells whether
        # authentication is on (FAILED_PRECONDITION: it is off).
        errors = []
        for endpoint in self._settings.endpoints:
            host, port, secure = parse_endpoint(endpoint)
            target = f"{host}:{port}"
            if secure or self._settings.ca_file is not None:
                channel = grpc.secure_channel(target, self._credentials())
            else:
                channel = grpc.insecure_channel(target)
            stub = etcdrpc.AuthStub(channel)
            request = etcdrpc.AuthenticateRequest(name=root_user, password=root_password)
            try:
                answer = stub.Authenticate(request, timeout=self._timeout)
            except grpc.RpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.FAILED_PRECONDITION:
                    self._channel, self._stub = channel, stub
                    return False
                channel.close()
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    raise AuthRootRefusedError(
                        f"etcd authentication is on and refused the password of {root_user!r} "
                        "(authentication failed)",
                        code=code.name,
                    ) from None
                errors.append(f"{endpoint}: {code.name}")
                continue
            self._channel, self._stub = channel, stub
            self._metadata = (("token", answer.token),)
            return True
        raise EtcdAuthError("no etcd member answered: " + "; ".join(errors))

    def _call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self._stub, method)(
                request, timeout=self._timeout, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            # The request may carry a password: only the status goes into the error.
            raise EtcdAuthError(
                f"etcd refused {method}: {exc.code().name}: {exc.details()}", code=exc.code().name
            ) from None

    def _add(self, method: str, request: Any) -> bool:
        try:
            self._call(method, request)
        except EtcdAuthError as exc:
            if "already exists" in str(exc):
                return False
            raise
        return True

    def accepts(self, name: str, password: str) -> bool:
        """True if etcd (with authentication on) logs `name` in with `password`."""
        try:
            self._stub.Authenticate(
                etcdrpc.AuthenticateRequest(name=name, password=password), timeout=self._timeout
            )
        except grpc.RpcError:
            return False
        return True

    def add_user(self, name: str, password: str) -> bool:
        """Create the user; False when it already exists (its password is then left as it is)."""
        return self._add("UserAdd", etcdrpc.AuthUserAddRequest(name=name, password=password))

    def change_password(self, name: str, password: str) -> None:
        self._call(
            "UserChangePassword",
            etcdrpc.AuthUserChangePasswordRequest(name=name, password=password),
        )

    def add_role(self, name: str) -> bool:
        """Create the role; False when it already exists."""
        return self._add("RoleAdd", etcdrpc.AuthRoleAddRequest(name=name))

    def role_permissions(self, role: str) -> frozenset[AuthPermission]:
        answer = self._call("RoleGet", etcdrpc.AuthRoleGetRequest(role=role))
        return frozenset(
            AuthPermission(bytes(p.key), bytes(p.range_end), _RIGHT_OF[int(p.permType)])
            for p in answer.perm
        )

    def grant_permission(self, role: str, permission: AuthPermission) -> None:
        perm = etcdrpc.Permission(
            permType=_PERM_TYPE[permission.right],
            key=permission.key,
            range_end=permission.range_end,
        )
        self._call(
            "RoleGrantPermission", etcdrpc.AuthRoleGrantPermissionRequest(name=role, perm=perm)
        )

    def revoke_permission(self, role: str, key: bytes, range_end: bytes) -> None:
        self._call(
            "RoleRevokePermission",
            etcdrpc.AuthRoleRevokePermissionRequest(role=role, key=key, range_end=range_end),
        )

    def user_roles(self, name: str) -> frozenset[str]:
        return frozenset(self._call("UserGet", etcdrpc.AuthUserGetRequest(name=name)).roles)

    def grant_role(self, user: str, role: str) -> None:
        self._call("UserGrantRole", etcdrpc.AuthUserGrantRoleRequest(user=user, role=role))

    def revoke_role(self, user: str, role: str) -> None:
        self._call("UserRevokeRole", etcdrpc.AuthUserRevokeRoleRequest(name=user, role=role))

    def enable(self) -> None:
        self._call("AuthEnable", etcdrpc.AuthEnableRequest())
