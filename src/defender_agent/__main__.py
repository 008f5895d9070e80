"""``defender-agent``: the sidecar entry point.

Exit codes (also in docs/agent.md):

====  =====================================================================================
0     stopped by SIGTERM/SIGINT; the instance was marked STOPPED and its lease revoked
1     unexpected internal error (a bug: the log line ``agent crashed`` has the traceback)
2     invalid settings: flags, ``DEFENDER_AGENT_*``/``DEFENDER_*`` variables or settings file
3     the keyring could not be loaded at start (Secret not mounted or malformed)
4     etcd refused the credentials (user/password or client certificate)
5     the output directory was refused: a symbolic link in a mounted volume on the output path
====  =====================================================================================

An unreachable etcd is not an exit: the agent keeps retrying with backoff, because a restart
would not help and the component keeps its last good file meanwhile.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from defender_config import KeyringError, SettingsError, StoreAuthError

from ._errors import AgentSettingsError, OutputDirError
from ._harden import forbid_inspection
from ._logging import configure_logging

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_SETTINGS = 2
EXIT_KEYRING = 3
EXIT_AUTH = 4
EXIT_OUTPUT_DIR = 5

log = logging.getLogger("defender_agent")


def main(argv: Sequence[str] | None = None) -> int:
    # Before anything secret is read: a component sharing the process namespace under the
    # same UID must not read the etcd password or the keyring through /proc (_harden).
    inspectable = not forbid_inspection()
    # Imported here so `--help` and settings errors do not pay for grpc start-up.
    from ._agent import Agent
    from ._settings import library_settings, load_agent_settings

    configure_logging("INFO")
    if inspectable:
        log.warning(
            "could not make the agent's process non-dumpable: a process of the same UID may"
            " read its environment and files through /proc"
        )
    try:
        settings = load_agent_settings(argv)
        configure_logging(
            settings.log_level,
            static={"component": settings.component, "instance": settings.instance},
        )
        library = library_settings(settings)
        agent = Agent(settings, library)
    except (AgentSettingsError, SettingsError) as exc:
        log.error("invalid settings: %s", exc, extra={"reason": exc.reason})
        return EXIT_SETTINGS
    except OutputDirError as exc:
        # Not a setting to fix but what the volume holds: maybe another container's doing.
        log.error("%s", exc, extra={"reason": exc.reason})
        return EXIT_OUTPUT_DIR
    agent.install_signal_handlers()
    try:
        agent.run()
    except KeyringError as exc:
        log.error("cannot load the keyring: %s", exc, extra={"reason": exc.reason})
        return EXIT_KEYRING
    except StoreAuthError as exc:
        log.error("etcd refused the agent: %s", exc, extra={"reason": exc.reason})
        return EXIT_AUTH
    except Exception:
        log.exception("agent crashed")
        return EXIT_INTERNAL
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
