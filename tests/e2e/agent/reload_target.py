"""A tiny stand-in for a C++ component: it reads its JSON config at start and on SIGHUP.

Every read is appended as one JSON line to the record file, so a test can see what the process
loaded and when: ``{"event": "loaded", "time": <unix seconds>, "config": {...}}``, or
``{"event": "bad_file", ...}`` when the file was missing, partial or not JSON, which is what a
torn write would look like from the component's side. SIGTERM ends it cleanly.

Usage: reload_target.py CONFIG_PATH RECORD_PATH
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType


def main() -> int:
    config_path, record_path = Path(sys.argv[1]), Path(sys.argv[2])
    wake = threading.Event()
    stop = threading.Event()

    def record(entry: dict[str, object]) -> None:
        entry["time"] = time.time()
        with record_path.open("a") as out:
            out.write(json.dumps(entry) + "\n")
            out.flush()

    def load(trigger: str) -> None:
        try:
            config = json.loads(config_path.read_bytes())
        except FileNotFoundError:
            record({"event": "no_file", "trigger": trigger})
            return
        except (OSError, ValueError) as exc:
            record({"event": "bad_file", "trigger": trigger, "error": str(exc)})
            return
        record({"event": "loaded", "trigger": trigger, "config": config})

    def on_hup(signum: int, frame: FrameType | None) -> None:
        wake.set()

    def on_term(signum: int, frame: FrameType | None) -> None:
        stop.set()
        wake.set()

    signal.signal(signal.SIGHUP, on_hup)
    signal.signal(signal.SIGTERM, on_term)
    record({"event": "started"})
    load("start")
    while not stop.is_set():
        # Signals only set a flag; the file is read in the main loop, as a real daemon would.
        wake.wait()
        wake.clear()
        if not stop.is_set():
            load("SIGHUP")
    record({"event": "stopped"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
