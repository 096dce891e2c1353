"""Health verdicts on snapshots: each fault DESIGN.md names, and no false alarms."""

from __future__ import annotations

import msgspec
import pytest

from vetd.plugins.gpu_health.config import GpuHealthConfig
from vetd.plugins.gpu_health.evaluate import Evaluator
from vetd.plugins.gpu_health.model import GpuProcess, NodeSnapshot, NvLink
from vetd.plugins.gpu_health.replay import healthy_gpu


def node(*gpus, taken: float = 1000.0, attached: int | None = None) -> NodeSnapshot:  # type: ignore[no-untyped-def]
    return NodeSnapshot(source="test", taken=taken, gpus=list(gpus), driver_version="550.54.15",
                        attached_gpus=len(gpus) if attached is None else attached)


def verdict(gpu, evaluator: Evaluator | None = None, taken: float = 1000.0):  # type: ignore[no-untyped-def]
    evaluator = evaluator or Evaluator(GpuHealthConfig())
    result = evaluator.health(node(gpu, taken=taken), expected=1)[1]
    return result.status, result.codes


def test_a_healthy_gpu_passes_with_its_metrics() -> None:
    outcomes = Evaluator(GpuHealthConfig()).health(node(healthy_gpu(0), healthy_gpu(1)), expected=2)
    assert [(o.entity, o.status) for o in outcomes] == [("node", "pass"), ("gpu0", "pass"), ("gpu1", "pass")]
    assert outcomes[0].metrics == {"gpus_found": 2.0, "gpus_expected": 2.0, "driver_major": 550.0,
                                   "driver_minor": 54.0, "driver_patch": 15.0}
    assert outcomes[1].metrics["pcie_width_max"] == 16.0 and "utilization_pct" in outcomes[1].metrics


@pytest.mark.parametrize(
    ("changes", "status", "code"),
    [
        ({"ecc_volatile_dram_uncorrectable": 1}, "fail", "ecc_dbe"),
        ({"ecc_volatile_sram_uncorrectable": 3}, "fail", "ecc_dbe"),
        ({"ecc_enabled": False}, "warn", "ecc_disabled"),
        ({"retired_pages_pending": True}, "warn", "retired_pages_pending"),
        ({"retired_pages_sbe": 40, "retired_pages_dbe": 23}, "fail", "retired_pages_limit"),
        ({"remapped_rows_failure": True}, "fail", "row_remap_failure"),
        ({"remapped_rows_pending": True}, "fail", "reset_required"),
        ({"remapped_rows_uncorrectable": 512}, "warn", "row_remap_high"),
        ({"reset_required": True}, "fail", "reset_required"),
        ({"drain_and_reset_recommended": True}, "fail", "drain_and_reset_recommended"),
        ({"recovery_action": "Reboot"}, "fail", "recovery_reboot"),
        ({"clock_reasons": ["hw_slowdown"]}, "fail", "hw_slowdown"),
        ({"clock_reasons": ["hw_thermal_slowdown"]}, "fail", "hw_thermal_slowdown"),
        ({"clock_reasons": ["hw_power_brake_slowdown"]}, "fail", "hw_power_brake_slowdown"),
        ({"temp_c": 83.0}, "warn", "temp_high"),
        ({"utilization_pct": 90.0, "pcie_gen": 3}, "warn", "pcie_gen_degraded"),
        ({"utilization_pct": 90.0, "pcie_width": 8}, "warn", "pcie_width_degraded"),
        ({"persistence_mode": False}, "warn", "persistence_off"),
    ],
)
def test_each_fault_is_caught(changes: dict[str, object], status: str, code: str) -> None:
    gpu = msgspec.structs.replace(healthy_gpu(0), **changes)
    got_status, codes = verdict(gpu)
    assert got_status == status and code in codes


def test_not_flagged_idle_link_gen_nor_unsupported_values() -> None:
    idle_low_gen = msgspec.structs.replace(healthy_gpu(0), utilization_pct=0.0, pcie_gen=1, pcie_width=8)
    assert verdict(idle_low_gen) == ("pass", [])
    geforce = msgspec.structs.replace(
        healthy_gpu(0), ecc_enabled=None, ecc_volatile_dram_uncorrectable=None, ecc_volatile_sram_uncorrectable=None,
        remapped_rows_pending=None, reset_required=None, clock_reasons=None, nvlinks=None, persistence_mode=None)
    assert verdict(geforce) == ("pass", [])


def test_sw_throttling_must_be_sustained() -> None:
    evaluator = Evaluator(GpuHealthConfig(sw_throttle_sustained_samples=3))
    capped = msgspec.structs.replace(healthy_gpu(0), clock_reasons=["sw_power_cap"])
    assert [verdict(capped, evaluator, 1000.0 + i)[0] for i in range(4)] == ["pass", "pass", "warn", "warn"]
    assert verdict(healthy_gpu(0), evaluator, 1010.0)[0] == "pass"  # streak broken


def test_the_power_cap_of_a_gpu_busy_at_its_power_limit_is_no_finding() -> None:
    """An H200 under a GEMM loop (tests/data/nvml/h200.before.soak.json): 692.5 of 700 W, SW power
    cap active for the whole minute; it warned 58 times before this rule, for a GPU doing its job."""
    evaluator = Evaluator(GpuHealthConfig())
    at_limit = msgspec.structs.replace(healthy_gpu(0), clock_reasons=["sw_power_cap"], utilization_pct=100.0,
                                       power_w=692.5, power_limit_w=700.0)
    assert [verdict(at_limit, evaluator, 1000.0 + i)[0] for i in range(5)] == ["pass"] * 5
    # Capped while drawing far less than its limit: something holds the GPU back.
    held_back = msgspec.structs.replace(at_limit, power_w=300.0)
    assert [verdict(held_back, evaluator, 1010.0 + i) for i in range(3)][-1] == ("warn", ["sw_power_cap"])
    strict = Evaluator(GpuHealthConfig(power_cap_at_limit_fraction=0.0))  # 0: every power cap counts
    assert [verdict(at_limit, strict, 1000.0 + i)[0] for i in range(3)][-1] == "warn"


def test_rates_need_two_samples() -> None:
    evaluator = Evaluator(GpuHealthConfig(correctable_warn_per_hour=100))
    gpu = healthy_gpu(0)
    assert verdict(gpu, evaluator, 0.0) == ("pass", [])
    more = msgspec.structs.replace(gpu, ecc_volatile_dram_correctable=20, pcie_replay_counter=5000)
    status, codes = verdict(more, evaluator, 600.0)  # 20 in 10 min = 120/h; 5000 replays/10 min/16 lanes
    assert status == "warn" and codes == ["ecc_sbe_rate", "pcie_replay_rate"]


def test_nvlink_down_and_error_counters() -> None:
    evaluator = Evaluator(GpuHealthConfig())
    gpu = healthy_gpu(0)
    assert verdict(gpu, evaluator, 0.0)[0] == "pass"
    links = list(gpu.nvlinks or [])
    links[2] = NvLink(link=2, up=False, replay_errors=0, recovery_errors=0, crc_errors=0)
    links[5] = NvLink(link=5, up=True, replay_errors=3, recovery_errors=0, crc_errors=5000)
    status, codes = verdict(msgspec.structs.replace(gpu, nvlinks=links), evaluator, 10.0)
    assert status == "fail" and codes == ["nvlink_down", "nvlink_replay", "nvlink_crc"]


def test_gpu_count() -> None:
    evaluator = Evaluator(GpuHealthConfig())
    missing = evaluator.count(node(healthy_gpu(0)), expected=8)
    assert (missing.status, missing.codes) == ("fail", ["gpu_missing"])
    assert missing.message == "1 of 8 expected GPUs usable through the driver"
    fallen = msgspec.structs.replace(healthy_gpu(1), lost=True, query_errors=["nvmlDeviceGetHandleByIndex: GPU is lost"])
    one_lost = evaluator.health(node(healthy_gpu(0), fallen), expected=2)
    assert [(o.entity, o.status, o.codes) for o in one_lost] == [
        ("node", "fail", ["gpu_missing"]), ("gpu0", "pass", []), ("gpu1", "fail", ["gpu_lost"])]
    assert one_lost[0].metrics["gpus_lost"] == 1.0 and "GPU is lost" in one_lost[2].message
    extra = evaluator.count(node(healthy_gpu(0), healthy_gpu(1)), expected=1)
    assert (extra.status, extra.codes) == ("warn", ["gpu_count_mismatch"])


def test_idle_vetting() -> None:
    evaluator = Evaluator(GpuHealthConfig(idle_temp_max_c=30, idle_memory_used_fraction=0.2))
    busy = msgspec.structs.replace(
        healthy_gpu(0), temp_c=45.0, memory_used_mib=40000.0,
        processes=[GpuProcess(pid=4242, name="python", type="C"), GpuProcess(pid=1, name="Xorg", type="G")])
    [outcome] = evaluator.idle(node(busy))
    assert outcome.status == "fail"
    assert outcome.codes == ["idle_temp_high", "idle_memory_used", "stray_processes"]
    assert "python (4242)" in outcome.message and "Xorg" not in outcome.message
    assert outcome.metrics["compute_processes"] == 1.0
    [clean] = evaluator.idle(node(healthy_gpu(0)))
    assert clean.status == "pass"
