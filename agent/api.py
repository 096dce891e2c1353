"""What a vetd plugin may use: the one public API module for plugins.

Built-in plugins import from here exactly as third-party ones do; nothing
else under ``vetd.agent`` is a promise. The hooks a plugin implements are
specified in :mod:`vetd.core.hookspecs`; the guide with an example package
is ``docs/plugins.md``.
"""

from __future__ import annotations

from vetd.agent.checks import (
    Check,
    CheckRegistry,
    Emit,
    EventOutcome,
    EventSource,
    EventSourceRegistry,
    Outcome,
    PluginConfigs,
    RegistryError,
    SourceUnavailable,
    TelemetryRegistry,
    TelemetrySource,
    current_job_gpus,
    current_profile,
)
from vetd.agent.commands import AgentCommand, Answer, CommandContext, CommandRegistry, fill
from vetd.agent.pairtests import PairEndpoint, PairSample, PairServer, PairTest, PairTestRegistry, Peer
from vetd.core.configfile import Duration, dec_hook
from vetd.core.hookspecs import hookimpl
from vetd.core.mqtt import Backoff
from vetd.core.proc import Finished, ProcError, ProcTimeout
from vetd.core.proc import run as run_process
from vetd.core.protocol import Status

__all__ = [
    "AgentCommand",
    "Answer",
    "Backoff",
    "Check",
    "CheckRegistry",
    "CommandContext",
    "CommandRegistry",
    "Duration",
    "Emit",
    "EventOutcome",
    "EventSource",
    "EventSourceRegistry",
    "Finished",
    "Outcome",
    "PairEndpoint",
    "PairSample",
    "PairServer",
    "PairTest",
    "PairTestRegistry",
    "Peer",
    "PluginConfigs",
    "ProcError",
    "ProcTimeout",
    "RegistryError",
    "SourceUnavailable",
    "Status",
    "TelemetryRegistry",
    "TelemetrySource",
    "current_job_gpus",
    "current_profile",
    "dec_hook",
    "fill",
    "hookimpl",
    "run_process",
]
