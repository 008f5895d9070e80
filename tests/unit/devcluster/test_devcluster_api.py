"""The public face of defender_devcluster: a sorted, complete __all__."""

from __future__ import annotations

import defender_devcluster


def test_all_is_sorted_and_complete() -> None:
    exported = defender_devcluster.__all__
    assert exported == sorted(exported)
    public = {
        name
        for name, value in vars(defender_devcluster).items()
        if not name.startswith("_")
        and getattr(value, "__module__", "").startswith("defender_devcluster.")
    }
    assert public == set(exported)
