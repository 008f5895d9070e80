"""Rejoin an etcd member whose data directory is empty (its volume was lost) as a new member:
the old member is removed, the new one added as a learner, started with
`initial-cluster-state: existing`, and promoted to a voter once it has caught up. Quorum is
kept throughout: the old member is removed only while every other voter is healthy, and a
learner never counts towards quorum.

One module for the chart's etcd pods and the harness test (`python -m
defender_config.etcd_member prepare|promote`). The etcd image has no shell, so etcd is started
with `--config-file`: `prepare` always writes that file, from the same `ETCD_*` variables etcd
would read, with the initial-cluster settings a rejoin needs.

The member API is etcd's JSON gateway (`/v3/cluster/member/*`): the gRPC stubs the library
ships predate learners (no `isLearner`, no `MemberPromote`).
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ._errors import DefenderConfigError

__all__ = [
    "EtcdMembers",
    "Member",
    "MemberError",
    "StartPlan",
    "etcd_config",
    "plan_start",
    "prepare",
    "promote_when_synced",
]

log = logging.getLogger("defender_config.etcd_member")


class MemberError(DefenderConfigError):
    """A member change is refused (it would risk quorum) or the cluster cannot be asked."""

    reason = "MemberChangeRefused"


@dataclass(frozen=True)
class Member:
    id: int
    name: str
    """Empty while the member was added but never started."""
    peer_urls: tuple[str, ...]
    client_urls: tuple[str, ...] = ()
    learner: bool = False


@dataclass(frozen=True)
class StartPlan:
    """What a member starting on `data_present` data does. keep: its own data says everything;
    bootstrap: a new cluster (or one still forming) — start as configured; rejoin: remove
    `remove` (if any), add as a learner, start with state existing; resume: already added as a
    learner that never started — start with state existing."""

    action: Literal["keep", "bootstrap", "rejoin", "resume"]
    remove: int | None = None
    why: str = ""


def _quorum(n: int) -> int:
    return n // 2 + 1


def plan_start(
    *,
    data_present: bool,
    peer_url: str,
    members: Sequence[Member] | None,
    healthy: frozenset[int],
) -> StartPlan:
    """Pure decision. `members`: the cluster's member list (None: no member answered);
    `healthy`: ids of members that answered a linearizable read."""
    if data_present:
        return StartPlan("keep", why="the data directory holds a member")
    if members is None:
        return StartPlan("bootstrap", why="no other member answers: a new cluster")
    mine = next((m for m in members if peer_url in m.peer_urls), None)
    others = [m for m in members if m is not mine]
    unstarted = [m for m in others if not m.name]
    if unstarted:
        raise MemberError(
            f"member(s) {', '.join(format(m.id, 'x') for m in unstarted)} were added but never "
            "started; start them (or remove them) before this member rejoins"
        )
    if mine is not None and not mine.name:
        if mine.learner:
            return StartPlan("resume", why="added as a learner before, never started")
        return StartPlan("bootstrap", why="listed in a cluster still forming, never started")
    voters = [m for m in others if not m.learner]
    live = [m for m in voters if m.id in healthy]
    if len(live) < _quorum(len(voters)) or (mine is not None and len(live) < len(voters)):
        # Removing the old member leaves `voters` voting: every one of them must answer, or
        # the removal (or the next failure) costs quorum.
        raise MemberError(
            f"not rejoining: {len(live)} of the {len(voters)} other voting members are healthy;"
            " waiting until all of them are"
        )
    if mine is None:
        return StartPlan("rejoin", why="the old member is gone from the list: add a learner")
    return StartPlan(
        "rejoin",
        remove=mine.id,
        why=f"data directory empty, member {mine.id:x} ({mine.name}) still listed: replace it",
    )


# --- the member API (etcd's JSON gateway) ----------------------------------------------------


def _member(raw: Mapping[str, Any]) -> Member:
    return Member(
        id=int(raw.get("ID", 0)),
        name=str(raw.get("name", "")),
        peer_urls=tuple(raw.get("peerURLs", ())),
        client_urls=tuple(raw.get("clientURLs", ())),
        learner=bool(raw.get("isLearner", False)),
    )


class EtcdMembers:
    """The members API of a cluster, through `endpoints` (the other members' client URLs)."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        user: str | None = None,
        password: str | None = None,
        timeout: float = 5.0,
    ) -> None:
        if not endpoints:
            raise MemberError("no endpoint of another member given")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.timeout = timeout
        self._ssl: ssl.SSLContext | None = None
        if any(e.startswith("https://") for e in self.endpoints):
            self._ssl = ssl.create_default_context(cafile=ca_file)
            if cert_file and key_file:
                self._ssl.load_cert_chain(cert_file, key_file)
        self._user, self._password = user, password
        self._tokens: dict[str, str] = {}

    def _post(self, endpoint: str, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self._user and path != "/v3/auth/authenticate":
            if endpoint not in self._tokens:
                got = self._post(
                    endpoint,
                    "/v3/auth/authenticate",
                    {"name": self._user, "password": self._password or ""},
                )
                self._tokens[endpoint] = str(got["token"])
            headers["Authorization"] = self._tokens[endpoint]
        request = urllib.request.Request(
            endpoint + path, json.dumps(body).encode(), headers, method="POST"
        )
        with urllib.request.urlopen(request, timeout=self.timeout, context=self._ssl) as resp:
            answer: dict[str, Any] = json.loads(resp.read() or b"{}")
        return answer

    def call(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """POST to the first endpoint that answers; MemberError with every endpoint's error."""
        errors: list[str] = []
        for endpoint in self.endpoints:
            try:
                return self._post(endpoint, path, body)
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode("utf-8", "replace")[:300]
                errors.append(f"{endpoint}: HTTP {exc.code} {detail}")
            except (OSError, ValueError, KeyError) as exc:
                errors.append(f"{endpoint}: {exc}")
        raise MemberError(f"{path} failed on every endpoint: {'; '.join(errors)}")

    def members(self) -> list[Member]:
        got = self.call("/v3/cluster/member/list", {"linearizable": True})
        return [_member(m) for m in got.get("members", ())]

    def healthy(self) -> frozenset[int]:
        """Ids of the members whose own endpoint answers a linearizable read."""
        ids: set[int] = set()
        probe = {"key": base64.b64encode(b"health").decode(), "count_only": True}
        for endpoint in self.endpoints:
            try:
                got = self._post(endpoint, "/v3/kv/range", probe)
                ids.add(int(got["header"]["member_id"]))
            except (OSError, ValueError, KeyError):
                continue
        return frozenset(ids)

    def reachable(self) -> bool:
        """Whether any endpoint answers at all (`/version` needs no quorum and no login)."""
        for endpoint in self.endpoints:
            try:
                with urllib.request.urlopen(
                    endpoint + "/version", timeout=self.timeout, context=self._ssl
                ):
                    return True
            except (OSError, ValueError):
                continue
        return False

    def remove(self, member_id: int) -> None:
        self.call("/v3/cluster/member/remove", {"ID": str(member_id)})

    def add_learner(
        self, peer_url: str, *, timeout: float = 60.0, every: float = 1.0
    ) -> tuple[Member, list[Member]]:
        """Add `peer_url` as a learner. Right after a member is removed etcd refuses changes
        with "unhealthy cluster" until the remaining members have been connected for a while
        (its strict reconfiguration check): that refusal is waited out, up to `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                got = self.call(
                    "/v3/cluster/member/add", {"peerURLs": [peer_url], "isLearner": True}
                )
                return _member(got["member"]), [_member(m) for m in got.get("members", ())]
            except MemberError as exc:
                if "unhealthy cluster" not in str(exc) or time.monotonic() >= deadline:
                    raise
                log.info("member add refused for now (%s); asking again", exc)
            time.sleep(every)

    def promote(self, member_id: int) -> None:
        self.call("/v3/cluster/member/promote", {"ID": str(member_id)})


# --- etcd's config file ----------------------------------------------------------------------

_INTS = frozenset(
    {
        "quota-backend-bytes",
        "heartbeat-interval",
        "election-timeout",
        "snapshot-count",
        "max-request-bytes",
        "max-snapshots",
        "max-wals",
        "max-txn-ops",
    }
)
_BOOLS = frozenset({"strict-reconfig-check", "enable-pprof", "force-new-cluster"})
_TLS = {
    "CERT_FILE": ("client-transport-security", "cert-file"),
    "KEY_FILE": ("client-transport-security", "key-file"),
    "TRUSTED_CA_FILE": ("client-transport-security", "trusted-ca-file"),
    "CLIENT_CERT_AUTH": ("client-transport-security", "client-cert-auth"),
    "PEER_CERT_FILE": ("peer-transport-security", "cert-file"),
    "PEER_KEY_FILE": ("peer-transport-security", "key-file"),
    "PEER_TRUSTED_CA_FILE": ("peer-transport-security", "trusted-ca-file"),
    "PEER_CLIENT_CERT_AUTH": ("peer-transport-security", "client-cert-auth"),
}
# Read by `prepare` itself, not etcd settings.
_OURS = frozenset({"CONFIG_FILE"})


def etcd_config(
    env: Mapping[str, str], overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """etcd's YAML config (as a dict) from its `ETCD_<FLAG>` variables: the file says what the
    variables would have, so a pod starts the same with or without it."""
    config: dict[str, Any] = {}
    for name, raw in sorted(env.items()):
        if not name.startswith("ETCD_") or name[5:] in _OURS:
            continue
        flag = name[5:]
        if flag in _TLS:
            section, key = _TLS[flag]
            value: Any = raw.lower() == "true" if key == "client-cert-auth" else raw
            config.setdefault(section, {})[key] = value
            continue
        key = flag.lower().replace("_", "-")
        if key in _INTS:
            try:
                config[key] = int(raw)
            except ValueError as exc:
                raise MemberError(f"{name}={raw!r} is not a whole number") from exc
        elif key in _BOOLS:
            config[key] = raw.lower() == "true"
        else:
            config[key] = raw
    config.update(overrides or {})
    return config


def _data_present(data_dir: Path) -> bool:
    return (data_dir / "member").is_dir() and any((data_dir / "member").iterdir())


def prepare(env: Mapping[str, str], cluster: EtcdMembers | None, config_out: Path) -> StartPlan:
    """Decide how this member starts and write etcd's config file accordingly. `cluster` None:
    no other member is configured (a single-member cluster)."""
    try:
        name, data_dir = env["ETCD_NAME"], Path(env["ETCD_DATA_DIR"])
        peer_url = env["ETCD_INITIAL_ADVERTISE_PEER_URLS"].split(",")[0]
    except KeyError as exc:
        raise MemberError(f"{exc.args[0]} is not set") from exc
    present = _data_present(data_dir)
    members: list[Member] | None = None
    healthy: frozenset[int] = frozenset()
    if not present and cluster is not None:
        try:
            members = cluster.members()
            healthy = cluster.healthy()
        except MemberError as exc:
            if cluster.reachable():
                # A cluster is there but cannot say who its members are (no quorum): starting
                # "new" beside it would be refused anyway; wait for it instead.
                raise MemberError(f"the other members answer without quorum: {exc}") from exc
            log.info("no other member answers (%s): starting as configured", exc)
            members = None
    plan = plan_start(data_present=present, peer_url=peer_url, members=members, healthy=healthy)
    overrides: dict[str, Any] = {}
    if plan.action in ("rejoin", "resume"):
        assert cluster is not None and members is not None
        if plan.action == "rejoin":
            if plan.remove is not None:
                cluster.remove(plan.remove)
                log.warning("removed member %x (data directory lost)", plan.remove)
            added, members = cluster.add_learner(peer_url)
            log.warning("added %s as learner %x", name, added.id)
        listed = [f"{m.name or name}={m.peer_urls[0]}" for m in members if m.peer_urls]
        overrides = {"initial-cluster": ",".join(listed), "initial-cluster-state": "existing"}
    config_out.parent.mkdir(parents=True, exist_ok=True)
    # JSON is YAML: etcd reads the file with a YAML parser.
    config_out.write_text(json.dumps(etcd_config(env, overrides), indent=2, sort_keys=True))
    log.info("member %s: %s (%s)", name, plan.action, plan.why)
    return plan


def promote_when_synced(
    cluster: EtcdMembers, peer_url: str, *, timeout: float, every: float = 1.0
) -> bool:
    """Promote this member (by its peer URL) once the leader says it caught up; True once it is
    a voter, False after `timeout`. etcd refuses a promotion of a learner not in sync, so
    asking again is safe."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            mine = next((m for m in cluster.members() if peer_url in m.peer_urls), None)
            if mine is not None and not mine.learner:
                return True
            if mine is not None:
                cluster.promote(mine.id)
                log.warning("promoted learner %x to voter", mine.id)
                return True
        except MemberError as exc:
            log.info("not promoted yet: %s", exc)
        if time.monotonic() >= deadline:
            return False
        time.sleep(every)


def _cluster(args: argparse.Namespace, env: Mapping[str, str]) -> EtcdMembers | None:
    own = set(env.get("ETCD_ADVERTISE_CLIENT_URLS", "").split(","))
    endpoints = [e for e in args.endpoints.split(",") if e and e not in own]
    if not endpoints:
        return None
    password = Path(args.password_file).read_text().strip() if args.password_file else None
    return EtcdMembers(
        endpoints,
        ca_file=args.ca_file,
        cert_file=args.cert_file,
        key_file=args.key_file,
        user=args.user,
        password=password,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m defender_config.etcd_member")
    parser.add_argument("command", choices=("prepare", "promote"))
    parser.add_argument("--endpoints", required=True, help="every member's client URL")
    parser.add_argument("--config-out", default="/etc/etcd/run/etcd.yaml")
    parser.add_argument("--ca-file")
    parser.add_argument("--cert-file")
    parser.add_argument("--key-file")
    parser.add_argument("--user")
    parser.add_argument("--password-file")
    parser.add_argument("--timeout", type=float, default=0, help="promote: 0 waits forever")
    parser.add_argument(
        "--forever",
        action="store_true",
        help="promote: keep checking every --recheck seconds after the promotion (a sidecar)",
    )
    parser.add_argument("--recheck", type=float, default=30.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    env = dict(os.environ)
    try:
        cluster = _cluster(args, env)
        if args.command == "prepare":
            prepare(env, cluster, Path(args.config_out))
            return 0
        if cluster is None:
            return 0
        peer_url = env["ETCD_INITIAL_ADVERTISE_PEER_URLS"].split(",")[0]
        timeout = args.timeout if args.timeout > 0 else float("inf")
        while True:
            done = promote_when_synced(cluster, peer_url, timeout=timeout)
            if not args.forever:
                return 0 if done else 1
            # A later replacement of this member (its volume lost again) is a learner again.
            time.sleep(args.recheck)
    except (MemberError, KeyError, OSError) as exc:
        log.error("etcd member %s failed: %s", args.command, exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
