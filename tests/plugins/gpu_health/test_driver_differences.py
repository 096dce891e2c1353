"""Real-driver behaviour (issue 14, item 2), each through the live NVML code path on the simulated library.

Each test here failed before the change it covers: the simulated driver
behaves as the real one does (a GPU denied by cgroups, MIG on, a driver
without a field, a GPU lost under the event set, a reset refused while NVML
is held), and :class:`~vetd.plugins.gpu_health.nvml.NvmlSource` must read it
right.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from tests.plugins.gpu_health.test_nvml import through_nvml, write
from tests.support.procs import run_vetd, vetd_argv
from tests.support.wait import wait_for
from vetd.agent.api import EventOutcome, Outcome
from vetd.agent.commands import Answer, Commands
from vetd.agent.config import CommandsSection, load_agent_config
from vetd.agent.pluginhost import PluginHost
from vetd.core.protocol import Command
from vetd.plugins import gpu_health
from vetd.plugins.gpu_health.config import GpuHealthConfig
from vetd.plugins.gpu_health.evaluate import Evaluator
from vetd.plugins.gpu_health.replay import ScenarioSource
from vetd.plugins.gpu_health.runtime import GpuRuntime

pynvml = pytest.importorskip("pynvml")


def verdicts(source: ScenarioSource, expected: int | None = None) -> list[tuple[str, str, list[str]]]:
    snapshot = through_nvml(source).snapshot()
    outcomes = Evaluator(GpuHealthConfig()).health(snapshot, expected if expected is not None
                                                   else source.expected_gpus())
    return [(o.entity, o.status, o.codes) for o in outcomes]


def test_a_gpu_denied_to_the_agent_is_skipped_not_lost(tmp_path: Path) -> None:
    """A cgroup-confined agent: the driver counts 4 GPUs, 2 of them answer NO_PERMISSION."""
    source = ScenarioSource(write(tmp_path, """
gpus: 4
timeline:
  - {at: 0s, gpu: 2, set: {no_permission: true}}
  - {at: 0s, gpu: 3, set: {no_permission: true}}
"""), at=1)
    snapshot = through_nvml(source).snapshot()
    assert [g.no_permission for g in snapshot.gpus] == [False, False, True, True]
    assert not any(g.lost for g in snapshot.gpus)
    got = verdicts(source)
    assert got == [("node", "pass", []), ("gpu0", "pass", []), ("gpu1", "pass", []),
                   ("gpu2", "skip", ["no_permission"]), ("gpu3", "skip", ["no_permission"])]
    node = Evaluator(GpuHealthConfig()).count(snapshot, 4)
    assert node.metrics["gpus_no_permission"] == 2.0 and "gpus_lost" not in node.metrics
    idle = Evaluator(GpuHealthConfig()).idle(snapshot)
    assert [(o.entity, o.status, o.codes) for o in idle][2:] == [("gpu2", "skip", ["no_permission"]),
                                                                ("gpu3", "skip", ["no_permission"])]


def agent_commands(tmp_path: Path, scenario: str, section: CommandsSection) -> tuple[Commands, GpuRuntime]:
    (tmp_path / "agent.toml").write_text(
        f'[plugins.gpu_health]\nsource = "scenario"\nscenario = "{scenario}"\nthrough_nvml = true\n')
    host = PluginHost(load_agent_config(tmp_path / "agent.toml", environ={}))
    checks = list(host.register_checks())
    runtime = next(iter(gpu_health._runtimes.values()))
    return Commands(lambda: section, lambda: host, lambda: checks, lambda _run, _profile: None), runtime


def ask(runner: Commands, action: str, **args: str) -> Answer:
    command = Command(cluster="c", node="n", session="s", seq=0, ts=time.time(), id="1", action=action,
                      args=args, expires=time.time() + 60)
    return asyncio.run(runner.handle(command))


def test_gpu_reset_lets_go_of_nvml_for_the_reset_the_driver_refuses_while_it_is_held(tmp_path: Path) -> None:
    """nvidia-smi -r refuses while any NVML client holds the GPU; the agent's own healing step let go first."""
    scenario = write(tmp_path, "gpus: 2\n")
    stand_in = [*vetd_argv("nvml-sim", "reset", scenario)]
    section = CommandsSection(allow=["gpu_reset"], gpu_reset=[*stand_in, "-i", "{gpu}"], gpu_reset_all=stand_in,
                              timeout=60)  # type: ignore[arg-type]
    runner, runtime = agent_commands(tmp_path, scenario, section)
    assert [o.status for o in runtime.health()] == ["pass", "pass", "pass"]  # NVML open, as in the agent
    stop = threading.Event()
    seen: list[object] = []
    watcher = threading.Thread(target=runtime.watch_driver, args=(seen.append, stop))
    watcher.start()  # and an event set open
    try:
        # The stand-in refuses while anyone holds the simulated NVML, as the driver does.
        held = run_vetd("nvml-sim", "reset", scenario, "-i", "0")
        assert held.returncode == 255 and "is currently in use by another process" in held.stdout
        done = ask(runner, "gpu_reset", gpu="0")
        assert done.ok, done.message
        assert "was successfully reset" in done.message and done.data["nvml"].startswith("NVML shut down")
        everyone = ask(runner, "gpu_reset", gpu="all")
        assert everyone.ok and everyone.message.endswith("All done."), everyone.message
        # Afterwards NVML is open again and the checks read the GPUs.
        assert [o.status for o in runtime.health()] == ["pass", "pass", "pass"]
        assert run_vetd("nvml-sim", "reset", scenario).returncode == 255
    finally:
        stop.set()
        watcher.join(5)
    assert not watcher.is_alive()


def test_checks_asked_for_during_a_reset_skip_rather_than_open_nvml_again(tmp_path: Path) -> None:
    config = GpuHealthConfig(source="scenario", scenario=write(tmp_path, "gpus: 1\n"), through_nvml=True)
    runtime = GpuRuntime(config)
    assert runtime.health()[0].status == "pass"

    async def during() -> list[Outcome]:
        async with runtime.nvml_released():
            return await asyncio.to_thread(runtime.health)

    outcomes = asyncio.run(during())
    assert [(o.status, o.codes) for o in outcomes] == [("skip", ["gpu_reset_in_progress"])]
    assert [o.status for o in runtime.health()] == ["pass", "pass"]


def watch(runtime: GpuRuntime, count: int, timeout: float = 15) -> list[EventOutcome]:
    seen: list[EventOutcome] = []
    stop = threading.Event()
    watcher = threading.Thread(target=runtime.watch_driver, args=(seen.append, stop))
    watcher.start()
    try:
        wait_for(lambda: len(seen) >= count, timeout, f"{count} events")
    finally:
        stop.set()
        watcher.join(5)
    assert not watcher.is_alive()
    return seen


def test_a_driver_that_loads_after_the_agent_is_waited_for(tmp_path: Path) -> None:
    """nvmlInit fails (DRIVER_NOT_LOADED) at agent start: the event watcher tries again, it does not give up."""
    scenario = write(tmp_path, """
gpus: 2
driver_ready_at: 1.5s
timeline:
  - {at: 3s, gpu: 1, xid: 31}
""")
    runtime = GpuRuntime(GpuHealthConfig(source="scenario", scenario=scenario, through_nvml=True))
    seen = watch(runtime, 1)
    assert [(e.entity, e.codes[0]) for e in seen] == [("pci:0000:28:00", "xid_31")]


def test_a_lost_gpu_leaves_the_other_gpus_events_watched(tmp_path: Path) -> None:
    """After GPU 0 falls off the bus every wait on its event set answers GPU_IS_LOST."""
    scenario = write(tmp_path, """
gpus: 3
timeline:
  - {at: 0.5s, gpu: 0, vanish: true}
  - {at: 2s, gpu: 2, xid: 13}
  - {at: 2.5s, gpu: 1, event: fatal_poison}
""")
    runtime = GpuRuntime(GpuHealthConfig(source="scenario", scenario=scenario, through_nvml=True))
    seen = watch(runtime, 3)
    assert [(e.name, e.entity, e.codes[0]) for e in seen] == [
        ("gpu_event", "pci:0000:18:00", "gpu_unavailable"),  # reported once, then left out
        ("xid", "pci:0000:38:00", "xid_13"),
        ("gpu_event", "pci:0000:28:00", "fatal_poison"),
    ]
