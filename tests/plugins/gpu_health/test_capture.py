"""Every real capture in tests/data/nvidia-smi/telegraf parses, with the values it holds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.procs import run_vetd
from vetd.plugins.gpu_health.capture import CaptureError, load_capture, parse_capture

#: Real captures from Telegraf's test data, kept in the repository (README.md there).
CAPTURES = Path(__file__).resolve().parents[2] / "data" / "nvidia-smi" / "telegraf"


def capture(name: str) -> Path:
    path = CAPTURES / name
    assert path.exists(), f"{path} is missing from the checkout"
    return path


def test_a100_v12() -> None:
    snap = load_capture(capture("a100-sxm4-v12.xml"))
    assert (snap.driver_version, snap.cuda_version, snap.attached_gpus) == ("535.54.03", "12.2", 4)
    gpu = snap.gpus[0]
    assert gpu.name == "NVIDIA A100-SXM4-80GB"
    assert gpu.uuid == "GPU-513536b6-7d19-9063-b049-1e69664bb298"
    assert gpu.pci_bus_id == "00000000:01:00.0"
    assert (gpu.temp_c, gpu.temp_memory_c, gpu.temp_slowdown_c, gpu.temp_shutdown_c) == (27, 44, 89, 92)
    assert gpu.ecc_enabled is True and gpu.volatile_uncorrectable == 0 and gpu.volatile_correctable == 0
    assert (gpu.pcie_gen, gpu.pcie_gen_max, gpu.pcie_width, gpu.pcie_width_max) == (4, 4, 16, 16)
    assert (gpu.power_w, gpu.power_limit_w) == (67.03, 500.0)
    assert (gpu.memory_used_mib, gpu.memory_total_mib) == (50, 81920)
    assert gpu.reset_required is False and gpu.drain_and_reset_recommended is False
    assert gpu.clock_reasons == []  # v12: clocks_event_reason_*
    assert gpu.utilization_pct is None  # "N/A" is not supported, not 0
    assert gpu.remapped_rows_uncorrectable is None and gpu.retired_pages is None


def test_a10g_v11_with_row_remapping_and_throttle_reasons() -> None:
    snap = load_capture(capture("a10g.xml"))
    gpu = snap.gpus[0]
    assert (gpu.name, snap.driver_version) == ("NVIDIA A10G", "515.105.01")
    assert gpu.temp_c == 17 and gpu.ecc_enabled is True
    assert (gpu.remapped_rows_correctable, gpu.remapped_rows_uncorrectable) == (0, 0)
    assert gpu.remapped_rows_pending is False and gpu.remapped_rows_failure is False
    assert gpu.clock_reasons == ["gpu_idle"]  # v11: clocks_throttle_reason_*
    assert (gpu.pcie_gen, gpu.pcie_gen_max, gpu.pcie_width, gpu.pcie_width_max) == (1, 4, 8, 16)
    assert [(p.pid, p.type) for p in gpu.processes or []] == [(725, "G")]


def test_t4_v11_retired_pages_and_a_compute_process() -> None:
    gpu = load_capture(capture("tesla-t4.xml")).gpus[0]
    assert gpu.name == "Tesla T4" and gpu.temp_c == 40
    assert (gpu.retired_pages_sbe, gpu.retired_pages_dbe, gpu.retired_pages_pending) == (0, 0, False)
    assert (gpu.power_w, gpu.power_limit_w) == (26.78, 70.0)
    assert (gpu.pcie_gen, gpu.pcie_width, gpu.pcie_width_max) == (3, 8, 16)
    assert [(p.name, p.type, p.used_memory_mib) for p in gpu.processes or []] == [
        ("/usr/lib/xorg/Xorg", "G", 22.0), ("python", "C", 1005.0)]


def test_rtx3080_v13_geforce_without_ecc() -> None:
    snap = load_capture(capture("rtx-3080-v13.xml"))
    gpu = snap.gpus[0]
    assert (snap.driver_version, snap.cuda_version) == ("595.58.03", "13.2")
    assert gpu.name == "NVIDIA GeForce RTX 3080"
    assert gpu.ecc_enabled is None and gpu.volatile_uncorrectable is None  # not supported, never 0
    assert gpu.power_w == 142.33  # v13: instant_power_draw
    assert gpu.utilization_pct == 65 and gpu.memory_used_mib == 9184
    assert gpu.recovery_action == "None"  # the driver reports it: no action needed (not "not reported")


def test_gtx1070_v10_minimal() -> None:
    snap = load_capture(capture("gtx-1070-ti.xml"))
    gpu = snap.gpus[0]
    assert gpu.name == "GeForce GTX 1070 Ti" and gpu.temp_c == 39
    assert (gpu.pcie_gen, gpu.pcie_width, gpu.pcie_gen_max) == (1, 16, None)
    assert snap.driver_version is None and gpu.ecc_enabled is None and gpu.power_w is None


def test_not_a_capture_is_a_clear_error() -> None:
    with pytest.raises(CaptureError, match="not XML"):
        parse_capture(b"<nvidia_smi_log><gpu>", "x.xml")
    with pytest.raises(CaptureError, match="not <nvidia_smi_log>"):
        parse_capture(b"<html/>", "x.xml")


@pytest.mark.parametrize("name", ["a100-sxm4-v12.xml", "a10g.xml", "gtx-1070-ti.xml", "rtx-3080-v13.xml",
                                  "tesla-t4.xml"])
def test_vetd_check_on_every_capture(name: str) -> None:
    done = run_vetd("check", "gpu_health", "--capture", str(capture(name)), "--json")
    assert done.returncode in (0, 1), done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert {r["entity"] for r in results} == {"node", "gpu0"}
    for result in results:
        assert set(result) >= {"check", "entity", "status", "codes", "metrics", "message"}
        assert result["check"] == "gpu_health" and isinstance(result["codes"], list)


def test_capture_verdicts_and_expected_count() -> None:
    done = run_vetd("check", "gpu_health", "--capture", str(capture("a100-sxm4-v12.xml")), "--json")
    results = {r["entity"]: r for r in map(json.loads, done.stdout.splitlines())}
    assert results["node"]["codes"] == ["gpu_list_incomplete"]  # 4 attached, 1 in the dump
    # MIG is on in this dump (driver 535): the remapped rows are N/A per GPU and 535 has no
    # recovery action; the result says so rather than passing those checks silently.
    assert results["gpu0"]["status"] == "warn" and results["gpu0"]["codes"] == [
        "persistence_off", "mig_enabled", "unsupported:row_remap", "unsupported:recovery_action"]
    assert results["gpu0"]["metrics"]["temp_c"] == 27.0
    assert done.returncode == 0
    strict = run_vetd("check", "gpu_health", "--capture", str(capture("a100-sxm4-v12.xml")),
                      "--expect-gpus", "4", "--json")
    node = next(r for r in map(json.loads, strict.stdout.splitlines()) if r["entity"] == "node")
    assert node["status"] == "fail" and "gpu_missing" in node["codes"]
    assert strict.returncode == 1
    idle = run_vetd("check", "gpu_idle", "--capture", str(capture("tesla-t4.xml")), "--json")
    t4 = json.loads(idle.stdout)
    # 40 °C, slowdown at 93 °C: not hot for an idle air-cooled T4; the python process left on it fails.
    assert t4["codes"] == ["stray_processes"] and "python (5762)" in t4["message"]
    assert idle.returncode == 1
