"""etcd partition: one member of three cut off from the other two (both ways) while a writer and
a committer run through the library.

The cut is made by the harness' peer proxy (EtcdCluster(peer_proxy=True)): no privileges, all
on 127.0.0.1, raft traffic to and from the member dropped, its client port still open. So a
client reaching the cut member sees what it would in a real partition: a member without quorum.

* the LEADER cut: the other two elect a new leader (raft term moves on), writes go on through
  failover, the cut member refuses linearizable reads and writes with StoreUnavailableError
  within the store's timeout, and after healing it holds every acknowledged write;
* a FOLLOWER cut: the leader stays, writes go on, the follower refuses and then catches up.
Every acknowledged write is read back from every member; no config version is acknowledged twice.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from reliability_support import (
    FIREWALL,
    HYGIENE,
    LedgerWriter,
    assert_all_acknowledged_writes_present,
    etcd_settings,
    make_client,
    new_keyring,
)

from defender_config import (
    Alert,
    ConfigStore,
    DefenderClient,
    DefenderConfigError,
    Keyring,
    StoreUnavailableError,
    config_digest,
    validate_config,
)
from defender_config.store import EtcdStore
from defender_devcluster import (
    EtcdCluster,
    LeaderTransferError,
    ToolNotFoundError,
    etcd_member_healthy,
    etcd_status,
    wait_for,
)
from defender_devcluster.pytest_plugin import missing_tool

pytestmark = pytest.mark.etcd

log = logging.getLogger(__name__)

# The members' election timeout is 2 s (EtcdCluster._process): an election, a step-down and a
# catch-up each take a few of those on a loaded machine.
ELECTION_WAIT_SECONDS = 30.0


@pytest.fixture(scope="module")
def proxied_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """A 3-member etcd of its own (the session cluster has no peer proxy)."""
    run_dir: Path = tmp_path_factory.mktemp("partition")
    cluster = EtcdCluster(run_dir, name="partition", peer_proxy=True, die_with_parent=True)
    try:
        cluster.start()
    except ToolNotFoundError as exc:
        missing_tool(exc)  # skips locally, fails under CI=true
    try:
        for i in range(cluster.members):
            HYGIENE.log_files.add(cluster.log_path(i))
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster(proxied_etcd: EtcdCluster) -> Iterator[EtcdCluster]:
    """The proxied cluster whole before and after each test."""
    assert proxied_etcd.partitioned == frozenset()
    wait_for(
        "every member healthy",
        lambda: all(etcd_member_healthy(ep) for ep in proxied_etcd.endpoints),
        timeout=ELECTION_WAIT_SECONDS,
    )
    yield proxied_etcd
    for i in proxied_etcd.partitioned:
        proxied_etcd.heal(i)


# The library keeps at most this many history versions (its settings' bound).
HISTORY_LIMIT = 1000

# --- one member's own view -------------------------------------------------------------------


class NoAnswer(Exception):
    """A member did not answer a status request (busy); pollers try again."""


def view(cluster: EtcdCluster, i: int) -> tuple[str | None, int]:
    """(leader id in hex or None, raft term) as member i itself sees them."""
    st = etcd_status(cluster.endpoints[i])
    if st is None:
        raise NoAnswer(f"member {i} does not answer its client port")
    leader = int(st.get("leader", 0))
    return (format(leader, "x") if leader else None, int(st.get("raftTerm", 0)))


def common_leader(cluster: EtcdCluster, members: list[int]) -> str | None:
    """The leader every member in `members` agrees on, or None."""
    leaders = {view(cluster, i)[0] for i in members}
    return leaders.pop() if len(leaders) == 1 and None not in leaders else None


def puts_started(cluster: EtcdCluster, i: int) -> float:
    """KV Put calls member i has received so far (its own gRPC server metrics)."""
    # Loopback: an http_proxy from the environment must not intercept it.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{cluster.endpoints[i]}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    prefix = 'grpc_server_started_total{grpc_method="Put",'
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)
    )


def serving_member(cluster: EtcdCluster, make_puts: Callable[[], object], puts: int) -> int:
    """The one member that received the `puts` Put calls `make_puts` causes (a client picks
    its member at random). Nothing else puts into this cluster."""
    before = [puts_started(cluster, i) for i in range(cluster.members)]
    make_puts()
    grown = [puts_started(cluster, i) - b for i, b in enumerate(before)]
    busy = [i for i, g in enumerate(grown) if g > 0]
    assert len(busy) == 1 and grown[busy[0]] >= puts, f"puts per member: {grown}"
    return busy[0]


# --- a committer whose acknowledged versions are checked afterwards --------------------------


@dataclass
class Committer:
    """Commits a new firewall config in a loop; records each acknowledged (version, digest)."""

    configs: ConfigStore
    acked: list[tuple[int, str]] = field(default_factory=list)
    failed: list[DefenderConfigError] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Committer:
        self._thread = threading.Thread(target=self._run, name="committer", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            rules = [{"id": f"r{n}", "action": "allow", "proto": "tcp", "ports": [1 + n % 60000]}]
            config = {**FIREWALL, "rules": rules}
            try:
                version = self.configs.commit("firewall", config, by="partition-test")
            except DefenderConfigError as exc:
                self.failed.append(exc)
            else:
                # The digest of what the store keeps: the config as validation normalizes it.
                normalized = validate_config("firewall", config)
                self.acked.append((version, config_digest(normalized)))
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=120)
            assert not self._thread.is_alive(), "committer thread hung"


def assert_each_version_acknowledged_once(
    configs: ConfigStore, acked: list[tuple[int, str]]
) -> None:
    assert acked, "no commit was acknowledged: the test proved nothing"
    versions = [v for v, _ in acked]
    assert len(set(versions)) == len(versions), f"a version was acknowledged twice: {versions}"
    assert versions == sorted(versions), f"acknowledged versions went back: {versions}"
    kept = {h.version: h.digest for h in configs.history("firewall")}
    # History keeps the newest HISTORY_LIMIT versions (the library's most): an older acked
    # version may be pruned, never replaced; the window covers the cut and the heal.
    oldest = min(kept)
    assert oldest <= versions[-HISTORY_LIMIT:][0], "history pruned inside its limit"
    for version, digest in acked:
        if version >= oldest:
            assert kept.get(version) == digest, f"version {version} holds another config than acked"


# --- the partitioned member, probed alone ----------------------------------------------------


def assert_cut_member_refuses(cluster: EtcdCluster, i: int, prefix: str, known_key: str) -> None:
    """A fresh store that can only reach member i (no cache, one attempt): a linearizable read
    and a write both fail with StoreUnavailableError naming the member, and neither hangs past
    the store's deadline."""
    timeout = 2.0
    settings = etcd_settings(
        cluster, endpoints=[cluster.endpoints[i]], retries=0, timeout_seconds=timeout
    )
    with EtcdStore(settings, registry=CollectorRegistry()) as alone:
        for what, call in (
            ("write", lambda: alone.put(prefix + "to-the-cut-member", b"x")),
            ("linearizable read", lambda: alone.get(known_key)),
        ):
            started = time.monotonic()
            with pytest.raises(StoreUnavailableError) as info:
                call()
            elapsed = time.monotonic() - started
            # A hang guard, not a speed check: one attempt must end at its deadline.
            assert elapsed < timeout + 5.0, f"{what} on the cut member took {elapsed:.1f}s"
            assert cluster.endpoints[i] in str(info.value), "the error must name the member"


# --- the tests -------------------------------------------------------------------------------


def _clients(
    cluster: EtcdCluster, prefix: str, keyring: Keyring, alerts: list[Alert]
) -> tuple[DefenderClient, DefenderClient]:
    """A writer and a committer client, each knowing all three members for failover."""
    return (
        make_client(cluster, prefix, keyring, alerts),
        make_client(cluster, prefix, keyring, alerts, history_limit=HISTORY_LIMIT),
    )


def _run_partition(
    cluster: EtcdCluster, prefix: str, alerts: list[Alert], *, cut_leader: bool
) -> int:
    """Cut the member a writer is on, check, heal, check again; returns the member cut."""
    members = list(range(cluster.members))
    keyring = new_keyring()
    client, committer_client = _clients(cluster, prefix, keyring, alerts)
    configs = ConfigStore(committer_client)
    configs.seed("firewall", FIREWALL, "firewall", by="partition-test")

    # The victim is the member the writer's client is on, so its writes must fail over. It is
    # made leader (or not) before any load: a leader drops proposals while it hands over.
    def probe_puts() -> None:
        for n in range(5):
            client.put_sealed(f"{prefix}probe/{n}", b"where am I")

    victim = serving_member(cluster, probe_puts, 5)
    others = [j for j in members if j != victim]
    cluster.move_leader(victim if cut_leader else others[0])
    leader_id = wait_for(
        "all members to agree on the leader",
        lambda: common_leader(cluster, members),
        timeout=ELECTION_WAIT_SECONDS,
        ignore=(NoAnswer,),
    )
    assert (leader_id == cluster.member_ids[victim]) is cut_leader
    term_before = max(view(cluster, j)[1] for j in members)

    writer = LedgerWriter(client, prefix).start()
    committer = Committer(configs).start()
    try:

        def thirty_writes() -> None:
            acked = len(writer.acked)
            wait_for("30 writes before the cut", lambda: len(writer.acked) >= acked + 30)

        assert serving_member(cluster, thirty_writes, 30) == victim, "the writer moved"
        assert cluster.proxy.open_links(victim) > 0, "the victim had no peer links to cut"
        assert cluster.partition(victim) > 0
        assert cluster.proxy.open_links(victim) == 0

        # The cut took effect: the victim sees no leader, the others agree on one that is not
        # the victim, and (only) for a cut leader the term moved on.
        wait_for(
            f"member {victim} to lose its leader",
            lambda: view(cluster, victim)[0] is None,
            timeout=ELECTION_WAIT_SECONDS,
            ignore=(NoAnswer,),
        )
        # The others keep the old leader until their election timeout runs out.
        new_leader = wait_for(
            "the other two to agree on a leader other than the victim",
            lambda: (
                (leader := common_leader(cluster, others)) != cluster.member_ids[victim] and leader
            ),
            timeout=ELECTION_WAIT_SECONDS,
            ignore=(NoAnswer,),
        )
        if cut_leader:
            assert min(view(cluster, j)[1] for j in others) > term_before, "no new election"
        else:
            assert new_leader == leader_id, "cutting a follower must not move the leader"
        assert not etcd_member_healthy(cluster.endpoints[victim])

        at_cut = len(writer.acked), len(committer.acked)
        wait_for(
            "100 writes while the victim is cut",
            lambda: len(writer.acked) >= at_cut[0] + 100,
            timeout=60,
        )
        wait_for(
            "10 commits while the victim is cut",
            lambda: len(committer.acked) >= at_cut[1] + 10,
            timeout=60,
        )
        assert_cut_member_refuses(cluster, victim, prefix, f"{prefix}probe/0")
        assert cluster.proxy.stats().refused > 0, "the victim never tried to reach the others"

        cluster.heal(victim)
        wait_for(
            f"member {victim} healthy again",
            lambda: etcd_member_healthy(cluster.endpoints[victim]),
            timeout=ELECTION_WAIT_SECONDS,
        )
        after_heal = len(writer.acked)
        wait_for("writes after healing", lambda: len(writer.acked) >= after_heal + 30, timeout=60)
        failovers = client.store.metrics.registry.get_sample_value(
            "defender_etcd_endpoint_failovers_total"
        )
    finally:
        writer.stop()
        committer.stop()
        client.close()
    log.info(
        "member %d cut (leader: %s): %d writes acked, %d failed; %d commits acked, %d failed; "
        "%s failovers; proxy %s",
        victim,
        cut_leader,
        len(writer.acked),
        len(writer.failed),
        len(committer.acked),
        len(committer.failed),
        failovers,
        cluster.proxy.stats(),
    )
    # Every peer connection was attributed to a member (by the id it sent or, for requests
    # that name none, by the socket's owner): nothing could slip past the cut unseen.
    assert "unknown" not in cluster.proxy.stats().by_dialer, cluster.proxy.stats()
    # The writer was on the victim: it only kept writing by moving to another member.
    assert failovers is not None and failovers >= 1, "the writer never failed over"

    # A short window of typed errors is allowed while the cut member's calls time out; any
    # other error is not.
    for what, errors in (
        ("writes", [exc for _, exc in writer.failed]),
        ("commits", committer.failed),
    ):
        odd = [exc for exc in errors if not isinstance(exc, StoreUnavailableError)]
        assert odd == [], f"{what} failed with other than StoreUnavailableError: {odd[:3]}"
    reader = make_client(cluster, prefix, keyring, alerts)
    try:
        # From every member, the healed one included (it waits for each to catch up).
        assert_all_acknowledged_writes_present(cluster, prefix, reader, writer.acked)
        assert_each_version_acknowledged_once(configs, committer.acked)
        final = ConfigStore(reader).get_active("firewall")
        assert not final.stale and final.version == committer.acked[-1][0]
    finally:
        reader.close()
        committer_client.close()
    assert alerts == [], "a partition is not a decoding problem: nothing to alert"
    return victim


def test_cut_leader_is_replaced_refuses_clients_and_catches_up_losing_nothing(
    cluster: EtcdCluster, etcd_prefix: str, alerts: list[Alert]
) -> None:
    _run_partition(cluster, etcd_prefix, alerts, cut_leader=True)


def test_cut_follower_refuses_clients_and_catches_up_losing_nothing(
    cluster: EtcdCluster, etcd_prefix: str, alerts: list[Alert]
) -> None:
    victim = _run_partition(cluster, etcd_prefix, alerts, cut_leader=False)
    # Without load (the leader drops proposals while a transfer is pending): leadership cannot
    # be handed to a cut member either, since the transfer needs raft messages to reach it.
    cluster.partition(victim)
    with pytest.raises(LeaderTransferError, match="not partitioned"):
        cluster.move_leader(victim, timeout=2.0)


def test_leader_handover_under_load_fails_no_write(cluster: EtcdCluster, etcd_prefix: str) -> None:
    """A leader handing over drops proposals ("raft proposal dropped"); the library retries
    them, so a rolling restart of etcd costs latency, not failed writes."""
    alerts: list[Alert] = []
    keyring = new_keyring()
    client = make_client(cluster, etcd_prefix, keyring, alerts)
    writer = LedgerWriter(client, etcd_prefix).start()
    try:
        for target in (1, 2, 0):
            before = len(writer.acked)
            cluster.move_leader(target)
            wait_for(
                "writes after the handover",
                lambda b=before: len(writer.acked) > b + 20 or None,
                timeout=ELECTION_WAIT_SECONDS,
            )
    finally:
        writer.stop()
    try:
        assert not writer.failed, f"{len(writer.failed)} writes failed, first: {writer.failed[0]}"
        assert len(writer.acked) > 60
        reader = make_client(cluster, etcd_prefix, keyring, alerts)
        try:
            assert_all_acknowledged_writes_present(cluster, etcd_prefix, reader, writer.acked)
        finally:
            reader.close()
    finally:
        client.close()
