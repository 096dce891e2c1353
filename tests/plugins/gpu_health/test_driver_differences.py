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

import msgspec
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
from vetd.plugins.gpu_health.model import NodeSnapshot
from vetd.plugins.gpu_health.nvml import NvmlSource
from vetd.plugins.gpu_health.nvmlsim import SimulatedNvml, install
from vetd.plugins.gpu_health.replay import CaptureSource, ScenarioSource
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
    runtime = gpu_health.runtime_for(host.configs)  # the one the agent's checks and commands share
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
timeline:   # an event while no set is open is gone, as on a driver: one of these arrives after the retries
  - {at: 3s, gpu: 1, xid: 31}
  - {at: 6s, gpu: 1, xid: 31}
  - {at: 9s, gpu: 1, xid: 31}
  - {at: 12s, gpu: 1, xid: 31}
""")
    runtime = GpuRuntime(GpuHealthConfig(source="scenario", scenario=scenario, through_nvml=True))
    seen = watch(runtime, 1, timeout=20)
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


def test_mig_mode_names_the_checks_it_stops_rather_than_passing_them(tmp_path: Path) -> None:
    """Under MIG, volatile ECC, remapped rows and processes are NOT_SUPPORTED per device handle."""
    source = ScenarioSource(write(tmp_path, """
gpus: 2
timeline:
  - {at: 0s, gpu: 1, set: {mig_enabled: true, ecc_volatile_dram_uncorrectable: 4}}
"""), at=1)
    snapshot = through_nvml(source).snapshot()
    mig = snapshot.gpus[1]
    assert (mig.mig_enabled, mig.volatile_uncorrectable, mig.remapped_rows_pending, mig.processes) == (
        True, None, None, None)
    assert snapshot.gpus[0].mig_enabled is False
    got = verdicts(source)
    assert got[1] == ("gpu0", "pass", [])
    assert got[2] == ("gpu1", "pass", ["mig_enabled", "unsupported:ecc_volatile", "unsupported:row_remap"])
    idle = Evaluator(GpuHealthConfig()).idle(snapshot)[1]
    assert (idle.status, idle.codes) == ("pass", ["mig_enabled", "unsupported:processes"])
    assert "not checked: stray processes" in idle.message


@pytest.mark.parametrize(("driver", "missing"), [
    ("550.54.15", ["unsupported:reset_status", "unsupported:recovery_action"]),
    ("560.35.03", ["unsupported:recovery_action"]),
    ("570.86.15", []),
    ("580.95.05", []),
])
def test_a_result_says_which_driver_verdicts_its_driver_cannot_give(
    driver: str, missing: list[str], tmp_path: Path
) -> None:
    """550 has neither reset field (226/227) nor the recovery action (230); 570+ has 230 (226/227 deprecated)."""
    source = ScenarioSource(write(tmp_path, f'gpus: 1\ndriver: "{driver}"\n'), at=0)
    gpu = through_nvml(source).snapshot().gpus[0]
    assert (gpu.reset_required is None, gpu.recovery_action is None) == (driver < "555", driver < "570")
    assert verdicts(source)[1] == ("gpu0", "pass", missing)


def test_thresholds_printed_relative_to_tlimit_still_drive_the_thermal_check() -> None:
    """nvidia-smi 580 prints an H200's thresholds relative to T.Limit only; the driver said 89/95 °C."""
    capture = Path(__file__).resolve().parents[2] / "data" / "nvidia-smi" / "h200.xml"
    gpu = through_nvml(CaptureSource(str(capture))).snapshot().gpus[0]
    assert (gpu.temp_slowdown_c, gpu.temp_shutdown_c) == (89.0, 95.0)
    hot = msgspec.structs.replace(gpu, temp_c=86.0)
    assert "temp_high" in Evaluator(GpuHealthConfig()).health(
        NodeSnapshot(source="t", taken=0, gpus=[hot]), 1)[1].codes


def h100_links(crc_on_5: int) -> str:
    return ", ".join(f"{{link: {i}, up: true, replay_errors: 0, recovery_errors: {i // 9}, "
                     f"crc_errors: {crc_on_5 if i == 5 else 0}}}" for i in range(18))


#: Link 3 of gpu1 goes down at 2s; gpu2's link 5 counts CRC errors, more at 4s.
NVLINK_FAULTS = f"""
gpus: 4
timeline:
  - {{at: 1s, gpu: 2, set: {{nvlinks: [{h100_links(7)}]}}}}
  - {{at: 2s, gpu: 1, nvlink_down: [3]}}
  - {{at: 4s, gpu: 2, set: {{nvlinks: [{h100_links(900)}]}}}}
"""


def nvlinks_through_nvml(tmp_path: Path, scenario: str, at: float) -> tuple[list[object], int]:
    """Every GPU's NVLinks at ``at`` through the live path, and the NVML calls the snapshot made."""
    path = tmp_path / f"at{at:g}.yaml"
    path.write_text(scenario)
    simulation = SimulatedNvml.of(ScenarioSource(str(path), at=at))
    install(simulation)
    source = NvmlSource(expected=lambda: None, process_names=False)
    source.snapshot()  # the first one probes which links answer
    calls = simulation.calls
    snapshot = source.snapshot()
    return [gpu.nvlinks for gpu in snapshot.gpus], simulation.calls - calls


@pytest.mark.parametrize("at", [0.0, 1.0, 2.0, 4.0])
def test_nvlinks_read_in_one_call_per_gpu_read_as_link_by_link(tmp_path: Path, at: float) -> None:
    """One field-values call per GPU (scopeId = link) reads what five calls per link read; a driver
    that answers the per-link fields NOT_SUPPORTED is read link by link."""
    old_driver = NVLINK_FAULTS + "".join(
        f"  - {{at: 0s, gpu: {gpu}, nvml_error: {{NVML_FI_DEV_NVLINK_GET_STATE: NOT_SUPPORTED}}}}\n"
        for gpu in range(4))
    batched, batched_calls = nvlinks_through_nvml(tmp_path, NVLINK_FAULTS, at)
    per_link, per_link_calls = nvlinks_through_nvml(tmp_path, old_driver, at)
    assert batched == per_link
    assert per_link_calls - batched_calls == 4 * (18 * 5 - 1)
    links = {(gpu, link.link): link for gpu, each in enumerate(batched) for link in each or []}
    assert len(links) == 4 * 18
    assert links[1, 3].up is (at < 2.0)
    assert links[2, 5].crc_errors == (0 if at < 1.0 else 7 if at < 4.0 else 900)
    assert links[2, 9].recovery_errors == (0 if at < 1.0 else 1)


def test_a_driver_without_field_values_is_read_link_by_link(tmp_path: Path) -> None:
    """The call itself refused (an older driver): NVLinks still read, and the fields not asked again."""
    refused = NVLINK_FAULTS + "  - {at: 0s, gpu: 0, nvml_error: {nvmlDeviceGetFieldValues: NOT_SUPPORTED}}\n"
    links, calls = nvlinks_through_nvml(tmp_path, refused, 4.0)
    assert links == nvlinks_through_nvml(tmp_path, NVLINK_FAULTS, 4.0)[0]
    assert calls > 4 * 18 * 5


def test_links_beyond_18_are_read_in_the_batch(tmp_path: Path) -> None:
    """NVML counts up to 36 links per GPU: links 18-35 answer through the scoped fields as well."""
    links = ", ".join(f"{{link: {i}, up: {'false' if i == 35 else 'true'}, replay_errors: {i}, "
                      f"recovery_errors: 0, crc_errors: 0}}" for i in range(36))
    got, _ = nvlinks_through_nvml(tmp_path, f"gpus: 1\nbase: {{nvlinks: [{links}]}}\n", 0.0)
    assert [(link.link, link.up, link.replay_errors) for link in got[0] or []][-2:] == [(34, True, 34),
                                                                                      (35, False, 35)]


def test_thresholds_from_tlimit_fields_when_the_classic_ones_are_absent(tmp_path: Path) -> None:
    """A driver that answers the classic thresholds NOT_SUPPORTED: the T.Limit fields (193/194) and
    the margin give them in °C, so the thermal check still runs; without those either, it says so."""
    scenario = write(tmp_path, """
gpus: 3
timeline:
  - {at: 0s, gpu: 1, nvml_error: {nvmlDeviceGetTemperatureThreshold: NOT_SUPPORTED}}
  - {at: 0s, gpu: 2, nvml_error: {nvmlDeviceGetTemperatureThreshold: NOT_SUPPORTED,
                                  NVML_FI_DEV_TEMPERATURE_SLOWDOWN_TLIMIT: NOT_SUPPORTED}}
  - {at: 0s, gpu: 1, set: {temp_c: 86}}
  - {at: 0s, gpu: 2, set: {temp_c: 86}}
""")
    source = ScenarioSource(scenario, at=1)
    gpus = through_nvml(source).snapshot().gpus
    assert [(g.temp_slowdown_c, g.temp_shutdown_c) for g in gpus] == [(87.0, 92.0), (87.0, 92.0), (None, 92.0)]
    got = {entity: codes for entity, _status, codes in verdicts(source)}
    assert "temp_high" in got["gpu1"]
    assert "unsupported:thermal" in got["gpu2"]
