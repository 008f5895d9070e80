"""`defender-agent` as a real process: exit codes and start-up behaviour that need no etcd."""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from defender_config import Keyring


def agent_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEFENDER_") and k != "POD_NAME"}
    env.update(extra)
    return env


def run_agent(
    args: list[str], env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "defender_agent", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    sock.close()
    return port


BASE = [
    "--component",
    "demo",
    "--output-path",
    "/tmp/never-written.json",
    "--reload-method",
    "none",
]


def test_help_exits_zero() -> None:
    proc = run_agent(["--help"], agent_env())
    assert proc.returncode == 0
    assert "--reload-process" in proc.stdout


def test_bad_settings_exit_2_with_json_log() -> None:
    proc = run_agent(BASE, agent_env())  # no POD_NAME, no --instance
    assert proc.returncode == 2
    [line] = [entry for entry in json_lines(proc.stderr) if entry["level"] == "ERROR"]
    assert line["reason"] == "AgentSettings"
    assert "POD_NAME" in line["message"]


def test_unreadable_settings_file_exit_2(tmp_path: Path) -> None:
    proc = run_agent([*BASE, "--settings", str(tmp_path / "absent.json")], agent_env(POD_NAME="p"))
    assert proc.returncode == 2
    assert "cannot read" in proc.stderr


def test_bad_seed_config_exit_2(tmp_path: Path) -> None:
    seed = tmp_path / "seed.json"
    seed.write_text("[1, 2")
    proc = run_agent([*BASE, "--seed-config-path", str(seed)], agent_env(POD_NAME="p"))
    assert proc.returncode == 2
    assert "not valid JSON" in proc.stderr


def test_a_seed_config_nested_too_deeply_exit_2(tmp_path: Path) -> None:
    seed = tmp_path / "seed.json"
    seed.write_text("[" * 100_000)
    proc = run_agent([*BASE, "--seed-config-path", str(seed)], agent_env(POD_NAME="p"))
    assert proc.returncode == 2
    assert "not valid JSON: JSON nested too deeply to parse" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_bad_prefix_exits_2_not_a_crash(tmp_path: Path) -> None:
    # The agent's --prefix overrides the library's setting; it must meet the library's rule at
    # start-up (exit 2, one line), not when the etcd client is first built (exit 1, traceback).
    keyring = tmp_path / "keyring"
    keyring.mkdir()
    (keyring / "keyring.json").write_bytes(Keyring.generate().to_json())
    args = [*BASE, "--prefix", "ml-defender/", "--keyring-path", str(keyring)]
    args += ["--etcd-endpoints", f"http://127.0.0.1:{closed_port()}"]
    proc = run_agent(args, agent_env(POD_NAME="p"), timeout=30)
    assert proc.returncode == 2, proc.stderr
    [line] = [entry for entry in json_lines(proc.stderr) if entry["level"] == "ERROR"]
    assert line["message"].startswith("invalid settings: invalid agent settings: prefix: ")
    assert "Traceback" not in proc.stderr


def test_missing_keyring_exit_3(tmp_path: Path) -> None:
    proc = run_agent(
        [
            *BASE,
            "--keyring-path",
            str(tmp_path / "no-secret-here"),
            "--etcd-endpoints",
            f"http://127.0.0.1:{closed_port()}",
        ],
        agent_env(POD_NAME="p"),
    )
    assert proc.returncode == 3
    errors = [entry for entry in json_lines(proc.stderr) if entry["level"] == "ERROR"]
    assert errors[-1]["reason"] == "KeyringInvalid"
    assert "mounted" in errors[-1]["message"]


def test_no_keyring_path_with_encryption_on_exit_3() -> None:
    proc = run_agent(
        [*BASE, "--etcd-endpoints", f"http://127.0.0.1:{closed_port()}"], agent_env(POD_NAME="p")
    )
    assert proc.returncode == 3
    assert "--keyring-path" in proc.stderr


def test_unreachable_etcd_keeps_retrying_until_sigterm_whatever_other_signal_comes(
    tmp_path: Path,
) -> None:
    keyring = Keyring.generate()
    (tmp_path / "keyring.json").write_bytes(keyring.to_json())
    log_path = tmp_path / "agent.log"
    env = agent_env(
        POD_NAME="p-1",
        DEFENDER_ETCD__TIMEOUT_SECONDS="0.3",
        DEFENDER_ETCD__RETRIES="0",
    )
    args = [
        *BASE,
        "--keyring-path",
        str(tmp_path),
        "--etcd-endpoints",
        f"http://127.0.0.1:{closed_port()}",
    ]
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "defender_agent", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            retries = [e for e in json_lines(log_path.read_text()) if "retrying" in e["message"]]
            if len(retries) >= 2:
                break
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        assert retries[0]["reason"] == "StoreUnavailable"
        # Key material never reaches the logs, even on error paths.
        text = log_path.read_text()
        assert keyring.primary.material.hex() not in text
        assert base64.b64encode(keyring.primary.material).decode() not in text
        # Signals that mean nothing to the agent (a component's `kill -HUP -1`, say, in a shared
        # process namespace) would end it by their default action: it keeps retrying.
        for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
            proc.send_signal(sig)
        seen = len(retries)
        while len(retries) <= seen + 1:
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
            retries = [e for e in json_lines(log_path.read_text()) if "retrying" in e["message"]]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_unexpected_crash_exits_1_with_the_traceback_logged(
    tmp_path: Path, monkeypatch: Any, capsys: Any
) -> None:
    # Nothing in a healthy agent raises out of run(); a bug would. Inject one to drive the
    # last-resort handler in-process: exit code 1 and the traceback in the log.
    from defender_agent import __main__ as entry
    from defender_agent import _agent

    def crash(self: object) -> None:
        raise RuntimeError("injected bug")

    monkeypatch.setattr(_agent.Agent, "run", crash)
    monkeypatch.setattr(_agent.Agent, "install_signal_handlers", lambda self: None)
    for name in [k for k in os.environ if k.startswith("DEFENDER_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("POD_NAME", "p-crash")
    (tmp_path / "keyring.json").write_bytes(Keyring.generate().to_json())
    # main() installs the agent's JSON handler on the root logger: put pytest's back after.
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        code = entry.main(
            [
                *BASE,
                "--keyring-path",
                str(tmp_path),
                "--etcd-endpoints",
                f"http://127.0.0.1:{closed_port()}",
            ]
        )
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    assert code == entry.EXIT_INTERNAL == 1
    logged = capsys.readouterr().err
    assert "agent crashed" in logged and "injected bug" in logged


def test_a_link_out_of_the_volume_at_start_exits_5_with_a_log_line(
    tmp_path: Path, monkeypatch: Any, capsys: Any
) -> None:
    # The shared volume (`vol`, a mount in the mount table the agent reads) holds `sub`, a
    # link to another volume, put there before the agent started: it does not start.
    from defender_agent import __main__ as entry
    from defender_agent import _agent, _writer

    # Refused before it runs; were it not, it would start and wait for etcd: return instead.
    monkeypatch.setattr(_agent.Agent, "run", lambda self: None)
    monkeypatch.setattr(_agent.Agent, "install_signal_handlers", lambda self: None)
    vol, other = tmp_path / "vol", tmp_path / "other"
    vol.mkdir()
    other.mkdir()
    (vol / "sub").symlink_to(other)
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "1 0 0:1 / / rw - overlay overlay rw\n"
        f"2 1 0:2 / {vol.resolve()} rw - tmpfs tmpfs rw\n"
        f"3 1 0:3 / {other.resolve()} rw - tmpfs tmpfs rw\n"
    )
    monkeypatch.setattr(_writer, "_MOUNTINFO", str(mountinfo))
    for name in [k for k in os.environ if k.startswith("DEFENDER_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("POD_NAME", "p-link")
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        code = entry.main(
            ["--component", "demo", "--reload-method", "none",
             "--output-path", str(vol / "sub" / "demo.json"),
             "--etcd-endpoints", f"http://127.0.0.1:{closed_port()}"]
        )  # fmt: skip
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    assert code == entry.EXIT_OUTPUT_DIR == 5
    assert list(other.iterdir()) == []
    (line,) = [e for e in json_lines(capsys.readouterr().err) if e.get("level") == "ERROR"]
    assert line["reason"] == "OutputDirRefused"
    assert f"{vol.resolve()}/sub is a symbolic link in the mount {vol.resolve()}" in line["message"]
