"""The shared polling helper: what it returns, what it ignores, and what a timeout says."""

from __future__ import annotations

import pytest

from defender_devcluster import wait_for
from defender_devcluster._wait import poll


class Counter:
    """A probe that is falsy until its n-th call; counts calls."""

    def __init__(self, ready_on: int, value: object = "ready") -> None:
        self.calls = 0
        self.ready_on = ready_on
        self.value = value

    def __call__(self) -> object:
        self.calls += 1
        return self.value if self.calls >= self.ready_on else None


def test_returns_the_first_truthy_result() -> None:
    probe = Counter(ready_on=3, value=["a", "b"])
    assert wait_for("three calls", probe, timeout=5, every=0.001) == ["a", "b"]
    assert probe.calls == 3


def test_bool_probe_returns_true() -> None:
    probe = Counter(ready_on=2, value=True)
    assert wait_for("a flag", lambda: bool(probe()), timeout=5, every=0.001) is True


def test_probes_once_even_with_no_time() -> None:
    assert wait_for("instant", lambda: 7, timeout=0) == 7


def test_timeout_names_what_the_timeout_and_the_last_value() -> None:
    probe = Counter(ready_on=10**9)
    with pytest.raises(AssertionError) as info:
        wait_for("the widget", lambda: probe() or [], timeout=0.05, every=0.01)
    assert str(info.value) == "timed out after 0.05s waiting for the widget (last value: [])"
    assert info.value.__cause__ is None
    # Once at the start and once more at the deadline, at the least.
    assert probe.calls >= 2


def test_exceptions_propagate_unless_ignored() -> None:
    def broken() -> bool:
        raise ConnectionRefusedError("port 1 closed")

    with pytest.raises(ConnectionRefusedError, match="port 1 closed"):
        wait_for("a refused connection", broken, timeout=5)


def test_ignored_exceptions_mean_not_yet() -> None:
    calls = 0

    def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ConnectionRefusedError("starting")
        return "up"

    assert wait_for("a flaky probe", flaky, timeout=5, every=0.001, ignore=(OSError,)) == "up"
    assert calls == 3


def test_ignore_covers_only_the_listed_types() -> None:
    def wrong() -> bool:
        raise KeyError("not an OSError")

    with pytest.raises(KeyError):
        wait_for("a probe with a bug", wrong, timeout=5, ignore=(OSError,))


def test_timeout_after_ignored_errors_names_and_chains_the_last_one() -> None:
    attempts: list[int] = []

    def refused() -> bool:
        attempts.append(1)
        raise ConnectionRefusedError(f"attempt {len(attempts)}")

    with pytest.raises(AssertionError) as info:
        wait_for("the server", refused, timeout=0.05, every=0.01, ignore=(OSError,))
    message = str(info.value)
    assert message.startswith("timed out after 0.05s waiting for the server (last error: ")
    assert f"ConnectionRefusedError('attempt {len(attempts)}')" in message
    assert isinstance(info.value.__cause__, ConnectionRefusedError)
    assert str(info.value.__cause__) == f"attempt {len(attempts)}"


def test_poll_reports_the_last_value_instead_of_raising() -> None:
    assert poll(lambda: 0, 0.02, 0.005) == (None, 0)
    assert poll(lambda: "x", 0.02, 0.005) == ("x", None)
