"""How a starting etcd member decides (pure): keep its data, bootstrap, rejoin (remove the old
member, add a learner) or resume; never a member change that could cost quorum. And the config
file it writes for etcd from the ETCD_* variables."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from defender_config.etcd_member import (
    EtcdMembers,
    Member,
    MemberError,
    etcd_config,
    plan_start,
)

ME = "https://etcd-2.etcd:2380"


def cluster(*, mine: Member | None) -> list[Member]:
    others = [
        Member(1, "etcd-0", ("https://etcd-0.etcd:2380",)),
        Member(2, "etcd-1", ("https://etcd-1.etcd:2380",)),
    ]
    return [*others, mine] if mine is not None else others


OLD = Member(3, "etcd-2", (ME,))


def test_data_present_keeps_everything() -> None:
    plan = plan_start(data_present=True, peer_url=ME, members=None, healthy=frozenset())
    assert plan.action == "keep" and plan.remove is None


def test_nobody_answers_is_a_new_cluster() -> None:
    plan = plan_start(data_present=False, peer_url=ME, members=None, healthy=frozenset())
    assert plan.action == "bootstrap"


def test_lost_data_replaces_the_old_member() -> None:
    plan = plan_start(
        data_present=False, peer_url=ME, members=cluster(mine=OLD), healthy=frozenset({1, 2})
    )
    assert (plan.action, plan.remove) == ("rejoin", 3)


def test_old_member_already_removed_only_adds() -> None:
    plan = plan_start(
        data_present=False, peer_url=ME, members=cluster(mine=None), healthy=frozenset({1, 2})
    )
    assert (plan.action, plan.remove) == ("rejoin", None)


def test_learner_added_but_never_started_resumes() -> None:
    added = Member(9, "", (ME,), learner=True)
    plan = plan_start(
        data_present=False, peer_url=ME, members=cluster(mine=added), healthy=frozenset({1, 2})
    )
    assert (plan.action, plan.remove) == ("resume", None)


def test_a_started_learner_that_lost_its_data_is_replaced() -> None:
    started = Member(9, "etcd-2", (ME,), learner=True)
    plan = plan_start(
        data_present=False, peer_url=ME, members=cluster(mine=started), healthy=frozenset({1, 2})
    )
    assert (plan.action, plan.remove) == ("rejoin", 9)


def test_cluster_still_forming_bootstraps() -> None:
    listed = Member(3, "", (ME,))
    plan = plan_start(
        data_present=False, peer_url=ME, members=cluster(mine=listed), healthy=frozenset({1, 2})
    )
    assert plan.action == "bootstrap"


def test_no_removal_while_another_voter_is_down() -> None:
    with pytest.raises(MemberError, match="1 of the 2 other voting members are healthy"):
        plan_start(
            data_present=False, peer_url=ME, members=cluster(mine=OLD), healthy=frozenset({1})
        )
    with pytest.raises(MemberError):
        plan_start(data_present=False, peer_url=ME, members=cluster(mine=None), healthy=frozenset())


def test_no_rejoin_beside_a_member_that_never_started() -> None:
    members = [*cluster(mine=OLD), Member(7, "", ("https://x:2380",), learner=True)]
    with pytest.raises(MemberError, match="never started"):
        plan_start(data_present=False, peer_url=ME, members=members, healthy=frozenset({1, 2}))


def test_config_file_from_the_variables() -> None:
    env = {
        "ETCD_NAME": "etcd-2",
        "ETCD_QUOTA_BACKEND_BYTES": "2147483648",
        "ETCD_AUTO_COMPACTION_RETENTION": "1",
        "ETCD_PEER_CLIENT_CERT_AUTH": "true",
        "ETCD_PEER_CERT_FILE": "/p/tls.crt",
        "ETCD_CLIENT_CERT_AUTH": "false",
        "ETCD_CONFIG_FILE": "/ignored",
        "PATH": "/bin",
    }
    cfg = etcd_config(env, {"initial-cluster-state": "existing"})
    assert cfg == {
        "name": "etcd-2",
        "quota-backend-bytes": 2147483648,
        # A string in etcd's config struct: a number would not load.
        "auto-compaction-retention": "1",
        "peer-transport-security": {"client-cert-auth": True, "cert-file": "/p/tls.crt"},
        "client-transport-security": {"client-cert-auth": False},
        "initial-cluster-state": "existing",
    }
    with pytest.raises(MemberError, match="not a whole number"):
        etcd_config({"ETCD_HEARTBEAT_INTERVAL": "fast"})


class Refusing(EtcdMembers):
    """The members API answering member/add with the given errors first (a scripted etcd)."""

    def __init__(self, *errors: str) -> None:
        super().__init__(["http://127.0.0.1:1"])
        self.errors = list(errors)
        self.asked = 0

    def call(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        assert path == "/v3/cluster/member/add"
        self.asked += 1
        if self.errors:
            raise MemberError(self.errors.pop(0))
        member = {"ID": "7", "name": "", "peerURLs": [ME], "isLearner": True}
        return {"member": member, "members": [member]}


UNHEALTHY = '/v3/cluster/member/add failed: HTTP 503 {"message":"etcdserver: unhealthy cluster"}'


def test_add_waits_out_etcds_unhealthy_cluster_refusal_after_a_removal() -> None:
    api = Refusing(UNHEALTHY, UNHEALTHY)
    added, _ = api.add_learner(ME, timeout=5, every=0.01)
    assert added.learner and api.asked == 3


def test_add_gives_up_on_unhealthy_cluster_after_its_timeout() -> None:
    api = Refusing(*[UNHEALTHY] * 1000)
    with pytest.raises(MemberError, match="unhealthy cluster"):
        api.add_learner(ME, timeout=0.05, every=0.01)


def test_add_does_not_retry_other_refusals() -> None:
    api = Refusing("/v3/cluster/member/add failed: HTTP 403 permission denied")
    with pytest.raises(MemberError, match="permission denied"):
        api.add_learner(ME, timeout=5, every=0.01)
    assert api.asked == 1
