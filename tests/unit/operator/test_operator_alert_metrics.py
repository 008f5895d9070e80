"""The gauges the chart's alert rules read (charts/ml-defender/files/prometheus-rules.yaml):
each component's conditions, frozen commits and a spent restart budget, exported from the status
the operator publishes, and dropped when the component is deleted."""

from __future__ import annotations

import asyncio

from operator_core_support import LOG, NAME, Harness, spec
from prometheus_client import REGISTRY

from defender_operator import handlers
from defender_operator._decisions import conditions as cond
from defender_operator._metrics import count_canary_abort, forget_component, record_conditions
from defender_operator._reconcile import UNFREEZE_ANNOTATION

BASE = {"node_id": "sniffer-01", "version": "1.0.0"}
ETH0 = {**BASE, "interface": "eth0"}
ETH1 = {**BASE, "interface": "eth1"}
ETH2 = {**BASE, "interface": "eth2"}


def sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def condition(component: str, kind: str, status: str) -> float | None:
    return sample(
        "defender_operator_component_condition", component=component, condition=kind, status=status
    )


def test_each_condition_exports_one_for_its_status_and_zero_for_the_others() -> None:
    record_conditions(
        "t-cond",
        [
            {"type": cond.READY, "status": cond.FALSE, "reason": "Frozen"},
            {"type": cond.CONFIG_SYNCED, "status": cond.FALSE, "reason": "Frozen"},
            {"type": cond.HEARTBEATING, "status": cond.FALSE, "reason": "RestartBudgetExhausted"},
        ],
    )
    assert [condition("t-cond", cond.READY, s) for s in ("True", "False", "Unknown")] == [0, 1, 0]
    assert sample("defender_operator_component_frozen", component="t-cond") == 1
    assert sample("defender_operator_restart_budget_exhausted", component="t-cond") == 1
    # Recovered: the same series flip back, no new ones appear.
    record_conditions(
        "t-cond",
        [
            {"type": cond.READY, "status": cond.TRUE, "reason": "AllGood"},
            {"type": cond.CONFIG_SYNCED, "status": cond.TRUE, "reason": "Committed"},
            {"type": cond.HEARTBEATING, "status": cond.TRUE, "reason": "Heartbeating"},
        ],
    )
    assert [condition("t-cond", cond.READY, s) for s in ("True", "False", "Unknown")] == [1, 0, 0]
    assert sample("defender_operator_component_frozen", component="t-cond") == 0
    assert sample("defender_operator_restart_budget_exhausted", component="t-cond") == 0


def test_a_deleted_component_leaves_no_series_behind() -> None:
    record_conditions(
        "t-gone",
        [
            {"type": cond.READY, "status": cond.FALSE, "reason": "MissedHeartbeats"},
            {"type": cond.CONFIG_SYNCED, "status": cond.TRUE, "reason": "Committed"},
            {"type": cond.HEARTBEATING, "status": cond.FALSE, "reason": "MissedHeartbeats"},
        ],
    )
    record_conditions("t-kept", [{"type": cond.READY, "status": cond.FALSE, "reason": "x"}])
    forget_component("t-gone")
    assert condition("t-gone", cond.READY, "False") is None
    assert sample("defender_operator_component_frozen", component="t-gone") is None
    assert sample("defender_operator_restart_budget_exhausted", component="t-gone") is None
    assert condition("t-kept", cond.READY, "False") == 1  # another component is untouched
    forget_component("t-never-seen")  # nothing exported: nothing to drop, no error
    forget_component("t-kept")


def test_the_status_a_monitor_pass_publishes_is_what_the_gauges_say() -> None:
    """Wired where the status is written: a breaker trip shows as frozen and not Ready, an
    unfreeze clears both."""
    h = Harness()
    asyncio.run(h.reconcile(spec(ETH0)))
    for pod in ("sniffer-a", "sniffer-b", "sniffer-c"):
        h.add_pod(pod)
        h.beat(pod)
    asyncio.run(h.monitor(spec(ETH0)))
    assert condition(NAME, cond.READY, "True") == 1
    assert sample("defender_operator_component_frozen", component=NAME) == 0
    asyncio.run(h.reconcile(spec(ETH1)))
    for pod in ("sniffer-a", "sniffer-b"):
        h.beat(pod, error="UnknownKey")  # more than maxUnhealthyInstances: the breaker trips
    asyncio.run(h.monitor(spec(ETH1)))
    assert h.backend.state(NAME).frozen
    assert sample("defender_operator_component_frozen", component=NAME) == 1
    assert condition(NAME, cond.READY, "True") == 0
    assert condition(NAME, cond.CONFIG_SYNCED, "False") == 1
    asyncio.run(h.reconcile(spec(ETH2), {UNFREEZE_ANNOTATION: "now"}))
    assert sample("defender_operator_component_frozen", component=NAME) == 0
    forget_component(NAME)


def test_heartbeat_gauges_keep_the_last_age_and_go_with_the_component() -> None:
    from defender_operator._metrics import record_heartbeats

    record_heartbeats("t-hb", 3.5, 2)
    assert sample("defender_operator_heartbeat_age_seconds", component="t-hb") == 3.5
    assert sample("defender_operator_instances_alive", component="t-hb") == 2
    # A pass that saw no heartbeat keeps the last age (how long it has been) and counts 0 alive.
    record_heartbeats("t-hb", None, 0)
    assert sample("defender_operator_heartbeat_age_seconds", component="t-hb") == 3.5
    assert sample("defender_operator_instances_alive", component="t-hb") == 0
    record_heartbeats("t-hb-never", None, 1)  # never beat: no age series at all
    assert sample("defender_operator_heartbeat_age_seconds", component="t-hb-never") is None
    forget_component("t-hb")
    forget_component("t-hb-never")
    assert sample("defender_operator_heartbeat_age_seconds", component="t-hb") is None
    assert sample("defender_operator_instances_alive", component="t-hb") is None
    assert sample("defender_operator_instances_alive", component="t-hb-never") is None


def test_the_scrape_text_carries_every_per_component_series_with_help_and_type() -> None:
    from prometheus_client import generate_latest

    from defender_operator._metrics import record_heartbeats

    record_conditions("t-scrape", [{"type": cond.READY, "status": None, "reason": "odd"}])
    record_heartbeats("t-scrape", 1.25, 1)
    text = generate_latest(REGISTRY).decode()
    for name in (
        "defender_operator_component_condition",
        "defender_operator_heartbeat_age_seconds",
        "defender_operator_instances_alive",
    ):
        assert f"# TYPE {name} gauge" in text
        assert f"# HELP {name} " in text
    # A condition without a status is exported, all three statuses 0 (as before: no status matches).
    for s in ("True", "False", "Unknown"):
        assert (
            f'defender_operator_component_condition{{component="t-scrape",condition="Ready",'
            f'status="{s}"}} 0.0' in text
        )
    assert 'defender_operator_heartbeat_age_seconds{component="t-scrape"} 1.25' in text
    forget_component("t-scrape")
    assert 'component="t-scrape"' not in generate_latest(REGISTRY).decode()


def test_a_refused_same_named_resource_neither_overwrites_nor_drops_the_owners_series() -> None:
    # Series are keyed by component name; tenant-b/sniffer is refused the name default/sniffer
    # holds (Conflict), and is then deleted.
    forget_component(NAME)  # what earlier tests left of the name
    h = Harness()
    asyncio.run(h.reconcile(spec(ETH0)))
    count_canary_abort(NAME, "Command")
    twin = h.reconcile_refused_twin("tenant-b", spec(ETH0))
    assert condition(NAME, cond.CONFLICT, "True") is None
    assert condition(NAME, cond.CONFIG_SYNCED, "True") == 1

    twin["status"] = {}
    asyncio.run(
        handlers.gone(
            body=twin, namespace="tenant-b", name=NAME, logger=LOG, memo={"runtime": h.rt}
        )
    )
    assert ("tenant-b", NAME) not in h.rt.components
    assert condition(NAME, cond.CONFIG_SYNCED, "True") == 1
    assert sample("defender_operator_canary_aborts_total", component=NAME, reason="Command") == 1
    forget_component(NAME)
