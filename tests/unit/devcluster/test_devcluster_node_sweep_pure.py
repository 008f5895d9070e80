"""The sweep of dead runs' node networks, its pure part: which leftovers belong to the harness,
which are dead, which rules go (tests/node/test_node_leftovers.py runs it for real)."""

from __future__ import annotations

from pathlib import Path

import pytest

from defender_devcluster._node import node_dirs_among
from defender_devcluster._nodenet import (
    Liveness,
    NodeNetwork,
    Observed,
    Rule,
    host_if_of,
    is_node_netns,
    path_hash,
    plan_sweep,
    rule_owner,
)

DEAD = "dfnode-1a2b3c4d"
LIVE = "dfnode-99887766"


def fence(netns: str) -> str:
    """The host OUTPUT rule a node adds, as `iptables -S` prints it."""
    return (
        f"-A OUTPUT -d 10.0.0.0/24 ! -o {host_if_of(netns)} -m comment "
        f'--comment "defender-devcluster {netns}" -j REJECT --reject-with icmp-net-unreachable'
    )


def forward(netns: str) -> str:
    comment = f'-m comment --comment "defender-devcluster {netns}"'
    return f"-A FORWARD -i {host_if_of(netns)} {comment} -j DROP"


DEAD_ALL = Liveness(locked=False, owner_alive=False, node_alive=False)


def test_names_of_the_harness() -> None:
    net = NodeNetwork(Path("/tmp/run"), 3)
    assert is_node_netns(net.netns) and host_if_of(net.netns) == net.host_if
    assert is_node_netns("dfnode-test1a2b3c")
    assert len(host_if_of("dfnode-test1a2b3c")) <= 15
    for other in (
        "dfnode-",
        "dfnode-ABC",
        "dfnode-a/b",
        "cni-1234",
        "xdfnode-12",
        "dfnode-" + "a" * 13,
    ):
        assert not is_node_netns(other), other


def test_a_rule_belongs_to_the_netns_its_harness_comment_names() -> None:
    assert rule_owner(fence(DEAD)) == DEAD
    assert rule_owner(forward(DEAD)) == DEAD
    # The same words anywhere else, another tool's comment, a chain line: not the harness's.
    assert rule_owner(f"-A FORWARD -i {host_if_of(DEAD)} -j DROP") is None
    assert (
        rule_owner('-A KUBE-SERVICES -m comment --comment "kubernetes service portals" -j X')
        is None
    )
    assert (
        rule_owner(f'-A OUTPUT -m comment --comment "defender-devclusterX {DEAD}" -j DROP') is None
    )
    assert (
        rule_owner(f'-A OUTPUT -m comment --comment "defender-devcluster {DEAD} x" -j DROP') is None
    )
    assert rule_owner(f"-N {DEAD}") is None
    assert rule_owner('-A OUTPUT --comment "unbalanced') is None


def test_a_rule_is_deleted_by_its_own_spec_in_its_own_table() -> None:
    argv = Rule("filter", fence(DEAD)).delete_argv()
    assert argv[:7] == ["iptables", "-w", "5", "-t", "filter", "-D", "OUTPUT"]
    assert f"defender-devcluster {DEAD}" in argv  # the quoted comment stays one argument
    assert argv[-2:] == ["--reject-with", "icmp-net-unreachable"]
    with pytest.raises(ValueError):
        Rule("filter", "-P OUTPUT ACCEPT").delete_argv()


def test_every_kind_of_leftover_names_its_network() -> None:
    run_dir = Path("/tmp/pytest-of-root/pytest-7/node-cluster0")
    observed = Observed(
        netns=frozenset({"dfnode-aaaa0001"}),
        interfaces=frozenset({"dfhaaaa0002"}),
        rules=(Rule("filter", fence("dfnode-aaaa0003")), Rule("filter", "-A OUTPUT -j ACCEPT")),
        records={"dfnode-aaaa0004": Path("/tmp/r4")},
        locks=frozenset({"dfnode-aaaa0005", "not-a-node"}),
        node_dirs=frozenset({run_dir / "node"}),
    )
    assert observed.names() == {
        "dfnode-aaaa0001",
        "dfnode-aaaa0002",
        "dfnode-aaaa0003",
        "dfnode-aaaa0004",
        "dfnode-aaaa0005",
        f"dfnode-{path_hash(str(run_dir))}",
    }
    assert observed.run_dirs(f"dfnode-{path_hash(str(run_dir))}") == (run_dir,)
    assert observed.run_dirs("dfnode-aaaa0004") == (Path("/tmp/r4"),)


def test_only_a_network_nothing_vouches_for_is_dead() -> None:
    assert DEAD_ALL.dead
    assert not Liveness(locked=True, owner_alive=False, node_alive=False).dead
    assert not Liveness(locked=False, owner_alive=True, node_alive=False).dead
    assert not Liveness(locked=False, owner_alive=False, node_alive=True).dead


def test_the_plan_removes_dead_networks_and_only_their_rules() -> None:
    run_dir = Path("/tmp/dead-run")
    prefix_twin = DEAD + "e"  # its name starts with DEAD's: its rules are not DEAD's
    observed = Observed(
        netns=frozenset({DEAD, LIVE, prefix_twin}),
        interfaces=frozenset({host_if_of(DEAD), host_if_of(LIVE)}),
        rules=(
            Rule("filter", fence(DEAD)),
            Rule("filter", forward(DEAD)),
            Rule("filter", fence(LIVE)),
            Rule("filter", fence(prefix_twin)),
            Rule("nat", f'-A POSTROUTING -m comment --comment "defender-devcluster {DEAD}" -j X'),
        ),
        records={DEAD: run_dir},
    )
    liveness = {
        DEAD: DEAD_ALL,
        LIVE: Liveness(locked=True, owner_alive=False, node_alive=False),
        prefix_twin: Liveness(locked=False, owner_alive=False, node_alive=True),
    }
    (dead,) = plan_sweep(observed, liveness)
    assert dead.netns == DEAD and dead.host_if == host_if_of(DEAD)
    assert dead.netns_exists and dead.host_if_exists
    assert {(r.table, r.spec.split()[1]) for r in dead.rules} == {
        ("filter", "OUTPUT"),
        ("filter", "FORWARD"),
        ("nat", "POSTROUTING"),
    }
    assert all(rule_owner(r.spec) == DEAD for r in dead.rules)
    assert dead.run_dirs == (run_dir,)


def test_kept_and_unjudged_networks_are_left_alone() -> None:
    observed = Observed(netns=frozenset({DEAD, LIVE}), rules=(Rule("filter", fence(LIVE)),))
    # LIVE was not judged (e.g. this process made it): left alone, with its rules.
    assert [d.netns for d in plan_sweep(observed, {DEAD: DEAD_ALL})] == [DEAD]
    assert plan_sweep(observed, {DEAD: DEAD_ALL, LIVE: DEAD_ALL}, keep=[DEAD, LIVE]) == []


def test_a_dead_network_may_have_left_only_a_rule() -> None:
    # The state a hand-cleanup missed: the netns and veth are gone, the REJECT rule is not.
    observed = Observed(rules=(Rule("filter", fence(DEAD)),))
    (dead,) = plan_sweep(observed, {DEAD: DEAD_ALL})
    assert not dead.netns_exists and not dead.host_if_exists
    assert dead.rules == (Rule("filter", fence(DEAD)),) and dead.run_dirs == ()


def test_node_dirs_are_found_above_mount_points() -> None:
    points = [
        Path("/tmp/a/node/kubelet/pods/x/volumes/y"),
        Path("/tmp/a/node/containerd/state/z/rootfs"),
        Path("/tmp/b/node"),
        Path("/proc"),
    ]
    assert node_dirs_among(points) == {Path("/tmp/a/node"), Path("/tmp/b/node")}
