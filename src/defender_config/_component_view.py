"""What a component's watcher (the operator's monitor pass) reads about it, in ONE etcd
transaction: metadata, MASTER and the freeze record (`ConfigStore.overview`), the published
heartbeat cadence, the rollout record and the recent alerts. At a thousand components watched
every few seconds, one round trip instead of four is most of the watcher's etcd cost.

`viewed_component` names the component whose view a key belongs to, so a watcher that keeps a
view can watch etcd and read again only when one of exactly these keys changed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from ._alerts import Alert, decode_alerts
from ._cadence import Cadence, decode_cadence
from ._configs import ComponentOverview, ConfigStore
from ._layout import KeyKind, Layout, check_name
from ._rollout import RolloutRecord, Rollouts
from ._store_types import GetOp, StoredValue

__all__ = [
    "ComponentView",
    "view_component",
    "view_from",
    "view_reads",
    "viewed_component",
]

# The single keys `view_component` reads, as `Layout.parse` names them (its alerts are a whole
# prefix, matched apart). ACTIVE, history, status, the owner record and the instances'
# heartbeats are not read: a change to them cannot change a view.
_VIEWED_KINDS: frozenset[KeyKind] = frozenset(
    {"metadata", "master_config", "freeze", "cadence", "rollout"}
)


@dataclass(frozen=True, slots=True)
class ComponentView:
    """What `view_component` read, at one revision."""

    overview: ComponentOverview
    cadence: Cadence | None
    rollout: RolloutRecord | None
    alerts: tuple[Alert, ...]
    revision: int = 0
    """The etcd revision the transaction read at: a change with a higher mod revision to a key
    `viewed_component` assigns to this component is one this view has not seen."""


def view_component(
    configs: ConfigStore, component: str, *, alerts_since: datetime
) -> ComponentView:
    """`overview` (MASTER tolerated: a MASTER that does not open is in `master_error`), the
    cadence (as `read_cadence`: None when absent or unreadable), the rollout record (as
    `Rollouts.record(ended=True)`: None unless authentic; an ended rollout's record included,
    so the operator can tell one put back over a rollout in progress) and the alerts raised
    since `alerts_since` (unreadable ones skipped, logged). A metadata record that does not
    verify raises as `overview` does."""
    read = configs.client.store.txn(
        [], [*configs.overview_reads(component), *view_reads(configs.layout, component)]
    )
    overview = configs.overview_of(component, read.gets[:3], True)
    return view_from(
        configs, component, overview, read.gets[3:], revision=read.revision, since=alerts_since
    )


def view_reads(layout: Layout, component: str) -> list[GetOp]:
    """The reads a view makes besides the overview's, for a caller that adds them to a
    transaction of its own (a new component's seed, which knows the overview it wrote);
    `view_from` decodes their results."""
    return [
        GetOp(layout.cadence(component)),
        GetOp(layout.rollout(component)),
        GetOp(layout.component_alerts_dir(component), prefix=True),
    ]


def view_from(
    configs: ConfigStore,
    component: str,
    overview: ComponentOverview,
    gets: Sequence[tuple[StoredValue, ...]],
    *,
    revision: int,
    since: datetime,
) -> ComponentView:
    """The view of `overview` and what `view_reads` found (at `revision`)."""
    layout = configs.layout
    cadence_sv, rollout_sv = (found[0] if found else None for found in gets[:2])
    return ComponentView(
        overview=overview,
        cadence=decode_cadence(configs.client, layout.cadence(component), cadence_sv),
        rollout=Rollouts(configs).decode(component, rollout_sv, ended=True),
        alerts=decode_alerts(configs.client, gets[2], since),
        revision=revision,
    )


def viewed_component(layout: Layout, key: str | bytes) -> str | None:
    """The component whose `view_component` reads `key` (a put or a delete of it can change
    that view), None when no view reads it. Every key under a component's alerts prefix counts,
    as the view reads them all, readable or not."""
    text = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
    if text.startswith(layout.alerts_dir):
        component, below, _ = text[len(layout.alerts_dir) :].partition("/")
        try:
            return check_name(component) if below else None
        except ValueError:
            return None  # no component of that name: no view lists this key
    parsed = layout.parse(text)
    if parsed is None or parsed.kind not in _VIEWED_KINDS:
        return None
    return parsed.component
