"""The live NVML source, run through pynvml against the simulated libnvidia-ml.

pynvml's wrappers, structures and error classes are the real ones; only the C
library under them is :mod:`vetd.plugins.gpu_health.nvmlsim`. What these tests show:
NvmlSource reads what the driver says (units, bit masks, "not supported"),
and it keeps going, honestly, when the driver says something bad.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import msgspec
import pytest

from tests.plugins.gpu_health.test_capture import CAPTURES
from tests.plugins.gpu_health.test_hardware_fixtures import DATA as HARDWARE
from tests.support.procs import run_vetd
from tests.support.wait import wait_for
from vetd.agent.checks import SourceUnavailable
from vetd.plugins.gpu_health.config import GpuHealthConfig
from vetd.plugins.gpu_health.evaluate import Evaluator
from vetd.plugins.gpu_health.model import TELEMETRY_FIELDS, DriverEvent, GpuSnapshot
from vetd.plugins.gpu_health.nvml import NvmlSource
from vetd.plugins.gpu_health.nvmlsim import REFRESH_S, SimulatedNvml, install
from vetd.plugins.gpu_health.replay import CaptureSource, ScenarioSource
from vetd.plugins.gpu_health.runtime import GpuRuntime
from vetd.plugins.gpu_health.sources import Source

pynvml = pytest.importorskip("pynvml")

#: Not read through NVML: process names come from /proc, which a capture's PIDs are not in.
NOT_FROM_NVML = {"processes"}


def through_nvml(source: CaptureSource | ScenarioSource) -> NvmlSource:
    install(SimulatedNvml.of(source))
    return NvmlSource(expected=source.expected_gpus, process_names=False)


def comparable(gpu: GpuSnapshot) -> dict[str, object]:
    """What gpu_health reads: the telemetry plugin's fields (TELEMETRY_FIELDS) it leaves to that plugin."""
    fields = {k: v for k, v in msgspec.structs.asdict(gpu).items() if k not in TELEMETRY_FIELDS}
    processes = fields.pop("processes")
    fields["pids"] = None if processes is None else sorted(p.pid for p in processes if "C" in p.type)
    return fields


#: Telegraf's captures (tests/data/nvidia-smi/telegraf) and those recorded on real GPUs by scripts/gpu-fixtures.
ALL_CAPTURES = {p.name: p for folder in (CAPTURES, HARDWARE) for p in sorted(folder.glob("*.xml"))}


@pytest.mark.parametrize("name", sorted(ALL_CAPTURES))
def test_every_capture_reads_the_same_through_nvml(name: str) -> None:
    direct = CaptureSource(str(ALL_CAPTURES[name]))
    expected = direct.snapshot()
    got = through_nvml(direct).snapshot()
    assert (got.driver_version, got.cuda_version) == (expected.driver_version, expected.cuda_version)
    assert len(got.gpus) == len(expected.gpus) > 0
    for mine, theirs in zip(got.gpus, expected.gpus, strict=True):
        assert comparable(mine) == comparable(theirs)
    # The verdicts match too, except the capture's own incompleteness (the A100
    # dump lists 1 of its 4 GPUs; a driver lists every GPU it counts).
    ours = [(o.entity, o.codes) for o in Evaluator(GpuHealthConfig()).health(got, None)]
    theirs = [(o.entity, [c for c in o.codes if c != "gpu_list_incomplete"])
              for o in Evaluator(GpuHealthConfig()).health(expected, None)]
    assert ours == theirs


def test_known_values_of_a_capture_arrive_in_nvml_units() -> None:
    path = CAPTURES / "a100-sxm4-v12.xml"
    gpu = through_nvml(CaptureSource(str(path))).snapshot().gpus[0]
    # milliwatts, bytes and bit masks on the wire; watts, MiB and names here
    assert (gpu.power_w, gpu.power_limit_w) == (67.03, 500.0)
    assert (gpu.memory_used_mib, gpu.memory_total_mib) == (50, 81920)
    assert (gpu.temp_c, gpu.temp_memory_c, gpu.temp_slowdown_c) == (27, 44, 89)
    assert gpu.clock_reasons == [] and gpu.reset_required is False
    assert gpu.utilization_pct is None  # NOT_SUPPORTED stays "not supported", not 0


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "scenario.yaml"
    path.write_text(text)
    return str(path)


FAULTS = Path(__file__).resolve().parents[3] / "packaging" / "scenarios" / "h100-faults.yaml"


@pytest.mark.parametrize("at", [0.0, 3.0, 5.0, 7.0])
def test_scenario_faults_read_the_same_through_nvml(at: float) -> None:
    direct = ScenarioSource(str(FAULTS), at=at)
    got = through_nvml(ScenarioSource(str(FAULTS), at=at)).snapshot()
    expected = direct.snapshot()
    assert [comparable(g) for g in got.gpus] == [comparable(g) for g in expected.gpus]
    verdicts = Evaluator(GpuHealthConfig()).health(got, 8)
    assert verdicts == Evaluator(GpuHealthConfig()).health(expected, 8)
    assert any(o.status == "fail" for o in verdicts) == (at >= 2)


def test_a_gpu_that_fell_off_the_bus_is_lost_and_named_as_last_seen(
    tmp_path: Path
) -> None:
    source = ScenarioSource(write(tmp_path, "gpus: 4\ntimeline:\n  - {at: 5s, gpu: 2, vanish: true}\n"), at=0)
    nvml = through_nvml(source)
    before = nvml.snapshot()
    source.at = 6.0
    time.sleep(REFRESH_S * 1.5)  # the simulated driver re-reads its state
    after = nvml.snapshot()
    lost = after.gpus[2]
    assert (lost.lost, lost.pci_bus_id, lost.uuid) == (True, before.gpus[2].pci_bus_id, before.gpus[2].uuid)
    assert lost.query_errors == ["nvmlDeviceGetHandleByIndex: GPU is lost"]
    assert after.attached_gpus == 4 and [g.lost for g in after.gpus] == [False, False, True, False]
    outcomes = Evaluator(GpuHealthConfig()).health(after, source.expected_gpus())
    assert [(o.entity, o.status, o.codes) for o in outcomes] == [
        ("node", "fail", ["gpu_missing"]), ("gpu0", "pass", []), ("gpu1", "pass", []),
        ("gpu2", "fail", ["gpu_lost"]), ("gpu3", "pass", [])]
    assert outcomes[0].metrics["gpus_lost"] == 1.0


@pytest.mark.parametrize(("error", "status", "code"), [
    ("UNKNOWN", "warn", "driver_query_failed"),
    ("CORRUPTED_INFOROM", "warn", "driver_query_failed"),
    ("RESET_REQUIRED", "fail", "reset_required"),
    ("GPU_IS_LOST", "fail", "gpu_lost"),
    ("NOT_SUPPORTED", "pass", None),
])
def test_driver_errors_are_reported_not_swallowed(
    error: str, status: str, code: str | None, tmp_path: Path
) -> None:
    source = ScenarioSource(write(tmp_path, f"""
gpus: 2
timeline:
  - {{at: 1s, gpu: 1, nvml_error: {{nvmlDeviceGetPowerUsage: {error}}}}}
"""), at=2)
    snapshot = through_nvml(source).snapshot()
    gpu = snapshot.gpus[1]
    assert gpu.power_w is None and snapshot.gpus[0].power_w == 70.0
    outcome = Evaluator(GpuHealthConfig()).health(snapshot, 2)[2]
    assert (outcome.status, outcome.codes) == (status, [code] if code else [])
    if code == "driver_query_failed":
        assert "1 driver queries failed: nvmlDeviceGetPowerUsage: " in outcome.message
        assert gpu.query_errors == [outcome.message.split("failed: ")[1]]


def test_without_a_per_location_split_the_ecc_total_still_catches_a_dbe(
    tmp_path: Path
) -> None:
    source = ScenarioSource(write(tmp_path, """
gpus: 1
timeline:
  - {at: 0s, gpu: 0, nvml_error: {nvmlDeviceGetMemoryErrorCounter: NOT_SUPPORTED}}
  - {at: 0s, gpu: 0, set: {ecc_volatile_dram_uncorrectable: 3}}
"""), at=1)
    snapshot = through_nvml(source).snapshot()
    gpu = snapshot.gpus[0]
    assert gpu.ecc_volatile_dram_uncorrectable is None and gpu.ecc_volatile_uncorrectable_total == 3
    assert gpu.volatile_uncorrectable == 3 and gpu.volatile_correctable == 0
    outcome = Evaluator(GpuHealthConfig()).health(snapshot, 1)[1]
    assert (outcome.status, outcome.codes) == ("fail", ["ecc_dbe"])


def test_xids_and_health_events_arrive_through_the_event_set_even_from_a_lost_gpu(
    tmp_path: Path
) -> None:
    scenario = write(tmp_path, """
gpus: 4
timeline:
  - {at: 0.2s, gpu: 3, xid: 79, message: "GPU has fallen off the bus."}
  - {at: 0.2s, gpu: 3, vanish: true}
  - {at: 0.8s, gpu: 2, event: fatal_poison}
  - {at: 0.9s, gpu: 1, xid: 31}
  - {at: 1.0s, gpu: 0, set: {recovery_action: Drain and Reset}, event: recovery_action}
""")

    def events(source: Source, count: int = 4) -> list[DriverEvent]:
        seen: list[DriverEvent] = []
        stop = threading.Event()
        watcher = threading.Thread(target=source.watch, args=(seen.append, stop))
        watcher.start()
        try:
            wait_for(lambda: len(seen) >= count, 10, f"{count} events")
        finally:
            stop.set()
            watcher.join(5)
        assert not watcher.is_alive()
        return seen

    nvml = through_nvml(ScenarioSource(scenario))
    bus = {g.index: g.pci_bus_id for g in nvml.snapshot().gpus}
    # Once GPU 3 is lost every wait on its set answers GPU_IS_LOST: the set is built
    # again without it (reported once) and the other GPUs' events still arrive.
    assert events(nvml, 5) == [
        DriverEvent(bus[3], "xid", 79, "reported by NVML"),
        DriverEvent(bus[3], "gpu_unavailable", 0, "GPU is lost (NVML_ERROR_GPU_IS_LOST): no longer watched"),
        DriverEvent(bus[2], "fatal_poison", 0, ""),
        DriverEvent(bus[1], "xid", 31, "reported by NVML"),
        # the action is read from the GPU's recovery-action field, as gpu_health reads it
        DriverEvent(bus[0], "recovery_action", 0, "Drain and Reset"),
    ]
    direct = events(ScenarioSource(scenario))
    assert [(e.pci, e.kind, e.value) for e in direct] == [(bus[3], "xid", 79), (bus[2], "fatal_poison", 0),
                                                          (bus[1], "xid", 31), (bus[0], "recovery_action", 0)]
    assert direct[0].detail == "GPU has fallen off the bus." and direct[3].detail == "Drain and Reset"


def test_the_event_set_delivers_only_the_types_registered(tmp_path: Path) -> None:
    nvml = through_nvml(ScenarioSource(write(tmp_path, """
gpus: 1
timeline:
  - {at: 0.1s, gpu: 0, event: sbe_storm}
  - {at: 0.2s, gpu: 0, xid: 13}
""")))
    events = pynvml.nvmlEventSetCreate()
    try:
        pynvml.nvmlDeviceRegisterEvents(pynvml.nvmlDeviceGetHandleByIndex(0), pynvml.nvmlEventTypeXidCriticalError,
                                        events)
        data = pynvml.nvmlEventSetWait_v2(events, 5000)
        assert (data.eventType, data.eventData) == (pynvml.nvmlEventTypeXidCriticalError, 13)
        with pytest.raises(pynvml.NVMLError_Timeout):
            pynvml.nvmlEventSetWait_v2(events, 200)
    finally:
        pynvml.nvmlEventSetFree(events)
    assert nvml.snapshot().gpus[0].index == 0


def test_a_hung_driver_inside_nvml_is_driver_unresponsive(tmp_path: Path) -> None:
    scenario = write(tmp_path, "gpus: 2\ntimeline:\n  - {at: 0s, hang: true}\n")
    config = GpuHealthConfig(source="scenario", scenario=scenario, through_nvml=True,
                             driver_timeout=0.3)  # type: ignore[arg-type]
    outcomes = GpuRuntime(config).health()
    assert [(o.status, o.codes) for o in outcomes] == [("fail", ["driver_unresponsive"])]


def test_no_library_is_source_unavailable() -> None:
    class Missing:
        def __getattr__(self, name: str) -> object:
            raise AttributeError(name)

    install(Missing())  # type: ignore[arg-type]
    with pytest.raises(SourceUnavailable, match="NVML: Function Not Found"):
        NvmlSource()


def test_cli_through_nvml_gives_the_scenario_verdicts() -> None:
    def verdicts(*extra: str) -> list[tuple[str, str, list[str]]]:
        done = run_vetd("check", "gpu_health", "--scenario", str(FAULTS), "--at", "9s", "--json", *extra)
        assert done.returncode == 1, done.stderr
        return [(r["entity"], r["status"], r["codes"]) for r in map(json.loads, done.stdout.splitlines())]

    direct, simulated = verdicts(), verdicts("--through-nvml")
    # the vanished GPU: the scenario drops it, the driver lists it as lost
    assert simulated == [*direct, ("gpu7", "fail", ["gpu_lost"])]
    assert direct[0] == ("node", "fail", ["gpu_missing"])
    refused = run_vetd("check", "gpu_health", "--through-nvml")
    assert refused.returncode == 2 and "--through-nvml needs --capture or --scenario" in refused.stderr
