"""The one facade through which the controller calls its plugins' hooks."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping
from typing import Any

import pluggy
import structlog

from vetd.controller.actions import OWN_STEPS, ActionOutcome, AlertBackend, HealingStep, SchedulerBackend
from vetd.controller.config import ControllerConfig, SchedulerSection
from vetd.core import hookspecs
from vetd.core.configfile import ConfigError

log = structlog.get_logger("vetd.controller.plugins")

#: Built-ins, registered as third-party plugins are.
BUILTIN_PLUGINS = (("controller-builtins", "vetd.controller.builtins"),)


class ControllerPlugins:
    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("vetd")
        self.pm.add_hookspecs(hookspecs)
        for name, module in BUILTIN_PLUGINS:
            self.pm.register(importlib.import_module(module), name=name)
        for found in hookspecs.entry_point_plugins():
            if found.plugin is None:
                log.error("plugin_import_failed", plugin=found.name, error=found.error)
            else:
                self.pm.register(found.plugin, name=found.name)

    def _merged(self, results: list[Mapping[str, Any]], what: str) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for result in results:
            for name, value in result.items():
                if name in merged:
                    raise ConfigError(f"two plugins provide the {what} {name!r}")
                merged[name] = value
        return merged

    def scheduler_backend(self, section: SchedulerSection) -> SchedulerBackend:
        factories: dict[str, Callable[[SchedulerSection], SchedulerBackend]] = self._merged(
            self.pm.hook.vetd_scheduler_backends(), "scheduler backend")
        factory = factories.get(section.backend)
        if factory is None:
            raise ConfigError(f"scheduler.backend: no backend named {section.backend!r} "
                              f"(backends: {', '.join(sorted(factories))})")
        return factory(section)

    def alert_sinks(self, config: ControllerConfig) -> AlertBackend:
        return AlertSinks([sink for sinks in self.pm.hook.vetd_alert_sinks(config=config) for sink in sinks])

    def healing_steps(self) -> dict[str, HealingStep]:
        steps: dict[str, HealingStep] = self._merged(self.pm.hook.vetd_healing_steps(), "healing step")
        taken = sorted(set(steps) & set(OWN_STEPS))
        if taken:
            raise ConfigError(f"healing step(s) {', '.join(taken)} are the controller's own")
        return steps


class AlertSinks:
    """Every alert to every enabled sink."""

    def __init__(self, sinks: list[AlertBackend]) -> None:
        self.sinks = sinks

    @property
    def enabled(self) -> bool:
        return any(sink.enabled for sink in self.sinks)

    async def send(self, alerts: list[dict[str, Any]]) -> list[ActionOutcome]:
        outcomes: list[ActionOutcome] = []
        for sink in self.sinks:
            if sink.enabled:
                outcomes += await sink.send(alerts)
        return outcomes


@functools.cache
def plugins() -> ControllerPlugins:
    """The plugins of this process (loaded once)."""
    return ControllerPlugins()
