"""Live GPU state through NVML (``nvidia-ml-py``, imported as ``pynvml``).

Every call that a GPU may not support is wrapped so that "not supported"
becomes ``None``. The whole snapshot runs under the driver deadline of
:class:`~vetd.plugins.gpu.sources.Guard`; XID and double-bit-ECC events come
from an NVML event set waited on by a thread of its own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from vetd.agent.checks import SourceUnavailable
from vetd.plugins.gpu.model import CLOCK_REASONS, GpuProcess, GpuSnapshot, NodeSnapshot, NvLink
from vetd.plugins.gpu.sources import nvidia_gpus_in_sysfs

# nvmlClocksEventReason* bit values (nvml.h), named as in the snapshot model.
_REASON_BITS = {
    "gpu_idle": 0x1,
    "applications_clocks_setting": 0x2,
    "sw_power_cap": 0x4,
    "hw_slowdown": 0x8,
    "sync_boost": 0x10,
    "sw_thermal_slowdown": 0x20,
    "hw_thermal_slowdown": 0x40,
    "hw_power_brake_slowdown": 0x80,
    "display_clocks_setting": 0x100,
}
assert set(_REASON_BITS) == set(CLOCK_REASONS)


def _import() -> Any:
    try:
        import pynvml
    except ImportError as exc:
        raise SourceUnavailable("nvidia-ml-py is not installed (pip install 'vetd[gpu]')") from exc
    return pynvml


class NvmlSource:
    name = "nvml"

    def __init__(self) -> None:
        self.nvml = _import()
        try:
            self.nvml.nvmlInit()
        except self.nvml.NVMLError as exc:
            raise SourceUnavailable(f"NVML: {exc}") from exc
        self._lock = threading.Lock()

    def _get(self, func: Callable[..., Any], *args: Any) -> Any:
        """Call NVML; "not supported" and friends become None."""
        try:
            return func(*args)
        except self.nvml.NVMLError:
            return None

    def _text(self, value: Any) -> str | None:
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    def snapshot(self) -> NodeSnapshot:
        n = self.nvml
        count = n.nvmlDeviceGetCount()
        gpus = [self._gpu(index, n.nvmlDeviceGetHandleByIndex(index)) for index in range(count)]
        return NodeSnapshot(
            source=self.name,
            taken=time.time(),
            gpus=gpus,
            driver_version=self._text(self._get(n.nvmlSystemGetDriverVersion)),
            cuda_version=_cuda(self._get(n.nvmlSystemGetCudaDriverVersion_v2)),
            attached_gpus=count,
        )

    def _ecc(self, handle: Any, error_type: int, counter: int, location: int) -> int | None:
        n = self.nvml
        value = self._get(n.nvmlDeviceGetMemoryErrorCounter, handle, error_type, counter, location)
        return None if value is None else int(value)

    def _gpu(self, index: int, handle: Any) -> GpuSnapshot:
        n = self.nvml
        get = self._get
        corr, unc = n.NVML_MEMORY_ERROR_TYPE_CORRECTED, n.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
        vol, agg = n.NVML_VOLATILE_ECC, n.NVML_AGGREGATE_ECC
        dram = n.NVML_MEMORY_LOCATION_DEVICE_MEMORY
        sram = getattr(n, "NVML_MEMORY_LOCATION_SRAM", None)
        ecc_mode = get(n.nvmlDeviceGetEccMode, handle)
        pci = get(n.nvmlDeviceGetPciInfo, handle)
        memory = get(n.nvmlDeviceGetMemoryInfo, handle)
        util = get(n.nvmlDeviceGetUtilizationRates, handle)
        reasons = get(n.nvmlDeviceGetCurrentClocksEventReasons, handle)
        if reasons is None:
            reasons = get(n.nvmlDeviceGetCurrentClocksThrottleReasons, handle)
        remap = get(n.nvmlDeviceGetRemappedRows, handle)  # (corr, unc, pending, failure)
        power = get(n.nvmlDeviceGetPowerUsage, handle)
        limit = get(n.nvmlDeviceGetEnforcedPowerLimit, handle)
        procs = get(n.nvmlDeviceGetComputeRunningProcesses, handle)
        persistence = get(n.nvmlDeviceGetPersistenceMode, handle)

        def sram_count(kind: int, scope: int) -> int | None:
            return None if sram is None else self._ecc(handle, kind, scope, sram)

        return GpuSnapshot(
            index=index,
            uuid=self._text(get(n.nvmlDeviceGetUUID, handle)) or "",
            pci_bus_id=(self._text(pci.busId) or "") if pci is not None else "",
            name=self._text(get(n.nvmlDeviceGetName, handle)) or "",
            serial=self._text(get(n.nvmlDeviceGetSerial, handle)),
            vbios=self._text(get(n.nvmlDeviceGetVbiosVersion, handle)),
            ecc_enabled=None if ecc_mode is None else bool(ecc_mode[0]),
            ecc_volatile_sram_correctable=sram_count(corr, vol),
            ecc_volatile_sram_uncorrectable=sram_count(unc, vol),
            ecc_volatile_dram_correctable=self._ecc(handle, corr, vol, dram),
            ecc_volatile_dram_uncorrectable=self._ecc(handle, unc, vol, dram),
            ecc_aggregate_sram_correctable=sram_count(corr, agg),
            ecc_aggregate_sram_uncorrectable=sram_count(unc, agg),
            ecc_aggregate_dram_correctable=self._ecc(handle, corr, agg, dram),
            ecc_aggregate_dram_uncorrectable=self._ecc(handle, unc, agg, dram),
            retired_pages_sbe=_len(get(n.nvmlDeviceGetRetiredPages, handle,
                                       n.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS)),
            retired_pages_dbe=_len(get(n.nvmlDeviceGetRetiredPages, handle,
                                       n.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR)),
            retired_pages_pending=_bool(get(n.nvmlDeviceGetRetiredPagesPendingStatus, handle)),
            remapped_rows_correctable=None if remap is None else int(remap[0]),
            remapped_rows_uncorrectable=None if remap is None else int(remap[1]),
            remapped_rows_pending=None if remap is None else bool(remap[2]),
            remapped_rows_failure=None if remap is None else bool(remap[3]),
            **self._reset_flags(handle),
            clock_reasons=None if reasons is None else [r for r, bit in _REASON_BITS.items() if reasons & bit],
            pcie_gen=get(n.nvmlDeviceGetCurrPcieLinkGeneration, handle),
            pcie_gen_max=get(n.nvmlDeviceGetMaxPcieLinkGeneration, handle),
            pcie_width=get(n.nvmlDeviceGetCurrPcieLinkWidth, handle),
            pcie_width_max=get(n.nvmlDeviceGetMaxPcieLinkWidth, handle),
            pcie_replay_counter=get(n.nvmlDeviceGetPcieReplayCounter, handle),
            nvlinks=self._nvlinks(handle),
            temp_c=_float(get(n.nvmlDeviceGetTemperature, handle, n.NVML_TEMPERATURE_GPU)),
            temp_memory_c=None,
            temp_slowdown_c=_float(get(n.nvmlDeviceGetTemperatureThreshold, handle,
                                       n.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN)),
            temp_shutdown_c=_float(get(n.nvmlDeviceGetTemperatureThreshold, handle,
                                       n.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN)),
            power_w=None if power is None else power / 1000.0,
            power_limit_w=None if limit is None else limit / 1000.0,
            memory_used_mib=None if memory is None else memory.used / 2**20,
            memory_total_mib=None if memory is None else memory.total / 2**20,
            utilization_pct=None if util is None else float(util.gpu),
            persistence_mode=None if persistence is None else bool(persistence),
            processes=None if procs is None else [
                GpuProcess(pid=p.pid, type="C",
                           used_memory_mib=None if p.usedGpuMemory is None else p.usedGpuMemory / 2**20)
                for p in procs
            ],
        )

    def _reset_flags(self, handle: Any) -> dict[str, Any]:
        """The driver's own verdicts, from NVML field values (each None where unsupported)."""
        n = self.nvml
        wanted = {
            "reset_required": getattr(n, "NVML_FI_DEV_RESET_STATUS", None),
            "drain_and_reset_recommended": getattr(n, "NVML_FI_DEV_DRAIN_AND_RESET_STATUS", None),
            "recovery_action": getattr(n, "NVML_FI_DEV_GET_GPU_RECOVERY_ACTION", None),
        }
        flags: dict[str, Any] = dict.fromkeys(wanted)
        ids = [field for field in wanted.values() if field is not None]
        values = self._get(n.nvmlDeviceGetFieldValues, handle, ids) if ids else None
        by_id = {v.fieldId: int(v.value.uiVal) for v in values or [] if v.nvmlReturn == 0}
        for key, field in wanted.items():
            if field in by_id:
                flags[key] = bool(by_id[field]) if key != "recovery_action" else _recovery_name(by_id[field])
        return flags

    def _nvlinks(self, handle: Any) -> list[NvLink] | None:
        n = self.nvml
        links = []
        for link in range(getattr(n, "NVML_NVLINK_MAX_LINKS", 18)):
            state = self._get(n.nvmlDeviceGetNvLinkState, handle, link)
            if state is None:
                continue

            def counter(kind: str, link: int = link) -> int | None:
                value = self._get(n.nvmlDeviceGetNvLinkErrorCounter, handle, link, getattr(n, kind))
                return None if value is None else int(value)

            crc = [counter("NVML_NVLINK_ERROR_DL_CRC_FLIT"), counter("NVML_NVLINK_ERROR_DL_CRC_DATA")]
            links.append(NvLink(
                link=link, up=bool(state),
                replay_errors=counter("NVML_NVLINK_ERROR_DL_REPLAY"),
                recovery_errors=counter("NVML_NVLINK_ERROR_DL_RECOVERY"),
                crc_errors=None if all(c is None for c in crc) else sum(c or 0 for c in crc),
            ))
        return links or None

    def expected_gpus(self) -> int | None:
        return nvidia_gpus_in_sysfs()

    def watch(self, on_xid: Callable[[str, int, str], None], stop: threading.Event) -> None:
        """Wait on an NVML event set for XIDs and double-bit ECC errors."""
        n = self.nvml
        events = n.nvmlEventSetCreate()
        bus_ids: dict[int, str] = {}
        try:
            wanted = n.nvmlEventTypeXidCriticalError | n.nvmlEventTypeDoubleBitEccError
            for index in range(n.nvmlDeviceGetCount()):
                handle = n.nvmlDeviceGetHandleByIndex(index)
                supported = self._get(n.nvmlDeviceGetSupportedEventTypes, handle) or 0
                if supported & wanted:
                    n.nvmlDeviceRegisterEvents(handle, supported & wanted, events)
                pci = self._get(n.nvmlDeviceGetPciInfo, handle)
                if pci is not None:
                    bus_ids[index] = self._text(pci.busId) or f"gpu{index}"
            while not stop.is_set():
                try:
                    data = n.nvmlEventSetWait_v2(events, 500)
                except n.NVMLError_Timeout:
                    continue
                bus = self._text(n.nvmlDeviceGetPciInfo(data.device).busId) or "unknown"
                if data.eventType & n.nvmlEventTypeXidCriticalError:
                    on_xid(bus, int(data.eventData), "reported by NVML")
                elif data.eventType & n.nvmlEventTypeDoubleBitEccError:
                    on_xid(bus, 48, "double-bit ECC error event from NVML")
        finally:
            n.nvmlEventSetFree(events)


#: nvmlDeviceGpuRecoveryAction_t, in nvidia-smi's words.
_RECOVERY = {0: "None", 1: "Reset", 2: "Reboot", 3: "Drain P2P", 4: "Drain and Reset",
             5: "Recover IMEX domain", 6: "Bus reset", 7: "System reboot"}


def _recovery_name(value: int) -> str:
    return _RECOVERY.get(value, f"action {value}")


def _len(value: Any) -> int | None:
    return None if value is None else len(value)


def _bool(value: Any) -> bool | None:
    return None if value is None else bool(value)


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _cuda(value: Any) -> str | None:
    if value is None:
        return None
    return f"{int(value) // 1000}.{int(value) % 1000 // 10}"
