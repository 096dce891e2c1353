"""Hook specifications of the vetd agent: the whole plugin contract.

Hooks register; objects do the work. A plugin implements some of these with
``@vetd.agent.hookspecs.hookimpl`` and adds check or telemetry objects to the
registry it is given; the agent owns scheduling, threads, deadlines and
transport. pluggy has no async support and none is needed: check objects run
in worker threads with a deadline.

Third-party plugins are modules exposed through the ``vetd`` entry-point group
(``[project.entry-points.vetd] myplugin = "mypkg.vetd_plugin"``); the entry
point's name is the plugin's name, which operators use to disable it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import msgspec
import pluggy

if TYPE_CHECKING:
    from vetd.agent.checks import CheckRegistry, EventSourceRegistry, PluginConfigs, TelemetryRegistry
    from vetd.agent.commands import CommandRegistry

PROJECT = "vetd"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def vetd_config_tables() -> Mapping[str, type[msgspec.Struct]]:
    """Return the config tables this plugin owns: ``{table: Struct type}``.

    Called once per config load, before any registration hook. The table
    ``[plugins.NAME]`` of the agent config is decoded into the Struct (which
    should set ``forbid_unknown_fields=True``); a table is decoded from ``{}``
    when absent, so every field needs a default. Not ``firstresult``: each
    plugin returns its own tables, and two plugins claiming one name is an error.
    """
    raise NotImplementedError


@hookspec
def vetd_register_checks(registry: CheckRegistry, configs: PluginConfigs) -> None:
    """Add this plugin's :class:`vetd.agent.checks.Check` objects to ``registry``.

    Called once at start and again after each config reload (SIGHUP), with the
    decoded config tables of every plugin. Not ``firstresult``. Must not block:
    do I/O in the checks' ``run()``, not here.
    """


@hookspec
def vetd_register_telemetry(registry: TelemetryRegistry, configs: PluginConfigs) -> None:
    """Add this plugin's :class:`vetd.agent.checks.TelemetrySource` objects.

    Called at the same times as :func:`vetd_register_checks`. Not ``firstresult``.
    """


@hookspec
def vetd_register_event_sources(registry: EventSourceRegistry, configs: PluginConfigs) -> None:
    """Add :class:`vetd.agent.checks.EventSource` objects: watchers that report
    things as they happen (an XID, a link going down) instead of being polled.

    Called at the same times as :func:`vetd_register_checks`. Each source's
    ``run(emit, stop)`` gets a thread of its own in the daemon (not in
    ``vetd check``); ``emit`` is thread-safe and publishes at once. A source that
    raises is logged and restarted with backoff. Not ``firstresult``.
    """


@hookspec
def vetd_register_commands(registry: CommandRegistry, configs: PluginConfigs) -> None:
    """Add :class:`vetd.agent.commands.AgentCommand` objects: actions the controller may ask of the node.

    Called at the same times as :func:`vetd_register_checks`. An action runs
    only once ``[commands] allow`` lists it, and after every plugin's
    :func:`vetd_command_veto`. ``ping`` and ``revet`` are the agent's own. Not
    ``firstresult``.
    """


@hookspec
def vetd_command_veto(action: str, args: Mapping[str, str], configs: PluginConfigs) -> str | None:
    """Return why the node must not carry out ``action`` now, or None.

    Called (in a worker thread) before an allow-listed command from the
    controller runs, e.g. ``gpu_reset`` while compute processes hold that GPU.
    Any plugin's reason refuses the command. Not ``firstresult``.
    """


@hookspec
def vetd_node_labels(configs: PluginConfigs) -> Mapping[str, str]:
    """Return labels describing this node (GPU model, driver…) for the birth message.

    Called when the agent connects to the broker; may do quick I/O. Results of
    all plugins are merged, the agent's own ``[agent] labels`` winning. Not
    ``firstresult``.
    """
    raise NotImplementedError
