from __future__ import annotations

import io
import json
import logging

from defender_agent._logging import configure_logging


def test_json_lines_with_extra_fields() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging("INFO", static={"component": "sniffer"}, stream=stream)
        log = logging.getLogger("defender_agent.test")
        log.info("wrote version %d", 7, extra={"config_version": 7})
        log.debug("not shown")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("failed")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 2
    assert lines[0]["message"] == "wrote version 7"
    assert lines[0]["config_version"] == 7
    assert lines[0]["component"] == "sniffer"
    assert lines[0]["level"] == "INFO"
    assert "RuntimeError: boom" in lines[1]["exception"]
