"""The one typed facade through which the agent talks to its plugins.

Built-in plugins are registered from :data:`BUILTIN_PLUGINS` exactly as third
parties are from the ``vetd`` entry-point group; then modules named in
``[agent] load_plugins``; then ``check_pending()`` against every hook vetd specifies. Plugins named in
``[agent] disable_plugins`` are blocked before any of that, so a disabled
plugin's module is never even imported. ``VETD_TRACE_PLUGINS=1`` logs every hook
call.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import msgspec
import pluggy
import structlog

from vetd.agent.checks import (
    CheckRegistry,
    EventSourceRegistry,
    PluginConfigs,
    RegistryError,
    TelemetryRegistry,
)
from vetd.agent.config import AgentConfig
from vetd.core import __version__, hookspecs

if TYPE_CHECKING:
    from vetd.agent.commands import CommandRegistry
    from vetd.agent.pairtests import PairTestRegistry
from vetd.core.configfile import ConfigError, convert, where

log = structlog.get_logger("vetd.plugins")

#: Built-in plugins: (name, module). Registered like third-party ones.
BUILTIN_PLUGINS: tuple[tuple[str, str], ...] = (
    ("host", "vetd.plugins.host"),
    ("gpu_health", "vetd.plugins.gpu_health"),
    ("gpu_compute", "vetd.plugins.gpu_compute"),
    ("nccl", "vetd.plugins.nccl"),
    ("tcp_pairs", "vetd.plugins.tcp_pairs"),
    ("telemetry", "vetd.plugins.telemetry"),
)


class PluginError(Exception):
    """A plugin could not be loaded or registered."""


class PluginHost:
    """Loads plugins and calls their hooks for the agent."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self._commands: CommandRegistry | None = None
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        #: Plugins that failed to import or whose registration raised: name → error text.
        self.broken: dict[str, str] = {}
        #: Where each plugin comes from: ``built-in``, ``DIST VERSION`` (an entry point) or ``load_plugins``.
        self.origins: dict[str, str] = {}
        entry_points = list(importlib.metadata.entry_points(group=hookspecs.PROJECT))
        disabled = set(config.agent.disable_plugins)
        known = {name for name, _ in BUILTIN_PLUGINS} | {ep.name for ep in entry_points} | {
            module.rsplit(".", 1)[-1] for module in config.agent.load_plugins}
        unknown = sorted(disabled - known)
        if unknown:
            raise ConfigError(f"{where(config.source, config.source_text, 'agent.disable_plugins')}: no plugin "
                              f"named {', '.join(map(repr, unknown))} (plugins: {', '.join(sorted(known))})")
        for name in disabled:
            self.pm.set_blocked(name)
        for name, module in BUILTIN_PLUGINS:
            if name not in disabled:
                self.pm.register(importlib.import_module(module), name=name)
                self.origins[name] = f"built-in (vetd {__version__})"
        for found in hookspecs.entry_point_plugins(skip=disabled | set(self.origins)):
            if found.plugin is None:
                self.broken[found.name] = found.error
                log.error("plugin_import_failed", plugin=found.name, error=found.error)
                continue
            self.pm.register(found.plugin, name=found.name)
            self.origins[found.name] = found.origin
        for module in config.agent.load_plugins:
            name = module.rsplit(".", 1)[-1]
            if name in disabled or self.pm.has_plugin(name):
                continue
            try:
                self.pm.register(importlib.import_module(module), name=name)
                self.origins[name] = f"load_plugins {module}"
            except ImportError as exc:
                raise ConfigError(
                    f"{config.source}: agent.load_plugins: cannot import {module!r}: {exc}"
                ) from exc
        try:
            self.pm.check_pending()  # a hook no part of vetd specifies: a typo, or a plugin for another vetd
        except pluggy.PluginValidationError as exc:
            raise PluginError(str(exc)) from exc
        if os.environ.get("VETD_TRACE_PLUGINS"):
            self.pm.trace.root.setwriter(lambda text: log.debug("plugin_trace", trace=text.rstrip()))
            self.pm.enable_tracing()
        self.configs = self.decode_configs(config)

    def names(self) -> list[str]:
        """Names of the registered plugins."""
        return sorted(name for name, plugin in self.pm.list_name_plugin() if plugin is not None)

    def _per_plugin(self, hook: str) -> list[tuple[str, Any]]:
        """``(plugin name, hook caller limited to that plugin)`` for each implementer."""
        callers = []
        plugins = dict(self.pm.list_name_plugin())
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            others = [p for n, p in plugins.items() if n != impl.plugin_name and p is not None]
            callers.append((impl.plugin_name, self.pm.subset_hook_caller(hook, others)))
        return callers

    def config_tables(self) -> dict[str, type[msgspec.Struct]]:
        """``[plugins.NAME]`` table → the Struct its plugin decodes it into."""
        return {table: struct for table, (_plugin, struct) in self._table_owners().items()}

    def table_plugins(self) -> dict[str, str]:
        """``[plugins.NAME]`` table → the plugin that owns it."""
        return {table: plugin for table, (plugin, _struct) in self._table_owners().items()}

    def _table_owners(self) -> dict[str, tuple[str, type[msgspec.Struct]]]:
        owners: dict[str, tuple[str, type[msgspec.Struct]]] = {}
        for plugin, caller in self._per_plugin("vetd_config_tables"):
            for tables in caller():
                for table, struct in tables.items():
                    if table in owners:
                        raise PluginError(
                            f"config table {table!r} claimed by {owners[table][0]!r} and {plugin!r}"
                        )
                    owners[table] = (plugin, struct)
        return owners

    def decode_configs(self, config: AgentConfig) -> PluginConfigs:
        """Decode every ``[plugins.NAME]`` table into its owner's Struct."""
        owners = self._table_owners()
        disabled = set(config.agent.disable_plugins)
        for table in config.plugins:
            if table not in owners and table not in disabled:
                failed = f"; plugin {table!r} failed to load: {self.broken[table]}" if table in self.broken else ""
                raise ConfigError(
                    f"{where(config.source, config.source_text, f'plugins.{table}')}: "
                    "no loaded plugin owns this table "
                    f"(loaded: {', '.join(self.names()) or 'none'}){failed}"
                )
        decoded = {
            table: convert(
                config.plugins.get(table, {}),
                struct,
                path=config.source,
                text=config.source_text,
                prefix=f"plugins.{table}",
            )
            for table, (_plugin, struct) in owners.items()
        }
        return PluginConfigs(decoded)

    def register_checks(self) -> CheckRegistry:
        """Every plugin's checks; a ``[checks.NAME]`` override of no check is a config error."""
        registry = CheckRegistry()
        self._register("vetd_register_checks", registry)
        unknown = sorted(set(self.config.checks) - set(registry.names()))
        if unknown:
            failed = f"; plugins that failed to load: {', '.join(sorted(self.broken))}" if self.broken else ""
            raise ConfigError(
                f"{where(self.config.source, self.config.source_text, f'checks.{unknown[0]}')}: no check named "
                f"{unknown[0]!r} (checks: {', '.join(registry.names()) or 'none'}){failed}")
        return registry

    def register_telemetry(self) -> TelemetryRegistry:
        registry = TelemetryRegistry()
        self._register("vetd_register_telemetry", registry)
        return registry

    def register_event_sources(self) -> EventSourceRegistry:
        registry = EventSourceRegistry()
        self._register("vetd_register_event_sources", registry)
        return registry

    def register_pair_tests(self) -> PairTestRegistry:
        """The bandwidth tests between nodes that plugins provide (``vetd vet``)."""
        from vetd.agent.pairtests import PairTestRegistry

        registry = PairTestRegistry()
        self._register("vetd_register_pair_tests", registry)
        return registry

    def commands(self) -> CommandRegistry:
        """The actions plugins provide (registered once per config load)."""
        if self._commands is None:
            from vetd.agent.commands import CommandRegistry

            self._commands = CommandRegistry()
            self._register("vetd_register_commands", self._commands)
        return self._commands

    def _register(self, hook: str, registry: Any) -> None:
        for plugin, caller in self._per_plugin(hook):
            registry.plugin = plugin
            try:
                caller(registry=registry, configs=self.configs)
            except RegistryError as exc:
                self.broken[plugin] = str(exc)
                log.error("plugin_register_failed", plugin=plugin, hook=hook, error=str(exc))
            except Exception as exc:  # noqa: BLE001 - one plugin must not take down the rest
                self.broken[plugin] = f"{type(exc).__name__}: {exc}"
                log.error("plugin_register_failed", plugin=plugin, hook=hook, error=self.broken[plugin])
        registry.plugin = ""

    def command_vetoes(self, action: str, args: Mapping[str, str]) -> list[str]:
        """Reasons plugins give not to run ``action`` now."""
        reasons = []
        for plugin, caller in self._per_plugin("vetd_command_veto"):
            try:
                reasons += [f"{plugin}: {r}" for r in caller(action=action, args=dict(args), configs=self.configs) if r]
            except Exception as exc:  # noqa: BLE001 - a plugin that cannot tell vetoes, to be safe
                reasons.append(f"{plugin}: could not check ({type(exc).__name__}: {exc})")
        return reasons

    def node_labels(self) -> dict[str, str]:
        labels: dict[str, str] = {}
        for plugin, caller in self._per_plugin("vetd_node_labels"):
            try:
                for result in caller(configs=self.configs):
                    labels.update({str(k): str(v) for k, v in result.items()})
            except Exception as exc:  # noqa: BLE001
                log.error("plugin_labels_failed", plugin=plugin, error=f"{type(exc).__name__}: {exc}")
        return labels
