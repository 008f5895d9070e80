"""What to write to etcd for a component on create, resume or spec change."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StoredState:
    """What etcd holds for the component (None = key absent). ACTIVE's digest and version are
    the metadata record's: None when there is no record."""

    master_digest: str | None
    active_digest: str | None
    active_version: int | None


@dataclass(frozen=True)
class SeedPlan:
    seed_master: bool
    seed_active: bool
    commit: bool
    master_missing: bool = False
    """MASTER is gone but the metadata is there: nothing is written, a person must act."""

    @property
    def nothing_to_do(self) -> bool:
        return not (self.seed_master or self.seed_active or self.commit)


def plan_seed(spec_digest: str, stored: StoredState, handled_spec_digest: str) -> SeedPlan:
    """Decide which writes bring etcd in line with `spec.config`.

    MASTER is create-only: seeded when absent, never overwritten, so a re-created resource
    (retention Keep) finds its original MASTER again. ACTIVE is seeded from the spec when absent.
    MASTER absent beside a metadata record is not a new component but a damaged one (MASTER
    deleted): seeding would make the spec MASTER and version 1 again, over what components
    run (after a breaker rollback, the very spec the breaker rejected), so nothing is planned.

    A new ACTIVE version is committed only when spec.config differs both from ACTIVE and from
    the spec digest already handled (`status.specConfigDigest`). The second test is what keeps a
    rollback in place: after a rollback ACTIVE differs from spec.config on purpose, and
    re-committing the unchanged spec would undo it.
    """
    if stored.master_digest is None and stored.active_digest is not None:
        return SeedPlan(seed_master=False, seed_active=False, commit=False, master_missing=True)
    seed_master = stored.master_digest is None
    seed_active = stored.active_digest is None
    commit = (
        not seed_active
        and stored.active_digest != spec_digest
        and handled_spec_digest != spec_digest
    )
    return SeedPlan(seed_master=seed_master, seed_active=seed_active, commit=commit)
