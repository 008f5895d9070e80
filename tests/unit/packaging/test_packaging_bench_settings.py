"""The operator benchmark measures the operator as shipped: every setting the end-to-end harness
speeds up (a 1 s monitor interval, say) is put back to the operator's default. Session 21's
measurements ran with the harness's 1 s interval while the report said "default settings"."""

from __future__ import annotations

import os
from types import ModuleType

import pytest
from bench_modules import bench_module

from defender_operator._settings import OperatorSettings


def _bench_operator() -> ModuleType:
    return bench_module("bench_operator")


def test_the_bench_puts_back_the_default_of_every_setting_the_harness_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bench = _bench_operator()
    from operator_e2e_support import E2E_SETTINGS

    env = bench.operator_defaults()
    assert set(env) == set(E2E_SETTINGS)
    assert float(env["DEFENDER_OPERATOR_MONITOR_INTERVAL_SECONDS"]) == 30.0
    # The values, read back as the operator reads its env, are its defaults.
    for var in list(os.environ):
        if var.startswith("DEFENDER_"):
            monkeypatch.delenv(var)
    shipped = OperatorSettings().model_dump()
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert OperatorSettings().model_dump() == shipped
    # And the harness's own values are not (otherwise this test could not tell them apart).
    for var, value in E2E_SETTINGS.items():
        monkeypatch.setenv(var, value)
    assert OperatorSettings().model_dump() != shipped
