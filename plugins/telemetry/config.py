"""``[plugins.telemetry]``: what is sampled, how often, and the window it is folded into."""

from __future__ import annotations

import msgspec

from vetd.agent.api import Duration

#: GPM measures over any interval; below this NVML's own counters stop meaning much.
MIN_INTERVAL_S = 0.1


class TelemetryConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: How often the GPUs and the host are sampled (at least 100ms: GPM measures exactly between
    #: two samples at any interval; NVML's utilisation counter covers 1/6 s to 1 s by itself).
    interval: Duration = Duration(1.0)
    #: Samples are folded on the node into one message per entity per window (mean, min, max of
    #: each metric), tagged with the job running on that GPU: from interval to 1h.
    window: Duration = Duration(10.0)
    #: Sample the GPUs (NVML, and GPM where the GPU has it: Hopper and later); the GPU source
    #: is [plugins.gpu_health]'s (live NVML, or its scenario served through the simulated NVML).
    gpu: bool = True
    #: GPU performance metrics (SM activity and occupancy, tensor, DRAM, FP64/32/16 activity,
    #: NVLink and PCIe bytes) where the GPU supports them; off: NVML's counters only.
    gpm: bool = True
    #: Sample the host (psutil): CPU, memory, disk and network I/O.
    host: bool = True

    def __post_init__(self) -> None:
        # msgspec reports a ValueError here as a validation error of [plugins.telemetry]:
        # the agent names the file and line, and does not start.
        if float(self.interval) < MIN_INTERVAL_S:
            raise ValueError(f"interval = {self.interval:g}s: must be at least {MIN_INTERVAL_S:g}s")
        if not float(self.interval) <= float(self.window) <= 3600.0:
            raise ValueError(f"window = {self.window:g}s: must be from interval ({self.interval:g}s) to 1h")
