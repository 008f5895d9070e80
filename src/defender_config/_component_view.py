"""What a component's watcher (the operator's monitor pass) reads about it, in ONE etcd
transaction: metadata, MASTER and the freeze record (`ConfigStore.overview`), the published
heartbeat cadence, the rollout record and the recent alerts. At a thousand components watched
every few seconds, one round trip instead of four is most of the watcher's etcd cost."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from ._alerts import Alert, decode_alerts
from ._cadence import Cadence, decode_cadence
from ._configs import ComponentOverview, ConfigStore
from ._rollout import RolloutRecord, Rollouts
from ._store_types import GetOp

__all__ = ["ComponentView", "view_component"]


@dataclass(frozen=True, slots=True)
class ComponentView:
    """What `view_component` read, at one revision."""

    overview: ComponentOverview
    cadence: Cadence | None
    rollout: RolloutRecord | None
    alerts: tuple[Alert, ...]


def view_component(
    configs: ConfigStore, component: str, *, alerts_since: datetime
) -> ComponentView:
    """`overview` (MASTER tolerated: a MASTER that does not open is in `master_error`), the
    cadence (as `read_cadence`: None when absent or unreadable), the rollout record (as
    `Rollouts.record`: None unless authentic) and the alerts raised since `alerts_since`
    (unreadable ones skipped, logged). A metadata record that does not verify raises as
    `overview` does."""
    layout = configs.layout
    reads = [
        *configs.overview_reads(component),
        GetOp(layout.cadence(component)),
        GetOp(layout.rollout(component)),
        GetOp(layout.component_alerts_dir(component), prefix=True),
    ]
    gets = configs.client.store.txn([], reads).gets
    cadence_sv, rollout_sv = (found[0] if found else None for found in gets[3:5])
    return ComponentView(
        overview=configs.overview_of(component, gets[:3], True),
        cadence=decode_cadence(configs.client, layout.cadence(component), cadence_sv),
        rollout=Rollouts(configs).decode(component, rollout_sv),
        alerts=decode_alerts(configs.client, gets[5], alerts_since),
    )
