"""What an H200 under driver 580.159.04 answered, held against the simulated library and the source.

``tests/data/nvml/h200.calls.json`` is ``bench/nvml_calls.py`` run on the
GPU by ``scripts/gpu-fixtures``: every NVML call the source makes, with the
return codes the driver gave. The simulation of that node's capture must
answer each call the same way, except where the capture cannot say what the
driver says (:data:`KNOWN`); a new difference fails here, and so does a known
one that went away (then the list says something untrue).
"""

from __future__ import annotations

import time
from pathlib import Path

import msgspec
import pytest

from tests.plugins.gpu_health.test_hardware_fixtures import DATA as CAPTURES
from vetd.plugins.gpu_health.nvml import NvmlSource
from vetd.plugins.gpu_health.nvmlsim import REFRESH_S, SimulatedNvml, install
from vetd.plugins.gpu_health.nvmltrace import Survey, Tracer, differences, survey
from vetd.plugins.gpu_health.replay import CaptureSource, ScenarioSource

pynvml = pytest.importorskip("pynvml")

SURVEYS = Path(__file__).resolve().parents[2] / "data" / "nvml"
NODES = sorted(p.name.removesuffix(".calls.json") for p in SURVEYS.glob("*.calls.json")
               if (CAPTURES / f"{p.name.removesuffix('.calls.json')}.xml").exists())

#: Call classes where the simulation of a capture cannot answer as the driver did, and why.
KNOWN: set[str] = set()  # none since the survey was re-recorded after issue 14 (MIG mode, batched NVLink)


def simulated_survey(capture: Path) -> Survey:
    install(SimulatedNvml.of(CaptureSource(str(capture))))
    return survey(lambda: NvmlSource(process_names=False), snapshots=3, watch_s=0.2, library="simulated")


def test_a_survey_from_a_real_gpu_is_kept() -> None:
    assert NODES, "tests/data/nvml holds no NAME.calls.json beside a NAME.xml capture"


@pytest.mark.parametrize("name", NODES)
def test_the_simulation_answers_every_call_as_the_driver_did(name: str) -> None:
    real = msgspec.json.decode((SURVEYS / f"{name}.calls.json").read_bytes(), type=Survey)
    assert real.library == "libnvidia-ml.so.1" and real.gpus > 0, "not a survey of a real driver"
    simulated = simulated_survey(CAPTURES / f"{name}.xml")
    lines = differences(real, simulated)
    assert {line.split(":")[0] for line in lines} == KNOWN, "\n".join(lines)
    # The same calls per snapshot: the simulation makes the source take the driver's path.
    assert simulated.calls_per_snapshot == real.calls_per_snapshot
    # The event watcher registers what the driver supports and stops within a wait (500 ms).
    assert real.events is not None and real.events.stop_s is not None and real.events.stop_s < 1.0
    assert simulated.events is not None and not simulated.events.error


def test_readings_a_board_never_changes_are_taken_once_per_gpu() -> None:
    """On the H200 the maximum SM clock (1.8 ms) and the thresholds were the dearest calls of a snapshot."""
    install(SimulatedNvml.of(CaptureSource(str(CAPTURES / "h200.xml"))))
    tracer = Tracer()
    tracer.install()
    source = NvmlSource(process_names=False)
    first = source.snapshot()
    for _ in range(3):
        again = source.snapshot()
    calls = {call.key: call.calls for call in tracer.classes()}
    assert calls["nvmlDeviceGetMaxClockInfo(1)"] == 1
    assert calls["nvmlDeviceGetTemperatureThreshold(0)"] == calls["nvmlDeviceGetTemperatureThreshold(1)"] == 1
    assert calls["nvmlDeviceGetClockInfo(1)"] == 4  # the current clock moves: read every time
    assert again.gpus[0].clock_sm_max_mhz == first.gpus[0].clock_sm_max_mhz == 1980.0


def test_a_failed_static_reading_is_tried_again_and_a_new_board_is_read_afresh(tmp_path: Path) -> None:
    scenario = tmp_path / "s.yaml"
    scenario.write_text("gpus: 1\ntimeline:\n"
                        "  - {at: 0s, gpu: 0, nvml_error: {nvmlDeviceGetMaxClockInfo: UNKNOWN}}\n"
                        "  - {at: 1s, gpu: 0, nvml_error: {}}\n"
                        "  - {at: 2s, gpu: 0, set: {uuid: GPU-replaced, clock_sm_max_mhz: 1755}}\n")
    seen = []
    scenario_source = ScenarioSource(str(scenario), at=0.5)
    install(SimulatedNvml.of(scenario_source))
    source = NvmlSource(process_names=False)
    for at in (0.5, 1.5, 2.5):
        scenario_source.at = at
        time.sleep(REFRESH_S * 1.5)  # the simulated driver re-reads its state
        seen.append(source.snapshot().gpus[0])
    assert seen[0].clock_sm_max_mhz is None and any("nvmlDeviceGetMaxClockInfo" in e for e in seen[0].query_errors)
    assert seen[1].clock_sm_max_mhz == 1980.0  # not kept as missing: read again once the driver answers
    assert seen[2].uuid == "GPU-replaced" and seen[2].clock_sm_max_mhz == 1755.0


def test_memory_used_leaves_the_drivers_reservation_out_as_nvidia_smi_does() -> None:
    """NVML's v1 memory info counted the H200's 615 MiB reservation as used; nvidia-smi says 0 MiB used."""
    install(SimulatedNvml.of(CaptureSource(str(CAPTURES / "h200.xml"))))
    gpu = NvmlSource(process_names=False).snapshot().gpus[0]
    assert gpu.memory_used_mib == 0.0 and gpu.memory_reserved_mib == 616.0
    # A driver (or capture) from before nvmlMemory_v2: v1, with the reservation inside "used".
    old = CAPTURES / "telegraf" / "gtx-1070-ti.xml"
    install(SimulatedNvml.of(CaptureSource(str(old))))
    legacy = NvmlSource(process_names=False).snapshot().gpus[0]
    assert legacy.memory_reserved_mib is None and legacy.memory_used_mib is not None
