"""What a vetd plugin may use: the one public API module for plugins.

Built-in plugins import from here exactly as third-party ones do; nothing
else under ``vetd.agent`` is a promise. The hooks a plugin implements are
specified in :mod:`vetd.core.hookspecs`; the guide with an example package
is ``docs/plugins.md``.

Importing this module costs only :data:`hookimpl`: every other name is
imported on first use (PEP 562), so a plugin whose module level needs only
``hookimpl`` (its hooks import the rest) adds its commands to ``vetd``
without the agent's runtime (asyncio, structlog, the check runner): ``vetd
--help`` and ``vetd slurm prolog`` start fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from vetd.core.hookspecs import hookimpl

if TYPE_CHECKING:
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
    from vetd.core.mqtt import Backoff
    from vetd.core.proc import Finished, ProcError, ProcTimeout
    from vetd.core.proc import run as run_process
    from vetd.core.protocol import Status

#: Each public name but ``hookimpl``: (module, name there).
_LAZY = {
    **{name: ("vetd.agent.checks", name) for name in (
        "Check", "CheckRegistry", "Emit", "EventOutcome", "EventSource", "EventSourceRegistry", "Outcome",
        "PluginConfigs", "RegistryError", "SourceUnavailable", "TelemetryRegistry", "TelemetrySource",
        "current_job_gpus", "current_profile")},
    **{name: ("vetd.agent.commands", name) for name in (
        "AgentCommand", "Answer", "CommandContext", "CommandRegistry", "fill")},
    **{name: ("vetd.agent.pairtests", name) for name in (
        "PairEndpoint", "PairSample", "PairServer", "PairTest", "PairTestRegistry", "Peer")},
    "Duration": ("vetd.core.configfile", "Duration"),
    "dec_hook": ("vetd.core.configfile", "dec_hook"),
    "Backoff": ("vetd.core.mqtt", "Backoff"),
    "Finished": ("vetd.core.proc", "Finished"),
    "ProcError": ("vetd.core.proc", "ProcError"),
    "ProcTimeout": ("vetd.core.proc", "ProcTimeout"),
    "run_process": ("vetd.core.proc", "run"),
    "Status": ("vetd.core.protocol", "Status"),
}


if not TYPE_CHECKING:  # mypy reads the imports above, and still reports a name this module lacks

    def __getattr__(name: str) -> Any:
        """A public name imported on first use, then kept here (the next use is a plain attribute)."""
        try:
            module, attribute = _LAZY[name]
        except KeyError:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return sorted(__all__)


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
