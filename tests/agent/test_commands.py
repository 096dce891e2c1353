"""What the agent will and will not do when the controller asks."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgspec
import pytest

from vetd.agent.commands import Answer, Commands
from vetd.agent.config import CommandsSection, load_agent_config
from vetd.agent.pluginhost import PluginHost
from vetd.core.protocol import Command


def commands(tmp_path: Path, section: CommandsSection, scenario: str = "gpus: 2\n") -> Commands:
    (tmp_path / "s.yaml").write_text(scenario)
    (tmp_path / "agent.toml").write_text(f'[plugins.gpu_health]\nsource = "scenario"\nscenario = "{tmp_path / "s.yaml"}"\n')
    host = PluginHost(load_agent_config(tmp_path / "agent.toml", environ={}))
    checks = list(host.register_checks())
    return Commands(lambda: section, lambda: host, lambda: checks, lambda _run, _profile: None)


def ask(runner: Commands, action: str, **args: str) -> Answer:
    command = Command(cluster="c", node="n", session="s", seq=0, ts=time.time(), id="1", action=action,
                      args=args, expires=time.time() + 60)
    return asyncio.run(runner.handle(command))


def test_only_allowed_actions_services_and_safe_arguments(tmp_path: Path) -> None:
    runner = commands(tmp_path, CommandsSection(allow=["ping", "restart_service"], services=["fabricmanager"],
                                                restart_service=["/bin/echo", "restarting", "{service}"]))
    assert ask(runner, "ping") == Answer(True, "pong", {})
    refused = ask(runner, "gpu_reset", gpu="0")
    assert not refused.ok and "'gpu_reset' is not allowed" in refused.message
    assert "not in [commands] services" in ask(runner, "restart_service", service="sshd").message
    assert "unsafe argument" in ask(runner, "restart_service", service="x; rm -rf /").message
    done = ask(runner, "restart_service", service="fabricmanager")
    assert done.ok and done.message == "restarting fabricmanager" and done.data["exit"] == "0"
    expired = Command(cluster="c", node="n", session="s", seq=0, ts=0, id="2", action="ping", expires=1.0)
    assert asyncio.run(runner.handle(expired)).message == "refused: expired"


def test_gpu_reset_is_vetoed_while_compute_processes_hold_the_gpu(tmp_path: Path) -> None:
    scenario = ("gpus: 2\ntimeline:\n  - {at: 0s, gpu: 1, set: {processes: [{pid: 4242, name: python, type: C}]}}\n")
    section = CommandsSection(allow=["gpu_reset"], gpu_reset=["/bin/echo", "reset", "{gpu}"],
                              gpu_reset_all=["/bin/echo", "reset", "all"])
    runner = commands(tmp_path, section, scenario)
    busy = ask(runner, "gpu_reset", gpu="1")
    assert not busy.ok and "gpu1: python (4242)" in busy.message
    assert not ask(runner, "gpu_reset", gpu="all").ok
    idle = ask(runner, "gpu_reset", gpu="0")
    assert idle.ok and idle.message == "reset 0"
    failing = msgspec.structs.replace(section, gpu_reset=["/bin/sh", "-c", "echo busy >&2; exit 4"])
    answer = asyncio.run(commands(tmp_path, failing).handle(
        Command(cluster="c", node="n", session="s", seq=0, ts=0, id="3", action="gpu_reset", args={"gpu": "0"})))
    assert not answer.ok and "exited 4: busy" in answer.message


PLUGIN_COMMANDS = '''
from vetd.agent.commands import AgentCommand, Answer
from vetd.agent.api import hookimpl


async def drop_caches(args, context):
    return await context.run(["/bin/echo", "dropped", args.get("level", "3")])


@hookimpl
def vetd_register_commands(registry, configs):
    registry.add(AgentCommand("drop_caches", drop_caches, description="echo 3 > /proc/sys/vm/drop_caches"))
    registry.add(AgentCommand("ping", drop_caches))
'''


def test_a_plugin_adds_a_command_as_the_built_ins_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cmdplugin.py").write_text(PLUGIN_COMMANDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "agent.toml").write_text('[agent]\nload_plugins = ["cmdplugin"]\n')
    host = PluginHost(load_agent_config(tmp_path / "agent.toml", environ={}))
    provided = {command.name: command.plugin for command in host.commands()}
    assert provided == {"drop_caches": "cmdplugin", "gpu_reset": "gpu_health", "restart_service": "host"}
    assert "'ping' is the agent's own command" in host.broken["cmdplugin"]  # and that one is refused
    runner = Commands(lambda: CommandsSection(allow=["ping", "drop_caches"]), lambda: host, lambda: [],
                      lambda _run, _profile: None)
    done = ask(runner, "drop_caches", level="1")
    assert done.ok and done.message == "dropped 1"
    assert ask(runner, "ping") == Answer(True, "pong", {})
    unknown = Commands(lambda: CommandsSection(allow=["reflash"]), lambda: host, lambda: [], lambda _run, _profile: None)
    assert "no loaded plugin provides it" in ask(unknown, "reflash").message


def test_diagnose_runs_the_full_profile_in_service_and_publishes_its_results(tmp_path: Path) -> None:
    """A rule's ``diagnose`` action: the node runs ``full`` now (no drain first); its results go out
    like any others, for the controller's rules; a site that does not allow it refuses it."""
    (tmp_path / "s.yaml").write_text("gpus: 2\n")
    (tmp_path / "agent.toml").write_text(f'[plugins.gpu_health]\nsource = "scenario"\nscenario = "{tmp_path / "s.yaml"}"\n')
    config = load_agent_config(tmp_path / "agent.toml", environ={})
    host = PluginHost(config)
    checks = list(host.register_checks())
    published: list[tuple[str, str]] = []
    runner = Commands(lambda: config.commands, lambda: host, lambda: checks,
                      lambda run, profile: published.append((run.check.name, profile)))
    assert "diagnose" in config.commands.allow  # the shipped default
    answer = ask(runner, "diagnose", profile="full")
    assert {profile for _, profile in published} == {"full"}
    assert {"gpu_health", "gpu_gemm", "host_memory"} <= {name for name, _ in published}
    assert "gpu_idle" not in {name for name, _ in published}  # prolog only: a job may hold the GPUs
    assert answer.data["profile"] == "full" and answer.data["checks"] == str(len(published))
    refused = ask(Commands(lambda: CommandsSection(allow=["ping", "revet"]), lambda: host, lambda: checks,
                           lambda _run, _profile: None), "diagnose", profile="full")
    assert not refused.ok and "'diagnose' is not allowed" in refused.message
