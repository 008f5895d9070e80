"""Sidecar agent: registration, heartbeats and hot-reloaded config for any container.

Run as ``defender-agent`` beside a component; see docs/agent.md.
"""

from ._errors import (
    AgentError,
    AgentSettingsError,
    ConfigTooLargeError,
    HttpReloadError,
    OutputDirError,
    ProcessNotFoundError,
    ReloadError,
    SignalDeliveryError,
    WriteError,
)
from ._reload import HttpReloader, NoReload, Reloader, SignalReloader, find_processes
from ._settings import AgentSettings, load_agent_settings
from ._writer import write_atomic

__all__ = [
    "AgentError",
    "AgentSettings",
    "AgentSettingsError",
    "ConfigTooLargeError",
    "HttpReloadError",
    "HttpReloader",
    "NoReload",
    "OutputDirError",
    "ProcessNotFoundError",
    "ReloadError",
    "Reloader",
    "SignalDeliveryError",
    "SignalReloader",
    "WriteError",
    "find_processes",
    "load_agent_settings",
    "write_atomic",
]
