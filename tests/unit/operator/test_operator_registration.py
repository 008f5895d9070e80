"""The registration anchor (`status.registration`): which registration of a name is current."""

from __future__ import annotations

import pytest

from defender_operator._decisions.registration import (
    REGISTRATION_FIELD,
    RegistrationAction,
    anchored_registration,
    decide_registration,
    registration_fields,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(None, None), (0, None), (-3, None), (True, None), ("17", None), (17, 17)],
)
def test_only_a_positive_integer_in_status_is_an_anchor(raw: object, expected: int | None) -> None:
    status = {} if raw is None else {REGISTRATION_FIELD: raw}
    assert anchored_registration(status) == expected


def test_a_saved_registration_put_back_is_never_anchored_over_the_current_one() -> None:
    # Older (the purged registration) or newer: not the anchored one, so refused, not anchored.
    assert decide_registration(200, 100) is RegistrationAction.REPLAYED
    assert decide_registration(200, 300) is RegistrationAction.REPLAYED
    assert registration_fields(RegistrationAction.REPLAYED, 100) == {}


def test_a_record_without_registration_under_an_anchor_is_a_replay() -> None:
    # A record from before registrations, put back after the component got one.
    assert decide_registration(200, None) is RegistrationAction.REPLAYED


def test_nothing_anchored_anchors_what_is_there_and_legacy_stays_readable() -> None:
    assert decide_registration(None, 100) is RegistrationAction.ANCHOR
    assert registration_fields(RegistrationAction.ANCHOR, 100) == {REGISTRATION_FIELD: 100}
    assert decide_registration(None, None) is RegistrationAction.LEGACY
    assert registration_fields(RegistrationAction.LEGACY, None) == {}


def test_the_anchored_registration_is_kept() -> None:
    assert decide_registration(200, 200) is RegistrationAction.KEEP
    assert registration_fields(RegistrationAction.KEEP, 200) == {}


def test_the_operators_own_seed_re_anchors_after_etcd_lost_the_data() -> None:
    # An accident that emptied etcd must not lock the resource out of what it seeds again.
    assert decide_registration(200, 300, seeded=True) is RegistrationAction.ANCHOR
    assert decide_registration(200, None, seeded=True) is RegistrationAction.REPLAYED
