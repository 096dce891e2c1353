"""``[plugins.telemetry]``: what is sampled, how often, and the window it is folded into."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

import msgspec

from vetd.agent.api import Duration

#: GPM measures over any interval; below this NVML's own counters stop meaning much.
MIN_INTERVAL_S = 0.1
#: Where dcgm-exporter listens by default (its --address :9400).
DEFAULT_DCGM_URL = "http://localhost:9400/metrics"


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
    #: Where the profiling metrics come from (SM activity and occupancy, tensor, DRAM, FP64/32/16
    #: activity: DCGM's fields 1002-1008, the saturation score's inputs): "gpm": NVML's GPU
    #: Performance Metrics where the GPU has them (Hopper and later); "dcgm": the node's
    #: dcgm-exporter (dcgm_url), read once per window; "auto": dcgm-exporter for the GPUs it serves
    #: SM activity and occupancy of, GPM for the others where they have it; "off": neither (NVML's
    #: counters only). Never both for one GPU in one window.
    profiling: Literal["auto", "gpm", "dcgm", "off"] = "auto"
    #: Replaced by profiling, still read so an older agent.toml loads: true is profiling = "gpm",
    #: false is "off"; refused beside a profiling other than "auto".
    gpm: bool | None = None
    #: dcgm-exporter's Prometheus endpoint on this node (profiling = "dcgm" or "auto").
    dcgm_url: str = DEFAULT_DCGM_URL
    #: Sample the host (psutil): CPU, memory, disk and network I/O.
    host: bool = True

    def __post_init__(self) -> None:
        # msgspec reports a ValueError here as a validation error of [plugins.telemetry]:
        # the agent names the file and line, and does not start.
        if float(self.interval) < MIN_INTERVAL_S:
            raise ValueError(f"interval = {self.interval:g}s: must be at least {MIN_INTERVAL_S:g}s")
        if not float(self.interval) <= float(self.window) <= 3600.0:
            raise ValueError(f"window = {self.window:g}s: must be from interval ({self.interval:g}s) to 1h")
        if self.gpm is not None:
            if self.profiling != "auto":
                raise ValueError(f'gpm and profiling = "{self.profiling}" both set: gpm was replaced by profiling, '
                                 "keep profiling alone")
            self.profiling = "gpm" if self.gpm else "off"
        url = urlsplit(self.dcgm_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"dcgm_url = {self.dcgm_url!r}: must be an http:// or https:// URL with a host "
                             f"(dcgm-exporter's is {DEFAULT_DCGM_URL})")
        if self.profiling == "dcgm":
            import importlib.util

            if importlib.util.find_spec("prometheus_client") is None:
                raise ValueError('profiling = "dcgm" reads dcgm-exporter with prometheus_client, which is not '
                                 "installed: pip install 'vetd[gpu]'")
