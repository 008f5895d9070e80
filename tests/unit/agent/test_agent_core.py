from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from defender_agent import NoReload, SignalReloader
from defender_agent._core import ConfigApplier, render_config
from defender_config import AuthenticationFailedError, UnknownKeyError
from defender_devcluster import wait_for

Spawn = Callable[[str], tuple[subprocess.Popen[bytes], Path]]

SNIFFER = {
    "node_id": "sniffer-01",
    "version": "1.0.0",
    "interface": "eth0",
}


class RecordingSink:
    """Collects what the applier reports (the real sink writes etcd; that is tested e2e)."""

    def __init__(self) -> None:
        self.heartbeat: dict[str, Any] = {}
        self.alerts: list[tuple[str, str]] = []

    def update_heartbeat(self, **fields: Any) -> None:
        self.heartbeat.update(fields)

    def alert(self, kind: str, detail: str) -> None:
        self.alerts.append((kind, detail))


class BrokenSink(RecordingSink):
    def alert(self, kind: str, detail: str) -> None:
        raise RuntimeError("etcd is down")


def applier(tmp_path: Path, sink: RecordingSink, reloader: Any = None, **kw: Any) -> ConfigApplier:
    return ConfigApplier(
        component="demo",
        component_type=kw.pop("component_type", "custom"),
        output_path=tmp_path / "demo.json",
        reloader=reloader or NoReload(),
        sink=sink,
        **kw,
    )


def test_valid_config_is_written_and_reported(tmp_path: Path) -> None:
    sink = RecordingSink()
    a = applier(tmp_path, sink)
    assert a.apply({"b": 1, "a": [1, 2]}, version=3)
    assert json.loads((tmp_path / "demo.json").read_text()) == {"b": 1, "a": [1, 2]}
    assert sink.heartbeat["config_version"] == 3
    assert len(sink.heartbeat["config_digest"]) == 64
    assert sink.alerts == []
    assert a.last_error is None


def test_custom_without_schema_needs_an_object(tmp_path: Path) -> None:
    sink = RecordingSink()
    a = applier(tmp_path, sink)
    assert a.apply({"ok": True}, version=1)
    assert not a.apply(["not", "an", "object"], version=2)
    assert json.loads((tmp_path / "demo.json").read_text()) == {"ok": True}
    assert sink.heartbeat["last_error"]["reason"] == "ConfigInvalid"
    assert sink.heartbeat["config_version"] == 1
    assert [kind for kind, _ in sink.alerts] == ["ConfigInvalid"]
    assert "version 2" in sink.alerts[0][1]


def test_schema_for_custom(tmp_path: Path) -> None:
    schema = {"type": "object", "required": ["port"], "properties": {"port": {"type": "integer"}}}
    sink = RecordingSink()
    a = applier(tmp_path, sink, json_schema=schema)
    assert a.apply({"port": 80}, version=1)
    assert not a.apply({"port": "eighty"}, version=2)
    assert json.loads((tmp_path / "demo.json").read_text()) == {"port": 80}
    assert "port" in sink.heartbeat["last_error"]["detail"]


def test_typed_component_uses_library_model(tmp_path: Path) -> None:
    sink = RecordingSink()
    a = applier(tmp_path, sink, component_type="sniffer")
    good = dict(SNIFFER)
    assert a.apply(good, version=1), sink.heartbeat.get("last_error")
    assert not a.apply({**good, "no_such_field": 1}, version=2)
    assert json.loads((tmp_path / "demo.json").read_text()) == good


def test_decode_error_keeps_file_and_alerts_once(tmp_path: Path) -> None:
    sink = RecordingSink()
    a = applier(tmp_path, sink)
    a.apply({"v": 1}, version=1)
    before = (tmp_path / "demo.json").read_bytes()
    err = UnknownKeyError("k-new", ["k-old"], path="/p/components/demo/active_config")
    a.reject(err, version=2)
    a.reject(err, version=2)  # the same failure again (e.g. a watch resync)
    assert (tmp_path / "demo.json").read_bytes() == before
    assert sink.heartbeat["last_error"]["reason"] == "UnknownKey"
    assert [kind for kind, _ in sink.alerts] == ["UnknownKey"]
    a.reject(AuthenticationFailedError("/p/x", "k-old"), version=3)
    assert [kind for kind, _ in sink.alerts] == ["UnknownKey", "AuthenticationFailed"]
    # A later good config clears the error.
    assert a.apply({"v": 4}, version=4)
    assert sink.heartbeat["last_error"] is None
    assert a.last_error is None


def test_unexpected_exception_is_internal_error(tmp_path: Path) -> None:
    sink = RecordingSink()
    a = applier(tmp_path, sink)
    a.reject(RuntimeError("surprise"))
    assert sink.heartbeat["last_error"] == {"reason": "InternalError", "detail": "surprise"}


def test_alert_failure_does_not_stop_delivery(tmp_path: Path) -> None:
    sink = BrokenSink()
    a = applier(tmp_path, sink)
    a.reject(RuntimeError("x"))
    assert a.apply({"v": 1}, version=1)
    assert (tmp_path / "demo.json").exists()


def test_write_failure_is_reported(tmp_path: Path) -> None:
    sink = RecordingSink()
    a = ConfigApplier(
        component="demo",
        component_type="custom",
        output_path=tmp_path / "missing-dir" / "demo.json",
        reloader=NoReload(),
        sink=sink,
    )
    assert not a.apply({"v": 1}, version=1)
    assert sink.heartbeat["last_error"]["reason"] == "WriteFailed"
    assert sink.alerts[0][0] == "WriteFailed"


def test_reload_only_when_bytes_change(
    tmp_path: Path, spawn_named: Spawn, unique_name: str
) -> None:
    _, marker = spawn_named(unique_name)
    sink = RecordingSink()
    a = applier(tmp_path, sink, reloader=SignalReloader(signal.SIGHUP, process_name=unique_name))
    a.apply({"v": 1}, version=1)
    wait_for("the first SIGHUP", lambda: marker.read_text() == "1", timeout=10)
    a.apply({"v": 1}, version=1)  # same bytes: no second signal
    a.apply({"v": 2}, version=2)
    wait_for("the second SIGHUP", lambda: marker.read_text() == "2", timeout=10)
    assert a.last_error is None


def test_reload_failure_is_retried_until_the_process_appears(
    tmp_path: Path, spawn_named: Spawn, unique_name: str
) -> None:
    sink = RecordingSink()
    a = applier(tmp_path, sink, reloader=SignalReloader(signal.SIGHUP, process_name=unique_name))
    assert a.apply({"v": 1}, version=1)  # the file is written even though nobody is there
    assert json.loads((tmp_path / "demo.json").read_text()) == {"v": 1}
    assert sink.heartbeat["last_error"]["reason"] == "ProcessNotFound"
    assert a.reload_pending
    assert not a.retry()
    assert [kind for kind, _ in sink.alerts] == ["ProcessNotFound"]  # not re-alerted
    _, marker = spawn_named(unique_name)
    assert a.retry()
    wait_for("the first SIGHUP", lambda: marker.read_text() == "1", timeout=10)
    assert sink.heartbeat["last_error"] is None


def test_render_is_json_with_trailing_newline() -> None:
    assert render_config({"a": 1}) == b'{\n  "a": 1\n}\n'
    with pytest.raises(ValueError):
        render_config({"a": float("nan")})


def traced_peak(render: Callable[[], bytes]) -> tuple[bytes, int]:
    tracemalloc.start()
    try:
        out = render()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


SMALL_VALUES = {
    "numbers": {"v": list(range(100_000))},
    "nested": {"v": [{"a": {"b": i}} for i in range(25_000)]},
    "unicode": {"v": [f"ü{i}" for i in range(50_000)]},
}


@pytest.mark.parametrize("config", list(SMALL_VALUES.values()), ids=list(SMALL_VALUES))
def test_the_indented_render_takes_about_its_own_size_in_memory(config: dict[str, Any]) -> None:
    # json.dumps with an indent joins a list of every chunk first: 7-10x its output for small
    # values, half of the agent's peak (docs/agent.md, Memory).
    out, peak = traced_peak(lambda: render_config(config))
    assert out == (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode()
    assert peak < 2 * len(out), (peak, len(out))


def test_a_render_over_the_cap_stops_early_and_comes_out_compact() -> None:
    config = SMALL_VALUES["numbers"]
    compact = (json.dumps(config, separators=(",", ":")) + "\n").encode()
    _, compact_peak = traced_peak(lambda: json.dumps(config, separators=(",", ":")).encode())
    out, peak = traced_peak(lambda: render_config(config, len(compact)))
    assert out == compact
    # What the compact encoder itself takes, and no more than the part of the indented form
    # up to the cap; the whole indented form's chunk list (~7x its size) is never built.
    assert peak < compact_peak + len(compact) // 2, (peak, compact_peak, len(compact))


def test_a_value_not_representable_as_utf8_is_a_value_error_indented_or_compact() -> None:
    config = {"v": ["ok", "\ud800"]}  # a lone surrogate: JSON parsers let it through
    with pytest.raises(ValueError):
        render_config(config)
    with pytest.raises(ValueError):
        render_config(config, 5)


def test_non_json_numbers_are_rejected_not_crashing(tmp_path: Path) -> None:
    sink = RecordingSink()
    a = applier(tmp_path, sink)
    assert not a.apply({"a": float("nan")}, version=1)
    assert sink.heartbeat["last_error"]["reason"] == "ConfigInvalid"
    assert not (tmp_path / "demo.json").exists()


def test_type_from_metadata_when_not_set(tmp_path: Path) -> None:
    sink = RecordingSink()
    a = ConfigApplier(
        component="demo",
        component_type=None,
        output_path=tmp_path / "demo.json",
        reloader=NoReload(),
        sink=sink,
    )
    assert a.apply(dict(SNIFFER), version=1, component_type="sniffer")
    assert not a.apply({**SNIFFER, "bogus": 1}, version=2, component_type="sniffer")
    assert not a.apply(dict(SNIFFER), version=3, component_type="toaster")
    assert "toaster" in sink.heartbeat["last_error"]["detail"]
    # The agent's own type wins over the stored one.
    b = applier(tmp_path, RecordingSink(), component_type="sniffer")
    assert not b.apply({"free": "form"}, version=1, component_type="custom")


def test_missing_process_within_grace_is_not_an_error(
    tmp_path: Path, spawn_named: Spawn, unique_name: str
) -> None:
    sink = RecordingSink()
    a = applier(
        tmp_path,
        sink,
        reloader=SignalReloader(signal.SIGHUP, process_name=unique_name),
        process_grace_seconds=0.5,
    )
    assert a.apply({"v": 1}, version=1)
    assert a.reload_pending
    assert a.last_error is None and sink.alerts == []
    wait_for(
        "the retry to give up past the grace period",
        lambda: not a.retry() and a.last_error is not None,
        timeout=5,
    )
    assert a.last_error is not None and a.last_error.reason == "ProcessNotFound"
    _, marker = spawn_named(unique_name)
    assert a.retry()
    wait_for("the first SIGHUP", lambda: marker.read_text() == "1", timeout=10)
    assert a.last_error is None


def test_http_reload_failure_is_reported_but_file_is_new(tmp_path: Path) -> None:
    import socket

    from defender_agent import HttpReloader

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    sink = RecordingSink()
    reloader = HttpReloader(f"http://127.0.0.1:{port}/-/reload", retries=1, backoff_seconds=0)
    a = applier(tmp_path, sink, reloader=reloader)
    assert a.apply({"v": 1}, version=1)
    assert json.loads((tmp_path / "demo.json").read_text()) == {"v": 1}
    assert sink.heartbeat["last_error"]["reason"] == "HttpReloadFailed"
    assert a.reload_pending


def test_already_alerted_errors_only_reach_the_heartbeat(tmp_path: Path) -> None:
    sink = RecordingSink()
    a = applier(tmp_path, sink)
    a.reject(UnknownKeyError("k2", ["k1"]), version=2, alerted=True)
    assert sink.heartbeat["last_error"]["reason"] == "UnknownKey"
    assert sink.alerts == []


@pytest.mark.parametrize("planted", ["fifo", "link-to-fifo", "link-to-dev-zero"])
def test_a_fifo_or_device_planted_at_the_output_path_is_replaced(
    tmp_path: Path, planted: str
) -> None:
    # The component's container can write the shared volume. What it leaves at the path must
    # neither block the agent (a FIFO's open waits for a writer for ever) nor exhaust its memory
    # (/dev/zero never ends): the agent replaces the entry with the config.
    target = tmp_path / "demo.json"
    if planted == "fifo":
        os.mkfifo(target)
    elif planted == "link-to-fifo":
        os.mkfifo(tmp_path / "pipe")
        target.symlink_to(tmp_path / "pipe")
    else:
        target.symlink_to("/dev/zero")
    sink = RecordingSink()
    a = applier(tmp_path, sink)
    done: list[bool] = []
    worker = threading.Thread(target=lambda: done.append(a.apply({"ok": True}, version=1)))
    worker.daemon = True  # a regression hangs in the FIFO; the test must fail, not hang
    worker.start()
    worker.join(10)
    assert done == [True], "apply() blocked on what the component planted"
    assert not target.is_symlink()
    assert json.loads(target.read_text()) == {"ok": True}


def test_keyring_mount_back_unchanged_clears_keyring_invalid(tmp_path: Path) -> None:
    # The keyring Secret disappears for a moment (deleted and re-created, a bad edit undone)
    # and comes back with the same keys: the agent stops reporting KeyringInvalid at once,
    # not only when the next config happens to be delivered.
    import shutil

    from defender_agent import load_agent_settings
    from defender_agent._agent import Agent
    from defender_config import Keyring, LibrarySettings

    mount = tmp_path / "keyring"
    mount.mkdir()
    content = Keyring.generate().to_json()
    (mount / "keyring.json").write_bytes(content)
    settings = load_agent_settings(
        ["--component", "demo", "--instance", "demo-0", "--reload-method", "none",
         "--output-path", str(tmp_path / "demo.json"), "--keyring-path", str(mount)]
    )  # fmt: skip
    agent = Agent(settings, LibrarySettings(keyring_path=mount, keyring_poll_seconds=0.01))
    agent.keyring = agent._open_keyring()
    assert agent.keyring is not None
    sink: dict[str, Any] = {}
    agent._pending_fields = sink  # what the heartbeat would carry (no etcd here)

    shutil.rmtree(mount)
    agent.keyring.refresh()
    assert agent.applier.last_error is not None
    assert agent.applier.last_error.reason == "KeyringInvalid"
    assert sink["last_error"].reason == "KeyringInvalid"

    mount.mkdir()
    (mount / "keyring.json").write_bytes(content)
    agent.keyring.refresh()
    assert agent.applier.last_error is None
    assert sink["last_error"] is None


def test_a_rejected_config_s_values_reach_no_log_heartbeat_or_alert(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The config is sealed in etcd; the heartbeat and the alert are plaintext there, and logs
    # are shipped elsewhere: an agent-side schema that rejects a value must not quote it.
    schema = {"type": "object", "properties": {"api_token": {"pattern": "^tok-[0-9]+$"}}}
    sink = RecordingSink()
    a = applier(tmp_path, sink, json_schema=schema)
    with caplog.at_level("DEBUG"):
        assert not a.apply({"api_token": "hunter2-s3cret"}, version=2)
    assert sink.heartbeat["last_error"]["reason"] == "ConfigInvalid"
    assert "api_token: the value does not match" in sink.heartbeat["last_error"]["detail"]
    shown = [json.dumps(sink.heartbeat["last_error"]), *(d for _, d in sink.alerts), caplog.text]
    assert not [text for text in shown if "hunter2" in text]


def test_a_failed_write_is_retried_until_the_volume_is_back(tmp_path: Path) -> None:
    # The shared volume is not mounted yet (or full, or read-only) when a config arrives: the
    # agent writes it as soon as it can, without waiting for another commit.
    late = tmp_path / "late"
    sink = RecordingSink()
    a = ConfigApplier(
        component="demo",
        component_type="custom",
        output_path=late / "demo.json",
        reloader=NoReload(),
        sink=sink,
    )
    assert not a.apply({"v": 5}, version=5)
    assert sink.heartbeat["last_error"]["reason"] == "WriteFailed"
    assert a.pending
    assert not a.retry()  # still no volume: reported once, not every tick
    assert [kind for kind, _ in sink.alerts] == ["WriteFailed"]
    late.mkdir()
    assert a.retry()
    assert json.loads((late / "demo.json").read_text()) == {"v": 5}
    assert sink.heartbeat["config_version"] == 5
    assert sink.heartbeat["last_error"] is None
    assert not a.pending


# --- the shared volume's size ------------------------------------------------------------------


def _volume_full_after(monkeypatch: pytest.MonkeyPatch, room: list[int]) -> None:
    """The shared volume takes ``room[0]`` more bytes, then every write fails with ENOSPC, as
    a memory-backed emptyDir at its sizeLimit does (the kubelet sizes its tmpfs to the limit)."""
    import errno
    import io

    from defender_config import _files

    real_fdopen = os.fdopen

    class Tmpfs(io.FileIO):
        def write(self, data: Any) -> int:
            if len(data) > room[0]:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            room[0] -= len(data)
            return super().write(data)

    def fdopen(fd: int, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if mode == "wb":
            return Tmpfs(fd, "wb")
        return real_fdopen(fd, mode, *args, **kwargs)

    monkeypatch.setattr(_files.os, "fdopen", fdopen)


def test_a_full_volume_is_a_write_failure_retried_with_the_old_file_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    sink = RecordingSink()
    a = applier(tmp_path, sink)
    assert a.apply({"v": 1}, version=1)
    old = (tmp_path / "demo.json").read_bytes()
    room = [0]
    _volume_full_after(monkeypatch, room)
    big = {"v": 2, "blob": "x" * 4096}
    assert not a.apply(big, version=2)  # never raises
    assert (tmp_path / "demo.json").read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.json"]  # no temporary file left
    error = sink.heartbeat["last_error"]
    assert error["reason"] == "WriteFailed"
    assert "No space left on device" in error["detail"] and "not full" in error["detail"]
    assert [kind for kind, _ in sink.alerts] == ["WriteFailed"]
    assert sink.heartbeat["config_version"] == 1
    assert a.pending
    assert not a.retry() and not a.retry()  # retried every tick, reported once
    assert [kind for kind, _ in sink.alerts] == ["WriteFailed"]
    room[0] = 1 << 20  # the component deleted its own files from the volume
    assert a.retry()
    assert json.loads((tmp_path / "demo.json").read_text()) == big
    assert sink.heartbeat["config_version"] == 2
    assert sink.heartbeat["last_error"] is None
    assert not a.pending


def test_a_file_over_the_cap_is_written_compact_or_refused(tmp_path: Path) -> None:
    # Indentation makes a deep config's file many times its decoded size; the volume is sized
    # for two files of the cap, so the file never exceeds it.
    deep: Any = list(range(50))
    for _ in range(40):
        deep = [deep]
    config = {"deep": deep}
    indented, compact = render_config(config), render_config(config, len(render_config(config)) - 1)
    assert len(indented) > 20 * len(compact)
    assert json.loads(compact) == config and b"\n " not in compact
    sink = RecordingSink()
    a = applier(tmp_path, sink, max_file_bytes=len(compact))
    assert a.apply(config, version=1)
    assert (tmp_path / "demo.json").read_bytes() == compact
    too_big = {"deep": deep, "more": "x" * 10}
    assert not a.apply(too_big, version=2)
    assert (tmp_path / "demo.json").read_bytes() == compact
    assert sink.heartbeat["last_error"]["reason"] == "ConfigTooLarge"
    assert f"cap of {len(compact)} bytes" in sink.heartbeat["last_error"]["detail"]
    assert not a.pending  # the same config would be as large again: nothing to retry
    assert render_config({"v": 1}, 1 << 20) == render_config({"v": 1})  # small stays indented


def test_the_agent_caps_its_file_at_the_librarys_cap() -> None:
    from defender_agent._core import DEFAULT_MAX_FILE_BYTES
    from defender_config import EnvelopeOptions

    assert EnvelopeOptions().max_decompressed_bytes == DEFAULT_MAX_FILE_BYTES


def test_the_agent_takes_its_file_cap_from_the_library_settings(tmp_path: Path) -> None:
    # A store that accepts larger values (envelope.max_decompressed_bytes raised, with the
    # chart's sharedSizeLimit) lets the agent write a larger file too, and a lower cap caps it.
    from defender_agent import load_agent_settings
    from defender_agent._agent import Agent
    from defender_config import EnvelopeOptions, LibrarySettings

    settings = load_agent_settings(
        ["--component", "demo", "--instance", "demo-0", "--reload-method", "none",
         "--output-path", str(tmp_path / "demo.json")]
    )  # fmt: skip
    library = LibrarySettings(envelope=EnvelopeOptions(encrypt=False, max_decompressed_bytes=64))
    agent = Agent(settings, library)
    assert not agent.applier.apply({"blob": "x" * 100}, version=1)
    assert agent.applier.last_error is not None
    assert agent.applier.last_error.reason == "ConfigTooLarge"
    assert not (tmp_path / "demo.json").exists()


class CountingReloader:
    def __init__(self) -> None:
        self.calls = 0

    def reload(self) -> str:
        self.calls += 1
        return "counted"


def test_a_write_whose_directory_flush_failed_still_reloads_the_component(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only the directory flush failed (EIO; or the agent may write the directory but not open it
    # for reading, mode 0333): the rename happened, the new file is in place. The retry finds
    # the file already holding the config; the component must still be told, or it runs the
    # old config while the heartbeat reports the new one as delivered.
    import errno
    import stat

    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    sink = RecordingSink()
    reloader = CountingReloader()
    a = applier(tmp_path, sink, reloader=reloader)
    assert a.apply({"v": 1}, version=1)
    assert reloader.calls == 1
    monkeypatch.setattr(os, "fsync", fsync)
    assert not a.apply({"v": 2}, version=2)
    assert json.loads((tmp_path / "demo.json").read_text()) == {"v": 2}  # renamed in place
    assert sink.heartbeat["last_error"]["reason"] == "WriteFailed"
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert a.retry()
    assert sink.heartbeat["config_version"] == 2
    assert sink.heartbeat["last_error"] is None
    assert reloader.calls == 2, "the component was never told about version 2"


def test_a_hand_edited_file_is_put_back_reloaded_and_reported(tmp_path: Path) -> None:
    sink, reloader = RecordingSink(), CountingReloader()
    now = [1000.0]
    a = applier(tmp_path, sink, reloader, drift_alert_window=300, clock=lambda: now[0])
    assert a.apply({"level": "low"}, version=4)
    path = tmp_path / "demo.json"
    delivered = path.read_bytes()
    assert reloader.calls == 1
    assert a.check_file() is False  # intact: nothing to do
    # Same size, new content: what a hand edit of one value looks like.
    path.write_bytes(delivered.replace(b"low", b"off"))
    assert a.check_file() is True
    assert path.read_bytes() == delivered
    assert reloader.calls == 2
    assert sink.heartbeat["last_error"]["reason"] == "FileDrifted"
    assert "version 4" in sink.heartbeat["last_error"]["detail"]
    assert "off" not in sink.heartbeat["last_error"]["detail"]  # never the file's values
    assert [kind for kind, _ in sink.alerts] == ["FileDrifted"]
    assert sink.heartbeat["config_version"] == 4
    # Intact, but a drift was put back less than a window ago: still reported.
    now[0] += 299
    assert a.check_file() is False
    assert sink.heartbeat["last_error"]["reason"] == "FileDrifted"
    # A whole window without a drift: the next check that finds the file intact clears it.
    now[0] += 1
    assert a.check_file() is False
    assert a.last_error is None and sink.heartbeat["last_error"] is None
    assert reloader.calls == 2


def test_a_new_config_clears_a_drift_still_reported(tmp_path: Path) -> None:
    sink = RecordingSink()
    a = applier(tmp_path, sink, drift_alert_window=300, clock=lambda: 0.0)
    assert a.apply({"a": 1}, version=1)
    (tmp_path / "demo.json").write_text("{}\n")
    assert a.check_file() is True
    assert sink.heartbeat["last_error"]["reason"] == "FileDrifted"
    assert a.apply({"a": 2}, version=2)
    assert sink.heartbeat["last_error"] is None and sink.heartbeat["config_version"] == 2


class HeartbeatLike(RecordingSink):
    """Counts what the library's heartbeater does with each update: it wakes its thread, which
    asks etcd (a lease refresh at least), and puts the record when a field changed."""

    def __init__(self) -> None:
        super().__init__()
        self.updates = 0
        self.puts = 0

    def update_heartbeat(self, **fields: Any) -> None:
        self.updates += 1
        if any(self.heartbeat.get(k, object()) != v for k, v in fields.items()):
            self.puts += 1
        super().update_heartbeat(**fields)


@pytest.mark.parametrize(
    "edit_every",
    [
        0.1,  # a tool rewriting the file in a tight loop: a drift at every check
        2.0,  # every other check: each drift was set, then cleared at the next check
        7.0,
    ],
)
def test_a_storm_of_edits_costs_two_record_updates_per_window_and_a_reload_per_check(
    tmp_path: Path, edit_every: float
) -> None:
    # 600 checks (one a second, as the main loop does) while something rewrites the file,
    # then 400 quiet ones. Counts, not time: the clock is the test's.
    sink, reloader = HeartbeatLike(), CountingReloader()
    now = [0.0]
    a = applier(tmp_path, sink, reloader, drift_alert_window=300, clock=lambda: now[0])
    assert a.apply({"a": 1}, version=1)
    path = tmp_path / "demo.json"
    delivered = path.read_bytes()
    sink.updates = sink.puts = reloader.calls = 0
    put_backs, edits, next_edit = 0, 0, 0.05
    for tick in range(1, 1001):
        while tick <= 600 and next_edit < tick:
            path.write_text(f'{{"a": "edit {edits}"}}\n')
            edits += 1
            next_edit += edit_every
        now[0] = float(tick)
        put_backs += a.check_file()
        # What the component is told to load is the delivered config, every time.
        assert path.read_bytes() == delivered
    assert put_backs > 0
    # A reload per put-back (the component may have read the edit), a put-back at most per
    # check, whatever the rate of edits.
    assert reloader.calls == put_backs <= 600
    # The record: FileDrifted once when the drifts start, cleared once a whole window after the
    # last one; before, every drift was an update (an etcd request), and an edit every other
    # second two puts per drift (600 updates and puts in 600 s).
    assert (sink.updates, sink.puts) == (2, 2)
    assert a.last_error is None and sink.heartbeat["last_error"] is None
    assert sink.heartbeat["config_version"] == 1
    assert [kind for kind, _ in sink.alerts] == ["FileDrifted"] * 3  # at 1 s, 301 s, 601 s


def test_a_storm_of_edits_logs_a_few_lines_per_window_not_several_per_check(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Something rewrites the file at every check for 600 s (a check a second), then stops.
    sink, reloader = RecordingSink(), CountingReloader()
    now = [0.0]
    a = applier(tmp_path, sink, reloader, drift_alert_window=300, clock=lambda: now[0])
    assert a.apply({"a": 1}, version=1)
    path = tmp_path / "demo.json"
    caplog.clear()
    put_backs = 0
    with caplog.at_level(logging.DEBUG, logger="defender_agent"):
        for tick in range(1, 1001):
            if tick <= 600:
                path.write_text(f'{{"a": "edit {tick}"}}\n')
            now[0] = float(tick)
            put_backs += a.check_file()
    assert put_backs == 600
    shown = [r for r in caplog.records if r.levelno >= logging.INFO]
    # Per window: the first put-back (warning, reload), then the window's summary with its
    # alert; and the recovery once a window passed without a drift. Was 3 lines per check.
    assert len(shown) <= 8, [r.getMessage() for r in shown]
    summaries = [r.getMessage() for r in shown if "put back" in r.getMessage()]
    assert len(summaries) == 2  # at 301 s and 601 s, each counting the window's put-backs
    # 301 s: the 299 held since 1 s and the one found then; 601 s: the 299 held since 301 s.
    assert "put back 300 times" in summaries[0] and "put back 299 times" in summaries[1]
    assert all(r.levelno == logging.WARNING for r in shown if "put back" in r.getMessage())
    # Nothing is lost: every put-back is still a line at debug.
    drifted = [r for r in caplog.records if r.funcName == "_check_file"]
    assert len(drifted) == 600
    assert [kind for kind, _ in sink.alerts] == ["FileDrifted"] * 3


def test_a_removed_or_replaced_file_is_put_back(tmp_path: Path) -> None:
    sink, reloader = RecordingSink(), CountingReloader()
    a = applier(tmp_path, sink, reloader)
    assert a.apply({"a": 1}, version=1)
    path = tmp_path / "demo.json"
    delivered = path.read_bytes()
    path.unlink()
    assert a.check_file() is True
    assert path.read_bytes() == delivered
    path.unlink()
    path.symlink_to(tmp_path / "elsewhere.json")
    assert a.check_file() is True
    assert not path.is_symlink() and path.read_bytes() == delivered
    assert reloader.calls == 3


def test_a_touched_file_with_the_same_bytes_is_not_written_or_reloaded(tmp_path: Path) -> None:
    sink, reloader = RecordingSink(), CountingReloader()
    a = applier(tmp_path, sink, reloader)
    assert a.apply({"a": 1}, version=1)
    path = tmp_path / "demo.json"
    inode = path.stat().st_ino
    os.utime(path, ns=(1, 1))
    assert a.check_file() is False
    assert path.stat().st_ino == inode and reloader.calls == 1 and a.last_error is None


def test_the_steady_state_check_reads_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One lstat per check; the content is read only when the stat changed.
    import defender_agent._core as core

    a = applier(tmp_path, RecordingSink())
    assert a.apply({"a": 1}, version=1)
    reads: list[Path] = []
    real = core.file_holds

    def counting(path: Path, data: bytes, **kw: Any) -> bool:
        reads.append(path)
        return real(path, data, **kw)

    monkeypatch.setattr(core, "file_holds", counting)
    for _ in range(50):
        assert a.check_file() is False
    assert reads == []
    os.utime(tmp_path / "demo.json", ns=(5, 5))
    assert a.check_file() is False
    assert len(reads) == 1


def test_a_failed_write_back_is_write_failed_and_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import defender_agent._core as core
    from defender_agent._errors import WriteError

    sink, reloader = RecordingSink(), CountingReloader()
    a = applier(tmp_path, sink, reloader)
    assert a.apply({"a": 1}, version=2)
    path = tmp_path / "demo.json"
    delivered = path.read_bytes()
    path.write_text('{"a": 2}\n')
    real = core.write_atomic

    def full(*args: Any, **kw: Any) -> None:
        raise WriteError(str(path), "No space left on device")

    monkeypatch.setattr(core, "write_atomic", full)
    assert a.check_file() is True
    assert sink.heartbeat["last_error"]["reason"] == "WriteFailed"
    assert a.pending
    monkeypatch.setattr(core, "write_atomic", real)
    assert a.retry() is True
    assert path.read_bytes() == delivered
    assert reloader.calls == 2 and a.last_error is None


def test_nothing_is_checked_before_a_config_was_delivered(tmp_path: Path) -> None:
    a = applier(tmp_path, RecordingSink())
    assert a.check_file() is False
    assert not (tmp_path / "demo.json").exists()


@pytest.mark.parametrize(
    ("flag", "restored"), [([], True), (["--restore-edited-file", "false"], False)]
)
def test_the_main_loop_puts_an_edited_file_back_unless_turned_off(
    tmp_path: Path, flag: list[str], restored: bool
) -> None:
    from defender_agent import load_agent_settings
    from defender_agent._agent import Agent
    from defender_config import EnvelopeOptions, LibrarySettings

    settings = load_agent_settings(
        ["--component", "demo", "--instance", "demo-0", "--reload-method", "none",
         "--output-path", str(tmp_path / "demo.json"), *flag]
    )  # fmt: skip
    agent = Agent(settings, LibrarySettings(envelope=EnvelopeOptions(encrypt=False)))
    agent._pending_fields = {}  # what the heartbeat would carry (no etcd here)
    assert agent.applier.apply({"a": 1}, version=1)
    path = tmp_path / "demo.json"
    delivered = path.read_bytes()
    path.write_text("{}\n")
    agent._tick()
    assert (path.read_bytes() == delivered) is restored


def test_putting_the_file_back_leaves_a_standing_error_reported(tmp_path: Path) -> None:
    # The newest commit was refused: putting the last good file back does not make that
    # error go away; the drift is an alert (and the warning) beside it.
    sink, reloader = RecordingSink(), CountingReloader()
    a = applier(tmp_path, sink, reloader)
    assert a.apply({"a": 1}, version=1)
    assert not a.apply(["not", "an", "object"], version=2)
    path = tmp_path / "demo.json"
    delivered = path.read_bytes()
    path.write_text("{}\n")
    assert a.check_file() is True
    assert path.read_bytes() == delivered and reloader.calls == 2
    assert sink.heartbeat["last_error"]["reason"] == "ConfigInvalid"
    assert [kind for kind, _ in sink.alerts] == ["ConfigInvalid", "FileDrifted"]
    assert a.check_file() is False
    assert a.last_error is not None and a.last_error.reason == "ConfigInvalid"


def test_a_subdirectory_swapped_for_a_link_is_write_failed_not_written_through(
    tmp_path: Path,
) -> None:
    # `vol` is the shared volume's mount point (as the test says): the component's container
    # may replace `vol/sub` with a link to somewhere the agent may write.
    sink, reloader = RecordingSink(), CountingReloader()
    vol, elsewhere = tmp_path / "vol", tmp_path / "elsewhere"
    (vol / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    a = ConfigApplier(
        component="demo",
        component_type="custom",
        output_path=vol / "sub" / "demo.json",
        reloader=reloader,
        sink=sink,
        mount_points={"/", str(vol.resolve())},
    )
    assert a.apply({"a": 1}, version=1)
    delivered = (vol / "sub" / "demo.json").read_bytes()
    (elsewhere / "demo.json").write_bytes(delivered)  # a copy, to be taken for the file
    (vol / "sub").rename(vol / "old")
    (vol / "sub").symlink_to(elsewhere)
    assert a.check_file() is True
    assert sink.heartbeat["last_error"]["reason"] == "WriteFailed"
    assert "symbolic link" in sink.heartbeat["last_error"]["detail"]
    assert not a.apply({"a": 2}, version=2)  # a new config is refused the same way
    assert sorted(p.name for p in elsewhere.iterdir()) == ["demo.json"]
    assert (elsewhere / "demo.json").read_bytes() == delivered
    assert not a.retry() and reloader.calls == 1
    assert [kind for kind, _ in sink.alerts] == ["WriteFailed"]
    (vol / "sub").unlink()
    (vol / "old").rename(vol / "sub")
    assert a.retry()
    assert json.loads((vol / "sub" / "demo.json").read_text()) == {"a": 2}
    assert a.last_error is None and reloader.calls == 2


def test_the_agent_keeps_running_when_its_directory_becomes_a_link(tmp_path: Path) -> None:
    # With this process's own mount table: whether the test's directory is on a mount or not,
    # a directory of the output path swapped for a link after start is never written through.
    from defender_agent import load_agent_settings
    from defender_agent._agent import Agent
    from defender_config import EnvelopeOptions, LibrarySettings

    sub, elsewhere = tmp_path / "sub", tmp_path / "elsewhere"
    sub.mkdir()
    elsewhere.mkdir()
    settings = load_agent_settings(
        ["--component", "demo", "--instance", "demo-0", "--reload-method", "none",
         "--output-path", str(sub / "demo.json"), "--restore-edited-file", "true"]
    )  # fmt: skip
    agent = Agent(settings, LibrarySettings(envelope=EnvelopeOptions(encrypt=False)))
    agent._pending_fields = {}  # what the heartbeat would carry (no etcd here)
    assert agent.applier.apply({"a": 1}, version=1)
    sub.rename(tmp_path / "old")
    sub.symlink_to(elsewhere)
    agent._tick()
    agent._tick()
    assert list(elsewhere.iterdir()) == []
    assert agent.applier.last_error is not None
    assert agent.applier.last_error.reason == "WriteFailed"


# --- FileDrifted alerts: at most one per window -------------------------------------------------


def test_drift_alerts_the_first_at_once_then_one_per_window_for_the_rest() -> None:
    from defender_agent._core import DriftAlerts, next_drift_alert

    state = DriftAlerts()
    state, count = next_drift_alert(state, 100.0, drifted=False, window=60)
    assert (state, count) == (DriftAlerts(), 0)  # nothing drifted, nothing to say
    state, count = next_drift_alert(state, 101.0, drifted=True, window=60)
    assert count == 1 and state == DriftAlerts(101.0, 0)  # the first: at once
    for t in range(102, 161):  # drifting every second within the window: counted only
        state, count = next_drift_alert(state, float(t), drifted=True, window=60)
        assert count == 0
    assert state == DriftAlerts(101.0, 59)
    state, count = next_drift_alert(state, 161.0, drifted=True, window=60)
    assert count == 60 and state == DriftAlerts(161.0, 0)  # the window is over: one for all
    state, count = next_drift_alert(state, 170.0, drifted=True, window=60)
    assert count == 0 and state == DriftAlerts(161.0, 1)
    state, count = next_drift_alert(state, 200.0, drifted=False, window=60)
    assert count == 0  # still within the window
    # It stopped drifting: the first check after the window writes the count anyway.
    state, count = next_drift_alert(state, 221.0, drifted=False, window=60)
    assert count == 1 and state == DriftAlerts(221.0, 0)
    state, count = next_drift_alert(state, 400.0, drifted=False, window=60)
    assert count == 0 and state == DriftAlerts(221.0, 0)
    # Long quiet: the next drift alerts at once again.
    state, count = next_drift_alert(state, 401.0, drifted=True, window=60)
    assert count == 1 and state == DriftAlerts(401.0, 0)


def test_a_component_that_keeps_rewriting_its_file_alerts_once_per_window(
    tmp_path: Path,
) -> None:
    from defender_agent import load_agent_settings
    from defender_agent._agent import Agent
    from defender_config import EnvelopeOptions, LibrarySettings

    settings = load_agent_settings(
        ["--component", "demo", "--instance", "demo-0", "--reload-method", "none",
         "--output-path", str(tmp_path / "demo.json"), "--restore-edited-file", "true"]
    )  # fmt: skip
    agent = Agent(settings, LibrarySettings(envelope=EnvelopeOptions(encrypt=False)))
    agent._pending_fields = {}  # what the heartbeat would carry (no etcd here)
    events: list[tuple[str, str]] = []

    class Alerter:
        def event(self, kind: str, component: str, detail: str, *, instance: str) -> None:
            assert (component, instance) == ("demo", "demo-0")
            events.append((kind, detail))

    class Client:
        alerter = Alerter()

    agent.client = Client()  # type: ignore[assignment]  # only its alerter is used here
    now = [1000.0]
    agent.applier._clock = lambda: now[0]
    assert agent.applier.apply({"a": 1}, version=7)
    path = tmp_path / "demo.json"
    delivered = path.read_bytes()

    def rewrite_and_tick(n: int) -> None:
        # The component rewrites its own file every other second; each main-loop pass after
        # an edit puts it back (FileDrifted stays reported while it goes on).
        for _ in range(n):
            path.write_text('{"a": "mine"}\n')
            agent._tick()
            assert path.read_bytes() == delivered
            now[0] += 1
            agent._tick()
            now[0] += 1

    rewrite_and_tick(1)
    assert [kind for kind, _ in events] == ["FileDrifted"]
    assert "version 7" in events[0][1] and "times" not in events[0][1]
    rewrite_and_tick(149)  # 298 s: within the window, 149 drifts put back, none alerted
    assert len(events) == 1
    assert agent.heartbeater is None  # no etcd: the heartbeat fields went to _pending_fields
    rewrite_and_tick(1)  # 300 s after the first alert: one alert for the 150 since
    assert len(events) == 2
    kind, detail = events[1]
    assert kind == "FileDrifted"
    assert "put back 150 times in the 300 s since the last FileDrifted alert" in detail
    assert "version 7" in detail and "mine" not in detail  # never the file's values
    # Three more drifts, then it stops: the first check once the window is over says so, once.
    rewrite_and_tick(3)
    assert len(events) == 2
    for _ in range(1000):
        agent._tick()
        now[0] += 1
    assert len(events) == 3
    assert events[2][0] == "FileDrifted" and "put back 3 times in the 300 s" in events[2][1]
