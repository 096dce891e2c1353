"""GPU samples through NVML and, where the GPU has it, GPM (GPU Performance Metrics) or dcgm-exporter.

Per GPU and sample, a dozen NVML calls: utilisation (SM and memory), memory
used, SM and memory clocks, power, temperature, the clock event (throttle)
reasons, and one ``nvmlDeviceGetFieldValues`` for the counters (energy, PCIe
bytes, NVLink data per link), turned into rates between two samples. GPM
(``nvmlGpmSampleGet`` each sample, ``nvmlGpmMetricsGet`` between the last two)
adds SM activity and occupancy, tensor, DRAM and FP64/32/16 activity, and
exact PCIe and NVLink throughput, as DCGM's profiling fields 1002-1012 give
them. A value the GPU does not report is left out, never sent as 0.

Those profiling metrics come from one source per GPU and window (``profiling``):
``gpm``; ``dcgm``, the node's dcgm-exporter (:mod:`~vetd.plugins.telemetry.dcgm`),
read once per window at its last sample (its values stand for the window: DCGM
averages over its own collection interval), matched to the GPU by UUID, the
window's sample marked ``profiling_dcgm`` = 1 (``profiling_dcgm_failed`` = 1
when the exporter gave nothing for the GPU: no profiling metrics that window);
``auto``, dcgm-exporter for a GPU while its last reading had the GPU's SM
activity and occupancy, else GPM where the GPU has it. A GPU moving from GPM to
dcgm-exporter takes DCGM's values from the next window on, so no window mixes
the two; ``off``, neither. The exporter is read outside the NVML session.

The driver is :mod:`vetd.plugins.gpu_health`'s :class:`~vetd.plugins.gpu_health.nvml.NvmlSource`
(live, or a scenario served by the simulated library): every sample runs in
its :meth:`~vetd.plugins.gpu_health.nvml.NvmlSource.session`, so a GPU reset
waits for a sample in flight and no sample holds NVML during a reset; after
one, handles and GPM samples are taken afresh.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

from vetd.agent.api import SourceUnavailable
from vetd.core.protocol import DCGM_FAILED, DCGM_MARK
from vetd.plugins.gpu_health.nvml import GpuLost, NvmlReleased, NvmlSource, field_value
from vetd.plugins.telemetry.config import DEFAULT_DCGM_URL
from vetd.plugins.telemetry.dcgm import RATE_METRICS, SCORE_METRICS, Exporter, ExporterError

log = structlog.get_logger("vetd.telemetry")

#: Clock event reason bits (nvml.h) → the throttle metric they count in (100 while active).
THROTTLE_BITS = {
    "throttle_power_pct": 0x4,            # SW power cap
    "throttle_thermal_pct": 0x20 | 0x40,  # SW and HW thermal slowdown
    "throttle_hw_pct": 0x8 | 0x80,        # HW slowdown, HW power brake
}
#: GPM metric (pynvml's ``NVML_GPM_METRIC_<name>``) → vetd's metric.
GPM_METRICS = {
    "SM_UTIL": "sm_active_pct",
    "SM_OCCUPANCY": "sm_occupancy_pct",
    "ANY_TENSOR_UTIL": "tensor_active_pct",
    "DRAM_BW_UTIL": "dram_active_pct",
    "FP64_UTIL": "fp64_active_pct",
    "FP32_UTIL": "fp32_active_pct",
    "FP16_UTIL": "fp16_active_pct",
    "PCIE_TX_PER_SEC": "pcie_tx_mib_s",
    "PCIE_RX_PER_SEC": "pcie_rx_mib_s",
    "NVLINK_TOTAL_TX_PER_SEC": "nvlink_tx_mib_s",
    "NVLINK_TOTAL_RX_PER_SEC": "nvlink_rx_mib_s",
}
#: NVML counters read in one field-values call: vetd's name → pynvml's field name.
COUNTER_FIELDS = {
    "energy_mj": "NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
    "pcie_tx_bytes": "NVML_FI_DEV_PCIE_COUNT_TX_BYTES",
    "pcie_rx_bytes": "NVML_FI_DEV_PCIE_COUNT_RX_BYTES",
}
NVLINK_FIELDS = {"tx": "NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX", "rx": "NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX"}
#: One exporter reading: {GPU UUID: {metric: value}}, empty when it failed.
Scraped = dict[str, dict[str, float]]


class _Gpu:
    """What is kept between samples of one GPU."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        #: Links whose NVLink data fields answered when probed (None: not probed yet).
        self.links: list[int] | None = None
        self.counters: dict[str, float] = {}
        self.taken = 0.0
        self.gpm: bool | None = None
        #: Two GPM sample buffers, and whether the first holds a sample yet.
        self.gpm_samples: list[Any] = []
        self.gpm_ready = False
        #: NVML's UUID (read once, to find the GPU in dcgm-exporter's page).
        self.uuid: str | None = None
        #: Where its profiling metrics come from now: "dcgm", "gpm", or None (neither; undecided before
        #: the first exporter reading).
        self.profiling: str | None = None


class GpuSampler:
    """Samples every GPU of one NVML source; ``sample()`` is a telemetry source's ``func``."""

    def __init__(self, source: Callable[[], NvmlSource], *, profiling: str = "gpm", dcgm_url: str = DEFAULT_DCGM_URL,
                 dcgm_timeout: float = 2.0, interval: float = 1.0, window: float | None = None) -> None:
        """``profiling``: ``[plugins.telemetry] profiling`` (see the module's docstring); ``interval`` and
        ``window``: the source's, for reading dcgm-exporter at each window's last sample (no window: every
        sample)."""
        self._open = source
        self.profiling = profiling
        self.interval, self.window = interval, window
        #: dcgm-exporter, read in "dcgm" and "auto".
        self.dcgm = (Exporter(dcgm_url, dcgm_timeout, expected=profiling == "dcgm")
                     if profiling in ("dcgm", "auto") else None)
        self._window_read: int | None = None
        self._lock = threading.Lock()
        self._gpus: dict[int, _Gpu] = {}
        self._generation = -1
        self._memory_v2 = True
        #: The raw GPM answers of the last sample, by GPU index (the hardware fixtures keep them).
        self.last_gpm: dict[int, dict[str, float | str]] = {}

    def sample(self) -> dict[str, dict[str, float]]:
        """``{gpuN: {metric: value}}`` now; ``{}`` while NVML is released for a GPU reset."""
        try:
            source = self._open()
        except SourceUnavailable as exc:
            log.debug("gpu_telemetry_unavailable", reason=str(exc))
            return {}
        with self._lock:
            scraped = self._scrape(time.time())  # before the NVML session: a reset does not wait for HTTP
            try:
                with source.session() as nvml:
                    if source.generation != self._generation:  # NVML was shut down and opened again
                        self._gpus, self._generation = {}, source.generation
                    return self._sample(source, nvml, scraped)
            except NvmlReleased:
                return {}

    def _scrape(self, now: float) -> Scraped | None:
        """dcgm-exporter's reading when one is due (the first sample, then each window's last), else None."""
        if self.dcgm is None:
            return None
        if self.window is not None:
            window = math.floor(now / self.window)
            last = now + 1.5 * self.interval >= (window + 1) * self.window  # no later sample in this window
            if self._window_read is not None and (window == self._window_read or not last):
                return None
            self._window_read = window
        try:
            return self.dcgm.scrape()
        except ExporterError:  # counted and logged by the exporter
            return {}

    def _sample(self, source: NvmlSource, n: Any, scraped: Scraped | None = None) -> dict[str, dict[str, float]]:
        sample: dict[str, dict[str, float]] = {}
        self.last_gpm = {}
        for index in range(n.nvmlDeviceGetCount()):
            gpu = self._gpus.get(index)
            try:
                if gpu is None:
                    gpu = self._gpus[index] = _Gpu(n.nvmlDeviceGetHandleByIndex(index))
                values = self._gpu(source, n, index, gpu, scraped)
            except (GpuLost, n.NVMLError):  # lost or not ours to read: gpu_health says which
                self._gpus.pop(index, None)
                continue
            if values:
                sample[f"gpu{index}"] = values
        return sample

    def _gpu(self, source: NvmlSource, n: Any, index: int, gpu: _Gpu, scraped: Scraped | None) -> dict[str, float]:
        get = source.reader()
        handle = gpu.handle
        values: dict[str, float | None] = {}
        util = get(n.nvmlDeviceGetUtilizationRates, handle)
        if util is not None:
            values["utilization_pct"] = float(util.gpu)
            values["memory_util_pct"] = float(util.memory)
        memory = self._memory(n, get, handle)
        if memory is not None and memory.total:
            values["memory_used_mib"] = memory.used / 2**20
            values["memory_used_pct"] = 100.0 * memory.used / memory.total
        values["clock_sm_mhz"] = _float(get(n.nvmlDeviceGetClockInfo, handle, n.NVML_CLOCK_SM))
        values["clock_memory_mhz"] = _float(get(n.nvmlDeviceGetClockInfo, handle, n.NVML_CLOCK_MEM))
        power = get(n.nvmlDeviceGetPowerUsage, handle)
        values["power_w"] = None if power is None else power / 1000.0
        values["temp_c"] = _float(get(n.nvmlDeviceGetTemperature, handle, n.NVML_TEMPERATURE_GPU))
        reasons = get(n.nvmlDeviceGetCurrentClocksEventReasons, handle)
        if reasons is not None:
            for name, bits in THROTTLE_BITS.items():
                values[name] = 100.0 if int(reasons) & bits else 0.0
        now = time.monotonic()
        values.update(self._counters(n, get, handle, gpu, now))
        if self.profiling == "gpm":
            values.update(self._gpm(n, get, index, gpu))
        elif self.profiling in ("dcgm", "auto"):
            for metric, value in self._profiling(n, get, index, gpu, scraped).items():
                if metric not in RATE_METRICS or values.get(metric) is None:  # NVML's byte counters first
                    values[metric] = value
        return {key: value for key, value in values.items() if value is not None}

    def _profiling(self, n: Any, get: Any, index: int, gpu: _Gpu, scraped: Scraped | None) -> dict[str, float | None]:
        """This sample's profiling metrics in "dcgm" and "auto": dcgm-exporter's when it was read now and
        serves the GPU, GPM's while "auto" has the GPU on GPM (module docstring)."""
        values: dict[str, float | None] = {}
        if scraped is not None:
            if gpu.uuid is None:
                gpu.uuid = str(get(n.nvmlDeviceGetUUID, gpu.handle) or "")
            served = scraped.get(gpu.uuid, {}) if gpu.uuid else {}
            if self.profiling == "dcgm":
                use = bool(served)
            else:
                use = all(metric in served for metric in SCORE_METRICS)
            before = gpu.profiling
            after = "dcgm" if use else "gpm" if self.profiling == "auto" and self._gpm_supported(n, get, gpu) else None
            if use and before != "gpm":  # a window that had GPM's values takes none of DCGM's
                values.update(served)
                values[DCGM_MARK] = 1.0
            elif not use and (self.profiling == "dcgm" or before == "dcgm"):
                values[DCGM_FAILED] = 1.0
            if after != before:
                log.info("profiling_source", gpu=index, source=after or "none", was=before or "none",
                         exporter=self.dcgm.url if self.dcgm else None)
                gpu.gpm_ready = False  # GPM starts again from a fresh sample, not from before the change
            gpu.profiling = after
        if gpu.profiling == "gpm":
            values.update(self._gpm(n, get, index, gpu))
        return values

    def _memory(self, n: Any, get: Any, handle: Any) -> Any:
        """``nvmlMemory_v2`` (the driver's reservation not counted as used, as nvidia-smi shows it), v1 where
        the driver lacks it."""
        version = getattr(n, "nvmlMemory_v2", None)
        if version is not None and self._memory_v2:
            memory = get(n.nvmlDeviceGetMemoryInfo, handle, version)
            if memory is not None:
                return memory
            self._memory_v2 = False
        return get(n.nvmlDeviceGetMemoryInfo, handle)

    def _counters(self, n: Any, get: Any, handle: Any, gpu: _Gpu, now: float) -> dict[str, float | None]:
        """Energy (J, since the driver loaded) and PCIe and NVLink rates (MiB/s) from the driver's
        counters, in one field-values call; the NVLink links that answer are probed once."""
        counters = {key: getattr(n, name) for key, name in COUNTER_FIELDS.items() if hasattr(n, name)}
        link_fields = {kind: getattr(n, name) for kind, name in NVLINK_FIELDS.items() if hasattr(n, name)}
        links = gpu.links if gpu.links is not None else list(range(getattr(n, "NVML_NVLINK_MAX_LINKS", 18)))
        request: list[Any] = list(counters.values())
        request += [(field, link) for link in links for field in link_fields.values()]
        answers = get(n.nvmlDeviceGetFieldValues, handle, request) if request else None
        read: dict[str, float] = {}
        nvlink = {"tx": 0.0, "rx": 0.0}
        answered: set[int] = set()
        by_field = {field: key for key, field in counters.items()}
        kind_of = {field: kind for kind, field in link_fields.items()}
        for answer in answers or []:
            if int(answer.nvmlReturn) != n.NVML_SUCCESS:
                continue
            field, value = int(answer.fieldId), field_value(answer)
            if value is None:
                continue
            if field in by_field:
                read[by_field[field]] = value
            elif field in kind_of:
                nvlink[kind_of[field]] += value
                answered.add(int(answer.scopeId))
        if gpu.links is None:
            gpu.links = sorted(answered)
        if gpu.links:
            read["nvlink_tx_kib"], read["nvlink_rx_kib"] = nvlink["tx"], nvlink["rx"]
        values: dict[str, float | None] = {}
        if "energy_mj" in read:
            values["energy_j"] = read["energy_mj"] / 1000.0
        elapsed = now - gpu.taken
        if gpu.counters and elapsed > 0:
            for counter, metric, scale in (("pcie_tx_bytes", "pcie_tx_mib_s", 2.0**20),
                                           ("pcie_rx_bytes", "pcie_rx_mib_s", 2.0**20),
                                           ("nvlink_tx_kib", "nvlink_tx_mib_s", 1024.0),
                                           ("nvlink_rx_kib", "nvlink_rx_mib_s", 1024.0)):
                if counter in read and counter in gpu.counters and read[counter] >= gpu.counters[counter]:
                    values[metric] = (read[counter] - gpu.counters[counter]) / scale / elapsed
        gpu.counters, gpu.taken = read, now
        return values

    def _gpm_supported(self, n: Any, get: Any, gpu: _Gpu) -> bool:
        """Whether the GPU has GPM (asked once; its two sample buffers allocated then)."""
        if gpu.gpm is None:
            support = get(n.nvmlGpmQueryDeviceSupport, gpu.handle) if hasattr(n, "nvmlGpmQueryDeviceSupport") \
                else None
            gpu.gpm = bool(support is not None and support.isSupportedDevice)
            if gpu.gpm:
                gpu.gpm_samples = [n.nvmlGpmSampleAlloc(), n.nvmlGpmSampleAlloc()]
        return gpu.gpm

    def _gpm(self, n: Any, get: Any, index: int, gpu: _Gpu) -> dict[str, float | None]:
        """GPM metrics between the previous sample and this one (none at the first sample)."""
        if not self._gpm_supported(n, get, gpu):
            return {}
        previous, current = gpu.gpm_samples
        if get(n.nvmlGpmSampleGet, gpu.handle, current) is None:
            gpu.gpm_ready = False
            return {}
        gpu.gpm_samples = [current, previous]
        if not gpu.gpm_ready:
            gpu.gpm_ready = True
            return {}
        wanted = [(getattr(n, f"NVML_GPM_METRIC_{name}"), metric) for name, metric in GPM_METRICS.items()
                  if hasattr(n, f"NVML_GPM_METRIC_{name}")]
        request = n.c_nvmlGpmMetricsGet_t()
        request.version = n.NVML_GPM_METRICS_GET_VERSION
        request.numMetrics = len(wanted)
        request.sample1, request.sample2 = previous, current
        for i, (metric_id, _) in enumerate(wanted):
            request.metrics[i].metricId = metric_id
        if get(n.nvmlGpmMetricsGet, request) is None:
            return {}
        values: dict[str, float | None] = {}
        raw: dict[str, float | str] = {}
        for i, (_, metric) in enumerate(wanted):
            answer = request.metrics[i]
            if int(answer.nvmlReturn) == n.NVML_SUCCESS:
                values[metric] = raw[metric] = float(answer.value)
            else:
                raw[metric] = f"error {int(answer.nvmlReturn)}"
        self.last_gpm[index] = raw
        return values


def _float(value: Any) -> float | None:
    return None if value is None else float(value)
