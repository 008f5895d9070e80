"""A target the benchmark report marks NOT met carries its reason beside it (issue 17: "with
the target met or the reason it is not"), from the same run's figures; a met one carries none."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from bench_modules import bench_module


def _report() -> ModuleType:
    return bench_module("report")


SUPPORT = bench_module("bench_support")


def _batch(cpu_ms: float, took: float, seen_p50: float) -> dict[str, Any]:
    return {
        "components": 1000,
        "create_calls_seconds": took,
        "cpu_ms_per_component": {"operator": cpu_ms / 2, "kube_apiserver": cpu_ms / 2},
        "create_to_status_seen_seconds": {"p50": seen_p50, "p99": seen_p50 * 3},
        "time_split_ms": {SUPPORT.STAGE_PATCH_RECEIVED: {"p50": 27.0}},
    }


def _row(ratio_p50: float, floor_ratio: float) -> dict[str, Any]:
    return {
        "components": 1000,
        "create_calls_seconds": 20.0,
        "cpu_ms_per_component": {"operator": 20.0, "kube_apiserver": 17.0},
        "ratio_to_baseline": {"p50": ratio_p50, "p99": ratio_p50},
        "baseline_operator": _batch(26.0, 13.0, 0.03),
        "floor_operator": _batch(38.0, 19.0, 0.05),
        "floor_ratio_to_baseline": {"p50": floor_ratio, "p99": floor_ratio},
        "time_split_ms": {SUPPORT.STAGE_SEEDED: {"p50": 43.0}},
    }


def test_a_missed_ratio_says_why_from_the_runs_own_figures() -> None:
    (_, text) = _report()._why_ratio_not_met(_row(3.2, 1.7), 2)
    assert "NOT met at 1,000" in text
    # Cores busy: 37 ms x 1000 / 20 s = 1.85; the baseline's 26 x 1000 / 13 = 2.00.
    assert "baseline 2.00" in text and "ours 1.85 of 2 cores" in text
    assert "ours 37.0 ms" in text and "floor 38.0 ms" in text
    assert "1.7x / 1.7x the baseline" in text and "the floor itself missed 1.5x" in text
    assert "at 43 ms (p50)" in text and "(27 ms)" in text


def test_a_floor_under_the_target_is_not_called_a_miss() -> None:
    (_, text) = _report()._why_ratio_not_met(_row(3.2, 1.3), 2)
    assert "1.3x / 1.3x the baseline" in text and "missed" not in text


def _with_status_floor(row: dict[str, Any], ratio: float, ratio_p99: float) -> dict[str, Any]:
    return {
        **row,
        "status_floor_operator": _batch(41.0, 21.0, 0.06),
        "status_floor_ratio_to_baseline": {"p50": ratio, "p99": ratio_p99},
    }


def test_a_status_floor_over_the_target_is_named_as_the_reason() -> None:
    row = _with_status_floor(_row(3.2, 1.3), 1.8, 1.2)
    (_, text) = _report()._why_ratio_not_met(row, 2)
    # Its cores and CPU beside the others': 41 ms x 1000 / 21 s = 1.95.
    assert "status floor 1.95" in text and "status floor 41.0 ms" in text
    assert "is 1.8x / 1.2x: storing a component and saying Ready" in text
    assert "already misses 1.5x on this machine at the p50." in text


def test_a_status_floor_under_the_target_is_not_called_a_miss() -> None:
    row = _with_status_floor(_row(3.2, 1.3), 1.4, 1.2)
    (_, text) = _report()._why_ratio_not_met(row, 2)
    assert "is 1.4x / 1.2x." in text and "misses" not in text


def test_the_floor_table_shows_the_status_floor_beside_the_floor() -> None:
    report = _report()
    row = {
        **_with_status_floor(_row(3.2, 1.3), 1.8, 1.2),
        "ratio_to_floor": {"p50": 2.5, "p99": 2.0},
        "ratio_to_status_floor": {"p50": 1.9, "p99": 1.6},
    }
    without = {**_row(3.2, 1.3), "ratio_to_floor": {"p50": 2.5, "p99": 2.0}}
    lines = report._floor_table([row, without])
    assert (
        "| 1000 | 0.050 | 0.150 | 1.3 | 1.3 | 0.060 | 0.180 | 1.8 | 1.2 | 2.5 | 2.0 | 1.9 | 1.6 |"
        in lines
    )
    # A run from before the status floor existed renders with its cells empty.
    assert "| 1000 | 0.050 | 0.150 | 1.3 | 1.3 | — | — | — | — | 2.5 | 2.0 | — | — |" in lines


def test_a_met_ratio_or_a_smaller_batch_carries_no_reason() -> None:
    report = _report()
    assert report._why_ratio_not_met(_row(1.4, 1.2), 2) == []
    small = {**_row(3.2, 1.7), "components": 100}
    assert report._why_ratio_not_met(small, 2) == []


def _kv(ratios: list[tuple[str, int, float, float]]) -> dict[str, Any]:
    return {
        "target_ratio": 1.05,
        "results": [
            {"data": data, "size": size, "ratio_put_p50": put, "ratio_get_p50": get}
            for data, size, put, get in ratios
        ],
    }


def test_kv_names_every_row_over_the_target_and_only_those() -> None:
    report = _report()
    (text, _) = report._why_kv_not_met(
        _kv([("config", 1024, 1.02, 1.07), ("random", 16384, 1.09, 1.04)])
    )
    assert "config 1 KiB get 1.07" in text and "random 16 KiB put 1.09" in text
    assert "config 1 KiB put" not in text and "random 16 KiB get" not in text
    assert report._why_kv_not_met(_kv([("config", 1024, 1.0, 1.05)])) == []


def test_restart_trials_that_never_finished_are_a_miss_beside_the_target() -> None:
    report = _report()
    failed = {"restart_trials": [], "restart_trials_failed": "timed out waiting for rs-0"}
    text = "\n".join(report._restart_lines(failed))
    assert "**NOT met**: no trial finished (timed out waiting for rs-0" in text
    trial = {
        "detection_after_death_seconds": 2.5,
        "restart_after_detection_seconds": 0.03,
        "restart_after_death_seconds": 2.53,
    }
    done = {"restart_trials": [trial], "restart_target_met": True}
    text = "\n".join(report._restart_lines(done))
    assert "| 0 | 2.50 | 0.03 | 2.53 |" in text and "**met**" in text
    # A run told to make no trial claims nothing either way.
    assert report._restart_lines({"restart_trials": []}) == []


def test_the_bench_writes_the_references_under_the_names_the_report_reads() -> None:
    bench = bench_module("bench_operator")
    row: dict[str, Any] = {
        "components": 1000,
        "create_to_ready_seconds": {"p50": 0.3, "p99": 0.6},
    }
    base = _batch(26.0, 13.0, 0.1)
    bench.with_baseline(row, base)
    bench.with_reference(row, base, _batch(38.0, 19.0, 0.15), "floor")
    bench.with_reference(row, base, _batch(41.0, 21.0, 0.2), "status_floor")
    assert row["status_floor_ratio_to_baseline"]["p50"] == 2.0
    assert row["ratio_to_floor"]["p50"] == 2.0
    lines = _report()._floor_table([row])
    assert (
        "| 1000 | 0.150 | 0.450 | 1.5 | 1.5 | 0.200 | 0.600 | 2.0 | 2.0 | 2.0 | 1.3 | 1.5 | 1.0 |"
        in lines
    )
