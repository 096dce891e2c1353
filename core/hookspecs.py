"""Every hook vetd calls, in one place: the whole plugin contract.

One marker pair for project ``vetd``; every hook is named ``vetd_*``. A
plugin module (entry-point group ``vetd``, or ``[agent] load_plugins``) may
implement hooks of any part:

- the agent's: config tables, checks, telemetry, event sources, node commands
  and their vetoes, node labels, pair tests (called by :mod:`vetd.agent.pluginhost`);
- the command line's: subcommands (called by :mod:`vetd.core.cli`);
- the controller's: scheduler backends, alert sinks, healing steps (called by
  :mod:`vetd.controller.plugins`).

Hooks register; objects do the work. pluggy has no async support and none is
needed: the objects a hook adds do the I/O, in worker threads or on the loop.
Plugins import what they need from :mod:`vetd.agent.api` (and
``vetd.controller.actions`` for controller backends). This module imports
neither side except for type checking.
"""

from __future__ import annotations

import argparse
import importlib.metadata
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, NamedTuple

import msgspec
import pluggy

if TYPE_CHECKING:
    from vetd.agent.checks import CheckRegistry, EventSourceRegistry, PluginConfigs, TelemetryRegistry
    from vetd.agent.commands import CommandRegistry
    from vetd.agent.pairtests import PairTestRegistry
    from vetd.controller.actions import AlertBackend, HealingStep, SchedulerBackend
    from vetd.controller.config import ControllerConfig, SchedulerSection
    from vetd.core.cli import Parser

PROJECT = "vetd"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class EntryPointPlugin(NamedTuple):
    """One plugin of the ``vetd`` entry-point group: its module, or why it could not be imported."""

    name: str
    #: The imported module (None: see ``error``).
    plugin: object | None
    error: str
    #: ``DIST VERSION``, or the entry point's target when no distribution is known.
    origin: str


def entry_point_plugins(skip: Iterable[str] = ()) -> list[EntryPointPlugin]:
    """Import every plugin of the ``vetd`` entry-point group except those named in ``skip``
    (never imported); each part (agent, controller, command line) registers what it needs."""
    skipped = set(skip)
    found = []
    for entry in importlib.metadata.entry_points(group=PROJECT):
        if entry.name in skipped:
            continue
        origin = f"{entry.dist.name} {entry.dist.version}" if entry.dist is not None else entry.value
        try:
            found.append(EntryPointPlugin(entry.name, entry.load(), "", origin))
        except Exception as exc:  # noqa: BLE001 - a broken third party must not stop the rest
            found.append(EntryPointPlugin(entry.name, None,
                                          f"cannot import {entry.value}: {type(exc).__name__}: {exc}", origin))
    return found


# -- the agent ------------------------------------------------------------------

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
def vetd_register_pair_tests(registry: PairTestRegistry, configs: PluginConfigs) -> None:
    """Add :class:`vetd.agent.pairtests.PairTest` objects: bandwidth tests between two nodes that the
    pair rounds of ``vetd vet`` run (``tcp_pairs``, ``nccl_pairs``).

    Called when ``vetd vet`` starts, with the decoded config tables. The rounds,
    the rendezvous and the localisation are vetd's; a test only measures one
    direction of one pair at a time. Not ``firstresult``.
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


# -- the command line -------------------------------------------------------------

@hookspec
def vetd_cli_commands(subparsers: argparse._SubParsersAction[Parser]) -> None:
    """Add ``vetd`` subcommands: ``parser = subparsers.add_parser(NAME, ...)``, then
    ``parser.set_defaults(func=RUN)`` where ``RUN(args) -> int`` is the exit code.

    Called once when ``vetd`` starts (:mod:`vetd.core.cli`), for the agent's and
    the controller's command modules, the built-in plugins that have commands
    (``gpu_health``: ``vetd xid``) and every plugin of the ``vetd`` entry-point
    group that implements it. Not ``firstresult``. Keep imports that
    need optional packages inside RUN.
    """


@hookspec
def vetd_config_samples() -> Mapping[str, Callable[[], str]]:
    """Return ``{name: sample}``: config files ``vetd config --sample NAME`` prints, each
    ``sample()`` the whole file at its defaults (:mod:`vetd.agent.configsample`).

    Called when ``vetd`` starts. Not ``firstresult``.
    """
    raise NotImplementedError


# -- the controller ---------------------------------------------------------------

@hookspec
def vetd_scheduler_backends() -> Mapping[str, Callable[[SchedulerSection], SchedulerBackend]]:
    """Return ``{name: factory}``: scheduler backends ``[scheduler] backend = NAME`` may choose.

    Called once when the controller starts. The factory gets the ``[scheduler]``
    section and returns an object with ``name`` and async ``drain(node,
    reason)``, ``resume(node)``, ``reboot(node, reason)``, each answering an
    :class:`~vetd.controller.actions.ActionOutcome`; ``resume`` must touch only
    vetd's own drains. Two plugins naming one backend is an error. Not ``firstresult``.
    """
    raise NotImplementedError


@hookspec
def vetd_alert_sinks(config: ControllerConfig) -> Iterable[AlertBackend]:
    """Return the alert sinks this plugin sends alerts to with this config (none: ``[]``).

    Called once when the controller starts. A sink has ``enabled`` and async
    ``send(alerts)``, ``alerts`` a list of Alertmanager API v2 alerts
    (:func:`~vetd.controller.actions.alert_payload`); every alert goes to every
    enabled sink. Not ``firstresult``.
    """
    raise NotImplementedError


@hookspec
def vetd_healing_steps() -> Mapping[str, HealingStep]:
    """Return ``{name: HealingStep}``: steps a rule's ``heal:`` ladder may name.

    A step sends one agent command (which the node's ``[commands] allow`` must
    list, and an agent plugin must provide) and succeeds when the node answers
    ok. ``revet PROFILE`` and ``reboot`` are the controller's own. Called when
    rules load (so ``vetd rules check`` knows them). Not ``firstresult``.
    """
    raise NotImplementedError
