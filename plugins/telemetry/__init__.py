"""``telemetry``: GPU and host samples, folded into windows on the node, tagged with the job.

Telemetry sources (``[plugins.telemetry]``):

* ``telemetry_gpu``: per GPU (``gpu0``…), NVML utilisation, memory, clocks,
  power, energy, temperature, throttle reasons, PCIe and NVLink throughput,
  and the profiling metrics (SM activity and occupancy, tensor, DRAM, FP64/32/16
  activity) from GPM where the GPU has it or from the node's dcgm-exporter
  (``profiling``: :mod:`~vetd.plugins.telemetry.gpu`, :mod:`~vetd.plugins.telemetry.dcgm`);
* ``telemetry_host``: the node's CPU, memory, load, disk and network I/O
  (:mod:`~vetd.plugins.telemetry.host`).

Both are sampled every ``interval`` and folded by the agent into one message
per entity per ``window`` (mean, min and max of each metric), published at
QoS 0 and tagged with the job running on that GPU (``job_start``'s ``gpus``)
or node. The controller keeps them (``[telemetry]`` in its config), and
``vetd job report JOBID`` makes a job's table, flags, saturation score and plots
from them. GPU state comes from ``[plugins.gpu_health]``'s source: live NVML,
or its scenario (``workload`` entries make the simulated GPUs busy) served
through the simulated libnvidia-ml.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import msgspec

from vetd.agent.api import SourceUnavailable, TelemetrySource, hookimpl
from vetd.plugins.telemetry.config import TelemetryConfig

if TYPE_CHECKING:
    from vetd.agent.api import PluginConfigs, TelemetryRegistry
    from vetd.plugins.gpu_health.nvml import NvmlSource

#: Deadline of one GPU sample when [plugins.gpu_health] does not set one (its driver_timeout).
GPU_SAMPLE_TIMEOUT_S = 5.0
#: Longest wait for dcgm-exporter's page (at most half the sample's deadline); it answers from memory in ms.
DCGM_TIMEOUT_S = 2.0


@hookimpl
def vetd_config_tables() -> Mapping[str, type[msgspec.Struct]]:
    return {"telemetry": TelemetryConfig}


@hookimpl
def vetd_register_telemetry(registry: TelemetryRegistry, configs: PluginConfigs) -> None:
    config = configs.typed("telemetry", TelemetryConfig)
    interval, window = float(config.interval), float(config.window)
    if config.host:
        from vetd.plugins.telemetry.host import HostSampler

        registry.add(TelemetrySource("telemetry_host", HostSampler().sample, interval=interval, window=window))
    if config.gpu and _has_gpus(configs):
        from vetd.plugins.telemetry.gpu import GpuSampler

        timeout = float(getattr(configs.get("gpu_health"), "driver_timeout", GPU_SAMPLE_TIMEOUT_S))
        sampler = GpuSampler(nvml_source(configs), profiling=config.profiling, dcgm_url=config.dcgm_url,
                             dcgm_timeout=min(DCGM_TIMEOUT_S, timeout / 2), interval=interval, window=window)
        registry.add(TelemetrySource("telemetry_gpu", sampler.sample, interval=interval, timeout=timeout,
                                     window=window))


def _has_gpus(configs: PluginConfigs) -> bool:
    """NVIDIA GPUs on the PCI bus, or a capture or scenario standing in for them."""
    from vetd.plugins.gpu_health.sources import nvidia_gpus_in_sysfs

    gpu_health = configs.get("gpu_health")
    return getattr(gpu_health, "source", "nvml") != "nvml" or nvidia_gpus_in_sysfs() > 0


_openers: weakref.WeakKeyDictionary[PluginConfigs, Callable[[], NvmlSource]] = weakref.WeakKeyDictionary()


def nvml_source(configs: PluginConfigs) -> Callable[[], NvmlSource]:
    """The NVML source of this config load, opened on first use (``SourceUnavailable`` until it can be):
    ``gpu_health``'s when that plugin is loaded (its live driver, or its capture or scenario served
    through the simulated libnvidia-ml), else one of this plugin's own on the live driver."""
    opener = _openers.get(configs)
    if opener is None:
        opener = _openers[configs] = _Opener(configs)
    return opener


class _Opener:
    def __init__(self, configs: PluginConfigs) -> None:
        self.configs = configs
        self._lock = threading.Lock()
        self._source: NvmlSource | None = None

    def __call__(self) -> NvmlSource:
        from vetd.plugins.gpu_health.nvml import NvmlSource

        with self._lock:
            if self._source is not None:
                return self._source
            if "gpu_health" not in self.configs:
                self._source = NvmlSource()
                return self._source
            from vetd.plugins.gpu_health import runtime_for

            source = runtime_for(self.configs).source()
            if not isinstance(source, NvmlSource):
                # gpu_health reads its capture or scenario directly: the same one (its clock included)
                # is served to this plugin through the simulated library.
                from vetd.plugins.gpu_health.nvmlsim import SimulatedNvml, install

                install(SimulatedNvml.of(source))
                source = NvmlSource(expected=source.expected_gpus, name=f"nvml({source.name})",
                                    process_names=False)
            self._source = source
            return source


__all__ = ["SourceUnavailable", "nvml_source"]
