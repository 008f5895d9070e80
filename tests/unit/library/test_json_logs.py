"""The one JSON log format: exactly time, level, logger, message, the object as {namespace,
name}, our own extras and the exception; kopf's per-object plumbing never reaches a line."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import kopf
import pytest
from kopf._cogs.structs.bodies import Body
from kopf._core.actions.loggers import LocalObjectLogger

from defender_config import JsonLogFormatter


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLogFormatter())
    log = logging.getLogger("kopf.objects")
    saved = (log.handlers[:], log.level, log.propagate)
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG)
    log.propagate = False
    try:
        yield log, stream
    finally:
        log.handlers[:], log.level, log.propagate = saved


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_kopf_per_object_line_keeps_the_fields_and_the_object_only(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    _, stream = captured
    body = Body(
        {
            "apiVersion": "mldefender.io/v1alpha1",
            "kind": "DefenderComponent",
            "metadata": {"namespace": "default", "name": "sniffer", "uid": "u-1"},
        }
    )
    # kopf's own adapter, as handlers receive it: it adds settings, k8s_skip and k8s_ref.
    LocalObjectLogger(body=body, settings=kopf.OperatorSettings()).info("Handler 'x' succeeded.")
    (doc,) = lines(stream)
    assert set(doc) == {"time", "level", "logger", "message", "object"}
    assert doc["object"] == {"namespace": "default", "name": "sniffer"}
    assert doc["message"] == "Handler 'x' succeeded." and doc["level"] == "INFO"
    assert len(stream.getvalue()) < 200, stream.getvalue()


def test_a_cluster_scoped_object_has_no_namespace(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    _, stream = captured
    body = Body({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}})
    LocalObjectLogger(body=body, settings=kopf.OperatorSettings()).warning("x")
    assert lines(stream)[0]["object"] == {"name": "node-a"}


def test_our_extras_static_fields_and_exceptions_stay() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLogFormatter(static={"component": "firewall"}))
    log = logging.getLogger("defender_config.test_json_logs")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        log.info("failover %s", "a", extra={"event": "failover", "attempt": 2})
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    first, second = lines(stream)
    assert set(first) == {"time", "level", "logger", "message", "component", "event", "attempt"}
    assert first["attempt"] == 2 and first["component"] == "firewall"
    assert "RuntimeError: boom" in str(second["exception"])
