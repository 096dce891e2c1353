"""The controller's extension points: scheduler backends, alert sinks and healing steps from a plugin."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from vetd.agent.config import AgentConfig
from vetd.agent.pluginhost import PluginError, PluginHost
from vetd.controller.config import ControllerConfig, SchedulerSection
from vetd.controller.plugins import ControllerPlugins, plugins
from vetd.controller.rules import load_rules
from vetd.core.configfile import ConfigError

SITE = '''
from vetd.controller.actions import ActionOutcome
from vetd.controller.actions import HealingStep
from vetd.core.hookspecs import hookimpl

SENT = []


class Recorder:
    name = "recorder"

    async def drain(self, node, reason):
        return ActionOutcome(True, "done", f"recorded {node}")

    async def resume(self, node):
        return ActionOutcome(True, "done", "")

    async def reboot(self, node, reason):
        return ActionOutcome(False, "skipped", "")


class Pager:
    enabled = True

    async def send(self, alerts):
        SENT.extend(alerts)
        return [ActionOutcome(True, "done", "paged")]


@hookimpl
def vetd_scheduler_backends():
    return {"recorder": lambda section: Recorder()}


@hookimpl
def vetd_alert_sinks(config):
    return [Pager()]


@hookimpl
def vetd_healing_steps():
    return {"drop_caches": HealingStep("drop_caches", lambda arg, gpu: {"level": arg or "3"})}
'''


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An installed distribution whose entry point serves the controller's hooks."""
    (tmp_path / "sitectl.py").write_text(SITE)
    info = tmp_path / "sitectl-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sitectl\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[vetd]\nsitectl = sitectl\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins.cache_clear()
    yield tmp_path
    plugins.cache_clear()
    sys.modules.pop("sitectl", None)


def heal_rule(path: Path, ladder: str) -> Path:
    path.write_text(f"rules:\n  - name: fix\n    when: result.status == 'fail'\n    actions: [drain, heal]\n"
                    f"    heal: [{ladder}]\n")
    return path


@pytest.mark.usefixtures("site")
def test_backends_sinks_and_steps_come_from_plugins() -> None:
    found = ControllerPlugins()
    backend = found.scheduler_backend(SchedulerSection(backend="recorder"))
    assert asyncio.run(backend.drain("nid001", "vetd: x")).detail == "recorded nid001"
    assert found.scheduler_backend(SchedulerSection(backend="none")).name == "none"  # the built-ins are there too
    with pytest.raises(ConfigError, match="no backend named 'pbs' .*none, recorder, slurm"):
        found.scheduler_backend(SchedulerSection(backend="pbs"))
    sinks = found.alert_sinks(ControllerConfig())  # no [alerts] urls: only the plugin's sink
    assert sinks.enabled and asyncio.run(sinks.send([{"labels": {"alertname": "x"}}]))[0].detail == "paged"
    assert sys.modules["sitectl"].SENT == [{"labels": {"alertname": "x"}}]
    assert set(found.healing_steps()) == {"gpu_reset", "restart_service", "drop_caches"}


def test_rules_may_name_a_plugins_healing_step_and_no_unknown_one(site: Path) -> None:
    assert load_rules([heal_rule(site / "ok.yaml", "drop_caches, gpu_reset, reboot, revet prolog")]).rules
    with pytest.raises(ConfigError, match="unknown step 'flash_bios'.*drop_caches, gpu_reset, reboot"):
        load_rules([heal_rule(site / "bad.yaml", "flash_bios")])
    with pytest.raises(ConfigError, match="restart_service needs an argument, e.g. 'restart_service nvidia"):
        load_rules([heal_rule(site / "arg.yaml", "restart_service")])


@pytest.mark.usefixtures("site")
def test_a_plugin_serving_both_sides_loads_in_the_agent_too() -> None:
    host = PluginHost(AgentConfig())
    assert "sitectl" in host.names() and not host.broken


def test_a_hook_no_part_of_vetd_specifies_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "typo.py").write_text("from vetd.agent.api import hookimpl\n\n\n@hookimpl\n"
                                      "def vetd_register_chekcs(registry, configs):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match="vetd_register_chekcs"):
        PluginHost(AgentConfig(agent=msgspec.structs.replace(AgentConfig().agent, load_plugins=["typo"])))
