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
        ({"remapped_rows_pending": True}, "warn", "row_remap_pending"),
        ({"remapped_rows_uncorrectable": 512}, "warn", "row_remap_high"),
        ({"reset_required": True}, "fail", "reset_required"),
        ({"drain_and_reset_recommended": True}, "fail", "drain_and_reset_recommended"),
        ({"recovery_action": "Reboot"}, "fail", "recovery_reboot"),
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


@pytest.mark.parametrize("reason", ["hw_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown"])
def test_hw_slowdown_is_a_rate_over_a_window_and_fails_only_when_sustained(reason: str) -> None:
    """NVML reports HW slowdown during P-state changes too: one sample is no finding (it
    failed and drained before); gpud's 0.6 events/min over 10 min warns; all along for 30 min fails."""
    evaluator = Evaluator(GpuHealthConfig())  # window 10m, 0.6/min, sustained 30m
    slowed = msgspec.structs.replace(healthy_gpu(0), clock_reasons=[reason])
    assert verdict(slowed, evaluator, 0.0) == ("pass", [])  # a blip
    assert [verdict(healthy_gpu(0), evaluator, 60.0 * i)[0] for i in range(1, 12)] == ["pass"] * 11
    blips = [verdict(slowed if i % 2 else healthy_gpu(0), evaluator, 1000.0 + 60 * i) for i in range(10)]
    assert blips[-1] == ("pass", [])  # 5 in 10 min: 0.5/min, under the rate
    # Six samples in ten minutes: 0.6/min, a warning; still there 30 min on: a failure.
    evaluator = Evaluator(GpuHealthConfig())
    statuses = [verdict(slowed, evaluator, 60.0 * i) for i in range(31)]
    assert [s for s, _ in statuses[:5]] == ["pass"] * 5 and statuses[5] == ("warn", [reason])
    assert statuses[29][0] == "warn" and statuses[30] == ("fail", [reason])
    assert verdict(healthy_gpu(0), evaluator, 1900.0)[0] == "pass"  # ended


def test_a_pending_row_remap_warns_and_a_failed_one_still_fails() -> None:
    pending = msgspec.structs.replace(healthy_gpu(0), remapped_rows_pending=True)
    assert verdict(pending) == ("warn", ["row_remap_pending"])
    failed = msgspec.structs.replace(pending, remapped_rows_failure=True)
    assert verdict(failed) == ("fail", ["row_remap_failure", "row_remap_pending"])


def test_a_link_never_up_is_no_fault_unless_expected() -> None:
    """Boards leave NVLinks unwired: only a link seen up before, or listed as expected, can be down."""
    gpu = healthy_gpu(0)
    links = list(gpu.nvlinks or [])
    links[17] = NvLink(link=17, up=False, replay_errors=0, recovery_errors=0, crc_errors=0)
    unwired = msgspec.structs.replace(gpu, nvlinks=links)
    evaluator = Evaluator(GpuHealthConfig())
    assert [verdict(unwired, evaluator, t) for t in (0.0, 60.0)] == [("pass", []), ("pass", [])]
    expected = Evaluator(GpuHealthConfig(nvlink_expected_links=list(range(18))))
    assert verdict(unwired, expected, 0.0) == ("fail", ["nvlink_down"])
    was_up = Evaluator(GpuHealthConfig())
    assert verdict(gpu, was_up, 0.0)[0] == "pass"
    assert verdict(unwired, was_up, 60.0) == ("fail", ["nvlink_down"])


def test_a_driver_reload_is_a_warning_not_a_drain() -> None:
    """A new driver (an upgrade, a reload): counters restart and links train again. The
    links seen up before are still training: nvlink_down failed and drained the node."""
    evaluator = Evaluator(GpuHealthConfig())
    gpu = msgspec.structs.replace(healthy_gpu(0), ecc_volatile_dram_correctable=500, pcie_replay_counter=900)
    assert [o.status for o in evaluator.health(node(gpu, taken=0.0), expected=1)] == ["pass", "pass"]
    training = [NvLink(link=i, up=i >= 4, replay_errors=0, recovery_errors=0, crc_errors=0) for i in range(18)]
    reloaded = msgspec.structs.replace(healthy_gpu(0), nvlinks=training)
    after = NodeSnapshot(source="test", taken=60.0, gpus=[reloaded], driver_version="580.159.04", attached_gpus=1)
    node_outcome, gpu_outcome = evaluator.health(after, expected=1)
    assert (node_outcome.status, node_outcome.codes) == ("warn", ["driver_changed"])
    assert "550.54.15" in node_outcome.message and "580.159.04" in node_outcome.message
    assert (gpu_outcome.status, gpu_outcome.codes) == ("pass", [])
    again = NodeSnapshot(source="test", taken=120.0, gpus=[healthy_gpu(0)], driver_version="580.159.04",
                         attached_gpus=1)
    assert [o.status for o in evaluator.health(again, expected=1)] == ["pass", "pass"]


def test_idle_temperature_is_judged_against_the_gpus_own_slowdown_limit() -> None:
    """An idle air-cooled H200 sits at 34-39 °C: the old absolute 30 °C failed it."""
    evaluator = Evaluator(GpuHealthConfig())  # slowdown 87 °C on healthy_gpu
    for temp, expected in [(39.0, ("pass", [])), (55.0, ("warn", ["idle_temp_high"])),
                           (70.0, ("fail", ["idle_temp_high"]))]:
        [outcome] = evaluator.idle(node(msgspec.structs.replace(healthy_gpu(0), temp_c=temp)))
        assert (outcome.status, outcome.codes) == expected, temp
    no_threshold = msgspec.structs.replace(healthy_gpu(0), temp_c=70.0, temp_slowdown_c=None)
    [outcome] = evaluator.idle(node(no_threshold))
    assert (outcome.status, outcome.codes) == ("warn", ["idle_temp_high"])
    site = Evaluator(GpuHealthConfig(idle_temp_max_c=30.0))  # a liquid-cooled site's own limit
    [outcome] = site.idle(node(msgspec.structs.replace(healthy_gpu(0), temp_c=39.0)))
    assert (outcome.status, outcome.codes) == ("fail", ["idle_temp_high"])


def test_the_prolog_judges_only_the_jobs_gpus() -> None:
    """A shared node: GPU 1 runs another job. This job has GPU 0 (by index, or by UUID)."""
    busy = msgspec.structs.replace(healthy_gpu(1), memory_used_mib=70000.0,
                                   processes=[GpuProcess(pid=77, name="python", type="C")])
    evaluator = Evaluator(GpuHealthConfig())
    for only in ({"0"}, {healthy_gpu(0).uuid}):
        outcomes = evaluator.idle(node(healthy_gpu(0), busy), only=only)
        assert [(o.entity, o.status, o.codes) for o in outcomes] == [
            ("gpu0", "pass", []), ("gpu1", "skip", ["not_this_job"])]
    assert [o.status for o in evaluator.idle(node(healthy_gpu(0), busy))] == ["pass", "fail"]
