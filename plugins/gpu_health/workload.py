"""What a scenario's GPUs are busy with: utilisation patterns and GPU performance metrics.

A scenario's ``workload`` entries make its GPUs look busy (``vetd job report``,
the telemetry plugin and the demo read them through the simulated NVML and its
GPM)::

    workload:
      - {profile: training}                                  # every GPU, all the time
      - {gpus: [3], profile: training, scale: 0.55}          # a straggler: 55 % of its peers' activity
      - {gpus: [6], start: 10m, profile: idle}               # an idle GPU from 10 minutes on
      - {gpus: [0, 1], profile: gemm, period: 60s, duty: 0.7}   # busy 42 s of every minute
      - {gpus: [2], profile: training, set: {memory_used_mib: 80500, clock_reasons: [hw_thermal_slowdown]}}

A profile is a set of :class:`~vetd.plugins.gpu_health.model.GpuSnapshot`
values of a GPU doing that work; ``scale`` scales its activity (utilisation,
SM activity and occupancy, tensor, DRAM and FP activity, PCIe and NVLink
traffic, and power above idle); ``noise`` jitters the activities by up to that
share, the same for the same GPU and second every run; ``period`` and ``duty``
alternate busy and idle; ``set`` adds values while busy. Later entries win
over earlier ones for the same GPU, and timeline ``set`` steps over both.

The ``gemm`` profile is what an H200 measured under a CuPy FP16 GEMM loop
(``tests/data/nvml/h200.soak.json``: GPM SM activity 95.9 %, occupancy 14.2 %,
tensor 93.1 %, DRAM 17.8 %, 691 W, 1500 MHz); the others are plausible shapes
of their kind, not measurements.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

import msgspec

from vetd.agent.api import Duration

#: Values a profile sets that scale with activity (power scales above idle).
ACTIVITY = ("utilization_pct", "utilization_memory_pct", "sm_active_pct", "sm_occupancy_pct", "tensor_active_pct",
            "dram_active_pct", "fp64_active_pct", "fp32_active_pct", "fp16_active_pct", "pcie_tx_mib_s",
            "pcie_rx_mib_s", "nvlink_tx_mib_s", "nvlink_rx_mib_s")

IDLE: dict[str, Any] = {
    "utilization_pct": 0.0, "utilization_memory_pct": 0.0, "sm_active_pct": 0.0, "sm_occupancy_pct": 0.0,
    "tensor_active_pct": 0.0, "dram_active_pct": 0.0, "fp64_active_pct": 0.0, "fp32_active_pct": 0.0,
    "fp16_active_pct": 0.0, "pcie_tx_mib_s": 0.0, "pcie_rx_mib_s": 0.0, "nvlink_tx_mib_s": 0.0,
    "nvlink_rx_mib_s": 0.0, "power_w": 75.0, "clock_sm_mhz": 345.0, "clock_reasons": ["gpu_idle"],
}

PROFILES: dict[str, dict[str, Any]] = {
    "idle": {**IDLE, "memory_used_mib": 0.0, "temp_c": 30.0},
    "gemm": {
        "utilization_pct": 99.0, "utilization_memory_pct": 30.0, "sm_active_pct": 95.9, "sm_occupancy_pct": 14.2,
        "tensor_active_pct": 93.1, "dram_active_pct": 17.8, "fp64_active_pct": 0.0, "fp32_active_pct": 0.0,
        "fp16_active_pct": 0.0, "pcie_tx_mib_s": 20.0, "pcie_rx_mib_s": 20.0, "nvlink_tx_mib_s": 0.0,
        "nvlink_rx_mib_s": 0.0, "power_w": 691.0, "clock_sm_mhz": 1500.0, "memory_used_mib": 40960.0,
        "temp_c": 60.0, "clock_reasons": ["sw_power_cap"],
    },
    "training": {
        "utilization_pct": 97.0, "utilization_memory_pct": 45.0, "sm_active_pct": 78.0, "sm_occupancy_pct": 38.0,
        "tensor_active_pct": 52.0, "dram_active_pct": 48.0, "fp64_active_pct": 0.0, "fp32_active_pct": 6.0,
        "fp16_active_pct": 3.0, "pcie_tx_mib_s": 800.0, "pcie_rx_mib_s": 1200.0, "nvlink_tx_mib_s": 60000.0,
        "nvlink_rx_mib_s": 60000.0, "power_w": 610.0, "clock_sm_mhz": 1755.0, "memory_used_mib": 70000.0,
        "temp_c": 58.0, "clock_reasons": [],
    },
    "memory_bound": {
        "utilization_pct": 95.0, "utilization_memory_pct": 85.0, "sm_active_pct": 60.0, "sm_occupancy_pct": 45.0,
        "tensor_active_pct": 0.0, "dram_active_pct": 85.0, "fp64_active_pct": 0.0, "fp32_active_pct": 25.0,
        "fp16_active_pct": 0.0, "pcie_tx_mib_s": 100.0, "pcie_rx_mib_s": 100.0, "nvlink_tx_mib_s": 0.0,
        "nvlink_rx_mib_s": 0.0, "power_w": 480.0, "clock_sm_mhz": 1980.0, "memory_used_mib": 50000.0,
        "temp_c": 50.0, "clock_reasons": [],
    },
    "inference": {
        "utilization_pct": 60.0, "utilization_memory_pct": 25.0, "sm_active_pct": 35.0, "sm_occupancy_pct": 20.0,
        "tensor_active_pct": 25.0, "dram_active_pct": 30.0, "fp64_active_pct": 0.0, "fp32_active_pct": 4.0,
        "fp16_active_pct": 2.0, "pcie_tx_mib_s": 400.0, "pcie_rx_mib_s": 300.0, "nvlink_tx_mib_s": 0.0,
        "nvlink_rx_mib_s": 0.0, "power_w": 350.0, "clock_sm_mhz": 1980.0, "memory_used_mib": 30000.0,
        "temp_c": 45.0, "clock_reasons": [],
    },
}
Profile = Literal["idle", "gemm", "training", "memory_bound", "inference"]
assert set(PROFILES) == set(Profile.__args__)  # type: ignore[attr-defined]


class Workload(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: GPU indices, or ``all``.
    gpus: list[int] | Literal["all"] = "all"
    profile: Profile = "training"
    #: From when (scenario time) to when (unset: to the end).
    start: Duration = Duration(0.0)
    end: Duration | None = None
    #: Share of the profile's activity (a straggler: 0.5).
    scale: float = 1.0
    #: Alternate busy and idle: busy ``duty`` of every ``period``.
    period: Duration | None = None
    duty: float = 1.0
    #: Relative jitter of the activities (0: none).
    noise: float = 0.03
    #: More GPU values while busy (GpuSnapshot field names).
    set: dict[str, Any] = {}

    def covers(self, index: int, t: float) -> bool:
        return ((self.gpus == "all" or index in self.gpus) and t >= self.start
                and (self.end is None or t < self.end))

    def values(self, index: int, t: float) -> dict[str, Any]:
        """The GPU values this entry gives GPU ``index`` at scenario time ``t`` (it covers them)."""
        busy = self.period is None or ((t - self.start) % float(self.period)) < self.duty * float(self.period)
        values = {**PROFILES[self.profile], **self.set}
        if not busy:  # between steps the work keeps its memory
            return {**IDLE, **({"memory_used_mib": values["memory_used_mib"]} if "memory_used_mib" in values else {})}
        jitter = _jitter(index, t) * self.noise
        for key in ACTIVITY:
            if key in values:
                scaled = values[key] * self.scale * (1.0 + jitter)
                values[key] = min(100.0, max(0.0, scaled)) if key.endswith("_pct") else max(0.0, scaled)
        if "power_w" in values:
            idle = IDLE["power_w"]
            values["power_w"] = idle + (values["power_w"] - idle) * self.scale * (1.0 + jitter)
        return values


def _jitter(index: int, t: float) -> float:
    """A number in [-1, 1], the same for the same GPU and second in every run."""
    digest = hashlib.blake2b(f"{index}:{int(t)}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") / 2**31 - 1.0


def apply_workloads(workloads: list[Workload], index: int, t: float) -> dict[str, Any]:
    """What the scenario's workload entries set on GPU ``index`` at ``t`` (later entries win)."""
    values: dict[str, Any] = {}
    for workload in workloads:
        if workload.covers(index, t):
            values.update(workload.values(index, t))
    return values
