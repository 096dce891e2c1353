"""Live GPU state through NVML (``nvidia-ml-py``, imported as ``pynvml``).

Every call that a GPU may not support is wrapped so that "not supported"
becomes ``None``; a GPU that answers ``GPU_IS_LOST`` is reported lost, and
any other failed query is kept with the GPU's snapshot rather than dropped.
The whole snapshot runs under the driver deadline of
:class:`~vetd.plugins.gpu_health.sources.Guard`; XIDs, double-bit ECC and the other
health events NVML delivers come from an event set waited on by a thread of
its own.

The driver refuses to reset a GPU (``nvidia-smi -r``) while any process has
NVML open, vetd included: :meth:`NvmlSource.released` frees the event set and
shuts NVML down for the duration of a reset, and snapshots asked for
meanwhile fail at once with :class:`NvmlReleased` instead of opening it again.
"""

from __future__ import annotations

import ctypes
import functools
import operator
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
import structlog

from vetd.agent.api import Backoff, SourceUnavailable
from vetd.plugins.gpu_health.model import (
    CLOCK_REASONS,
    GPU_EVENTS,
    DriverEvent,
    GpuProcess,
    GpuSnapshot,
    NodeSnapshot,
    NvLink,
    tlimit_threshold,
)
from vetd.plugins.gpu_health.sources import OnEvent, nvidia_gpus_in_sysfs

log = structlog.get_logger("vetd.gpu")

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


#: NVML errors that mean "this GPU or driver does not report that": the value is None.
_NOT_REPORTED = ("NOT_SUPPORTED", "INVALID_ARGUMENT", "NO_PERMISSION", "NOT_FOUND", "FUNCTION_NOT_FOUND",
                 "NO_DATA", "VGPU_ECC_NOT_SUPPORTED", "ARGUMENT_VERSION_MISMATCH", "DEPRECATED")


class DriverNotReady(SourceUnavailable):
    """``nvmlInit`` failed although libnvidia-ml is there: the driver may still be loading."""


class NvmlReleased(SourceUnavailable):
    """NVML is shut down for a GPU reset (:meth:`NvmlSource.released`): no reading until it is over."""


#: nvmlInit errors that mean "no NVML here at all", not "not yet".
_NO_NVML = ("LIBRARY_NOT_FOUND", "FUNCTION_NOT_FOUND")


class _Lost(Exception):
    """NVML_ERROR_GPU_IS_LOST: the GPU fell off the bus or is otherwise inaccessible."""


#: What :meth:`NvmlSource.reader`'s calls raise for a GPU that is lost (the public name).
GpuLost = _Lost


class _Reader:
    """NVML calls for one GPU: "not supported" becomes None, other failures are kept.

    ``GPU_IS_LOST`` ends the GPU's snapshot (:class:`_Lost`); ``RESET_REQUIRED``
    is the driver's verdict and sets :attr:`reset_required`; any other error
    (unknown, corrupted infoROM, timeout...) is recorded in :attr:`errors`
    with the function it came from, and the value is None.
    """

    def __init__(self, nvml: Any, not_reported: frozenset[int]) -> None:
        self.nvml = nvml
        self.not_reported = not_reported
        self.errors: list[str] = []
        self.reset_required = False

    def __call__(self, func: Callable[..., Any], *args: Any) -> Any:
        n = self.nvml
        try:
            return func(*args)
        except n.NVMLError as exc:
            code = getattr(exc, "value", None)
            if code in self.not_reported:
                return None
            if code == n.NVML_ERROR_GPU_IS_LOST:
                raise _Lost(str(exc)) from exc
            if code == n.NVML_ERROR_RESET_REQUIRED:
                self.reset_required = True
            else:
                self.errors.append(f"{func.__name__}: {exc}")
            return None

    def field(self, value: Any, what: str) -> float | None:
        """One answer of ``nvmlDeviceGetFieldValues``, judged as a call of its own is
        (each field carries its own return code): ``what`` names it in an error."""
        n = self.nvml
        code = int(value.nvmlReturn)
        if code == n.NVML_SUCCESS:
            return field_value(value)
        if code in self.not_reported:
            return None
        error = n.NVMLError(code)
        if code == n.NVML_ERROR_GPU_IS_LOST:
            raise _Lost(f"nvmlDeviceGetFieldValues({what}): {error}")
        if code == n.NVML_ERROR_RESET_REQUIRED:
            self.reset_required = True
        else:
            self.errors.append(f"nvmlDeviceGetFieldValues({what}): {error}")
        return None


class _Known(msgspec.Struct, frozen=True):
    uuid: str
    pci_bus_id: str
    name: str


class _Fixed(msgspec.Struct, frozen=True):
    uuid: str
    mig_enabled: bool | None
    clock_sm_max_mhz: float | None
    temp_slowdown_c: float | None
    temp_shutdown_c: float | None


class NvmlSource:
    name = "nvml"

    def __init__(self, *, expected: Callable[[], int | None] | None = None, name: str = "nvml",
                 process_names: bool = True) -> None:
        """``expected``: the GPU count the node should have (default: sysfs);
        ``process_names``: name compute processes from ``/proc`` (off when the
        GPUs are not this machine's, as under :mod:`~vetd.plugins.gpu_health.nvmlsim`)."""
        self.nvml = _import()
        self.name = name
        self._expected = expected or nvidia_gpus_in_sysfs
        self._process_names = process_names
        self._init()
        self._not_reported = frozenset(
            code for code in (getattr(self.nvml, f"NVML_ERROR_{error}", None) for error in _NOT_REPORTED)
            if code is not None
        )
        #: index → identity as last seen: a lost GPU is still named by what it was.
        self._known: dict[int, _Known] = {}
        #: index → the NVLinks that answered (up or down) when last probed. NVML
        #: counts up to NVML_NVLINK_MAX_LINKS (36) links, an H100 has 18 and a
        #: PCIe card none: probing once saves most of the calls of a snapshot.
        self._links: dict[int, list[int]] = {}
        #: Whether the driver answers the per-link NVLink fields (:data:`NVLINK_FIELDS`):
        #: one field-values call per GPU instead of five calls per link. Older drivers
        #: do not; they are read link by link from the first GPU that shows it.
        self._link_fields = True
        #: index → the readings a board does not change while it runs.
        self._fixed: dict[int, _Fixed] = {}
        self._memory_v2 = True
        #: Reset hold: snapshots in flight, whether NVML is released, whether the watcher has let go.
        self._use = threading.Condition()
        self._busy = 0
        self._released = False
        self._watching = False
        self._parked = threading.Event()
        #: index → PCI bus id as the event watcher registered it (a GPU lost later is still named).
        self._bus_of: dict[int, str] = {}
        #: Counts NVML (re)initialisations: handles and GPM samples taken before a change are void.
        self.generation = 0

    def _init(self) -> None:
        n = self.nvml
        try:
            n.nvmlInit()
        except n.NVMLError as exc:
            absent = {getattr(n, f"NVML_ERROR_{name}", None) for name in _NO_NVML}
            kind = SourceUnavailable if getattr(exc, "value", None) in absent else DriverNotReady
            raise kind(f"NVML: {exc}") from exc

    @contextmanager
    def released(self, timeout: float = 5.0) -> Iterator[str]:
        """NVML let go for the duration (a GPU reset): the event watcher frees its
        set, ``nvmlShutdown`` is called once no snapshot is in flight, and
        ``nvmlInit`` again afterwards. Yields what was released, in words.

        A snapshot stuck in the driver past ``timeout`` keeps NVML open: the
        reset is then tried anyway (it is the remedy for a stuck driver) and
        ``nvidia-smi`` says whether it could.
        """
        with self._use:
            self._released = True
            self._parked.clear()
            idle = self._use.wait_for(lambda: self._busy == 0, timeout)
            watching = self._watching
        if watching and not self._parked.wait(timeout):
            log.warning("nvml_release_incomplete", reason="event watcher did not let go")
        shut = False
        if idle:
            try:
                self.nvml.nvmlShutdown()
                shut = True
            except self.nvml.NVMLError as exc:
                log.warning("nvml_release_incomplete", reason=f"nvmlShutdown: {exc}")
        else:
            log.warning("nvml_release_incomplete", reason=f"a driver query has not returned in {timeout:g}s")
        log.info("nvml_released", shutdown=shut, watcher=watching)
        try:
            yield ("NVML shut down" if shut else "NVML still held by a stuck query") + \
                  (", event watcher paused" if watching else "")
        finally:
            try:
                if shut:
                    self._fixed.clear()  # a reset applies a pending MIG mode
                    self.generation += 1
                    self._init()
            finally:
                with self._use:
                    self._released = False
                    self._use.notify_all()
                log.info("nvml_reopened", reinit=shut)

    @contextmanager
    def _using(self) -> Iterator[None]:
        with self._use:
            if self._released:
                raise NvmlReleased("NVML is released for a GPU reset")
            self._busy += 1
        try:
            yield
        finally:
            with self._use:
                self._busy -= 1
                self._use.notify_all()

    @contextmanager
    def session(self) -> Iterator[Any]:
        """pynvml, for another reader of the same driver (the telemetry plugin): NVML stays open
        while the block runs, and the block cannot start while NVML is released for a GPU reset
        (:class:`NvmlReleased`), so a reset waits for it as it waits for a snapshot."""
        with self._using():
            yield self.nvml

    def reader(self) -> _Reader:
        """A reader of NVML calls as this source judges them: "not supported" is None, GPU_IS_LOST
        raises, other failures are kept in its ``errors``."""
        return self._reader()

    def _reader(self) -> _Reader:
        return _Reader(self.nvml, self._not_reported)

    def _text(self, value: Any) -> str | None:
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    def snapshot(self) -> NodeSnapshot:
        with self._using():
            return self._snapshot()

    def _snapshot(self) -> NodeSnapshot:
        n = self.nvml
        count = n.nvmlDeviceGetCount()
        system = self._reader()
        return NodeSnapshot(
            source=self.name,
            taken=time.time(),
            gpus=[self._gpu_or_lost(index) for index in range(count)],
            driver_version=self._text(system(n.nvmlSystemGetDriverVersion)),
            cuda_version=_cuda(system(n.nvmlSystemGetCudaDriverVersion_v2)),
            attached_gpus=count,
        )

    def _gpu_or_lost(self, index: int) -> GpuSnapshot:
        get = self._reader()
        try:
            try:
                handle = self.nvml.nvmlDeviceGetHandleByIndex(index)
            except self.nvml.NVMLError as exc:
                if getattr(exc, "value", None) == self.nvml.NVML_ERROR_NO_PERMISSION:
                    # Counted by the driver, denied to this process (cgroups, device
                    # permissions): another tenant's GPU, not a lost one.
                    known = self._known.get(index, _Known("", "", ""))
                    return GpuSnapshot(index=index, uuid=known.uuid, pci_bus_id=known.pci_bus_id, name=known.name,
                                       no_permission=True)
                # No handle, no GPU to use: lost, with the driver's reason.
                raise _Lost(f"nvmlDeviceGetHandleByIndex: {exc}") from exc
            gpu = self._gpu(index, handle, get)
        except _Lost as exc:
            known = self._known.get(index, _Known("", "", ""))
            return GpuSnapshot(index=index, uuid=known.uuid, pci_bus_id=known.pci_bus_id, name=known.name,
                               lost=True, query_errors=[*get.errors, str(exc)])
        if gpu.pci_bus_id:
            self._known[index] = _Known(gpu.uuid, gpu.pci_bus_id, gpu.name)
        return gpu

    def _ecc(self, get: _Reader, handle: Any, kind: int, scope: int, location: int | None) -> int | None:
        if location is None:
            return None
        value = get(self.nvml.nvmlDeviceGetMemoryErrorCounter, handle, kind, scope, location)
        return None if value is None else int(value)

    def _gpu(self, index: int, handle: Any, get: _Reader) -> GpuSnapshot:
        n = self.nvml
        corr, unc = n.NVML_MEMORY_ERROR_TYPE_CORRECTED, n.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
        vol, agg = n.NVML_VOLATILE_ECC, n.NVML_AGGREGATE_ECC
        dram = n.NVML_MEMORY_LOCATION_DEVICE_MEMORY
        sram = getattr(n, "NVML_MEMORY_LOCATION_SRAM", None)
        ecc_mode = get(n.nvmlDeviceGetEccMode, handle)
        pci = get(n.nvmlDeviceGetPciInfo, handle)
        memory = self._memory(get, handle)
        util = get(n.nvmlDeviceGetUtilizationRates, handle)
        reasons = get(n.nvmlDeviceGetCurrentClocksEventReasons, handle)
        if reasons is None:
            reasons = get(n.nvmlDeviceGetCurrentClocksThrottleReasons, handle)
        remap = get(n.nvmlDeviceGetRemappedRows, handle)  # (corr, unc, pending, failure)
        power = get(n.nvmlDeviceGetPowerUsage, handle)
        limit = get(n.nvmlDeviceGetEnforcedPowerLimit, handle)
        procs = get(n.nvmlDeviceGetComputeRunningProcesses, handle)
        persistence = get(n.nvmlDeviceGetPersistenceMode, handle)
        ecc: dict[str, Any] = {
            f"ecc_{scope_name}_{where}_{kind_name}": self._ecc(get, handle, kind, scope, location)
            for scope_name, scope in (("volatile", vol), ("aggregate", agg))
            for where, location in (("sram", sram), ("dram", dram))
            for kind_name, kind in (("correctable", corr), ("uncorrectable", unc))
        }
        for kind_name, kind in (("correctable", corr), ("uncorrectable", unc)):
            if ecc[f"ecc_volatile_sram_{kind_name}"] is None and ecc[f"ecc_volatile_dram_{kind_name}"] is None:
                # No SRAM/DRAM split from this GPU or driver: the total still tells a DBE.
                ecc[f"ecc_volatile_{kind_name}_total"] = get(n.nvmlDeviceGetTotalEccErrors, handle, kind, vol)
        fields = self._fields(handle, get)
        uuid = self._text(get(n.nvmlDeviceGetUUID, handle)) or ""
        fixed = self._fixed_of(index, uuid, handle, get)
        gpu = GpuSnapshot(
            index=index,
            uuid=uuid,
            pci_bus_id=(self._text(pci.busId) or "") if pci is not None else "",
            name=self._text(get(n.nvmlDeviceGetName, handle)) or "",
            serial=self._text(get(n.nvmlDeviceGetSerial, handle)),
            vbios=self._text(get(n.nvmlDeviceGetVbiosVersion, handle)),
            ecc_enabled=None if ecc_mode is None else bool(ecc_mode[0]),
            **ecc,
            retired_pages_sbe=_len(get(n.nvmlDeviceGetRetiredPages, handle,
                                       n.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS)),
            retired_pages_dbe=_len(get(n.nvmlDeviceGetRetiredPages, handle,
                                       n.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR)),
            retired_pages_pending=_bool(get(n.nvmlDeviceGetRetiredPagesPendingStatus, handle)),
            remapped_rows_correctable=None if remap is None else int(remap[0]),
            remapped_rows_uncorrectable=None if remap is None else int(remap[1]),
            remapped_rows_pending=None if remap is None else bool(remap[2]),
            remapped_rows_failure=None if remap is None else bool(remap[3]),
            reset_required=_flag(fields.get("reset_required")),
            drain_and_reset_recommended=_flag(fields.get("drain_and_reset_recommended")),
            recovery_action=None if fields.get("recovery_action") is None
            else _recovery_name(int(fields["recovery_action"])),
            clock_reasons=None if reasons is None else [r for r, bit in _REASON_BITS.items() if reasons & bit],
            clock_sm_mhz=_float(get(n.nvmlDeviceGetClockInfo, handle, n.NVML_CLOCK_SM)),
            clock_memory_mhz=_float(get(n.nvmlDeviceGetClockInfo, handle, n.NVML_CLOCK_MEM)),
            clock_sm_max_mhz=fixed.clock_sm_max_mhz,
            pcie_gen=get(n.nvmlDeviceGetCurrPcieLinkGeneration, handle),
            pcie_gen_max=get(n.nvmlDeviceGetMaxPcieLinkGeneration, handle),
            pcie_width=get(n.nvmlDeviceGetCurrPcieLinkWidth, handle),
            pcie_width_max=get(n.nvmlDeviceGetMaxPcieLinkWidth, handle),
            pcie_replay_counter=get(n.nvmlDeviceGetPcieReplayCounter, handle),
            nvlinks=self._nvlinks(index, handle, get),
            temp_c=_float(get(n.nvmlDeviceGetTemperature, handle, n.NVML_TEMPERATURE_GPU)),
            temp_memory_c=_float(fields.get("temp_memory_c")),
            temp_slowdown_c=fixed.temp_slowdown_c,
            temp_shutdown_c=fixed.temp_shutdown_c,
            power_w=None if power is None else power / 1000.0,
            power_limit_w=None if limit is None else limit / 1000.0,
            memory_used_mib=None if memory is None else memory.used / 2**20,
            memory_total_mib=None if memory is None else memory.total / 2**20,
            memory_reserved_mib=None if memory is None or not hasattr(memory, "reserved")
            else memory.reserved / 2**20,
            utilization_pct=None if util is None else float(util.gpu),
            persistence_mode=None if persistence is None else bool(persistence),
            mig_enabled=fixed.mig_enabled,
            processes=None if procs is None else [
                GpuProcess(pid=p.pid, type="C", name=_process_name(p.pid) if self._process_names else "",
                           used_memory_mib=None if p.usedGpuMemory is None else p.usedGpuMemory / 2**20)
                for p in procs
            ],
        )
        if get.reset_required or get.errors:
            gpu = msgspec.structs.replace(gpu, reset_required=True if get.reset_required else gpu.reset_required,
                                          query_errors=list(get.errors))
        return gpu

    def _memory(self, get: _Reader, handle: Any) -> Any:
        """Memory use as nvidia-smi reports it: ``nvmlMemory_v2`` leaves the driver's
        reservation (616 MiB on an H200) out of ``used``; v1 counts it. A driver
        that does not report v2 is read with v1 from then on."""
        n = self.nvml
        version = getattr(n, "nvmlMemory_v2", None)
        if version is not None and self._memory_v2:
            errors = len(get.errors)
            memory = get(n.nvmlDeviceGetMemoryInfo, handle, version)
            if memory is not None or len(get.errors) > errors:
                return memory
            self._memory_v2 = False
        return get(n.nvmlDeviceGetMemoryInfo, handle)

    def _fixed_of(self, index: int, uuid: str, handle: Any, get: _Reader) -> _Fixed:
        """What a board does not change while it runs (its maximum SM clock, its
        temperature thresholds): read once per GPU, again when its UUID changes.
        On an H200 these calls are the dearest of a snapshot (1.8 ms and 0.3 ms
        of 4.5 ms, tests/data/nvml/h200.calls.json)."""
        known = self._fixed.get(index)
        if known is not None and known.uuid == uuid:
            return known
        n = self.nvml
        errors = len(get.errors)
        mig = get(n.nvmlDeviceGetMigMode, handle)  # (current, pending): a change applies at a reset
        slowdown = _float(get(n.nvmlDeviceGetTemperatureThreshold, handle, n.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN))
        shutdown = _float(get(n.nvmlDeviceGetTemperatureThreshold, handle, n.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN))
        if slowdown is None or shutdown is None:
            tlimit = self._tlimit_thresholds(handle, get)
            slowdown = slowdown if slowdown is not None else tlimit.get("slowdown")
            shutdown = shutdown if shutdown is not None else tlimit.get("shutdown")
        fixed = _Fixed(
            uuid=uuid,
            mig_enabled=None if mig is None else bool(mig[0]),
            clock_sm_max_mhz=_float(get(n.nvmlDeviceGetMaxClockInfo, handle, n.NVML_CLOCK_SM)),
            temp_slowdown_c=slowdown,
            temp_shutdown_c=shutdown,
        )
        if uuid and len(get.errors) == errors and not get.reset_required:  # a failed read is tried again
            self._fixed[index] = fixed
        return fixed

    def _fields(self, handle: Any, get: _Reader) -> dict[str, float]:
        """NVML field values (the driver's own verdicts, memory temperature), where supported."""
        n = self.nvml
        wanted = {key: getattr(n, name, None) for key, name in FIELDS.items()}
        ids = [field for field in wanted.values() if field is not None]
        values = get(n.nvmlDeviceGetFieldValues, handle, ids) if ids else None
        by_id = {v.fieldId: field_value(v) for v in values or [] if v.nvmlReturn == n.NVML_SUCCESS}
        return {key: value for key, field in wanted.items() if (value := by_id.get(field)) is not None}

    def _tlimit_thresholds(self, handle: Any, get: _Reader) -> dict[str, float]:
        """Thresholds in °C from T.Limit, for GPUs whose driver has no classic ones.

        The ``*_TLIMIT`` fields are relative to T.Limit (-2: slowdown 2 °C past it)
        and ``nvmlDeviceGetMarginTemperature`` is how far below T.Limit the GPU is
        now, so a threshold is now + margin - relative, as a capture's are
        (:func:`~vetd.plugins.gpu_health.model.tlimit_threshold`). An H200 on 580.159.04
        answered 193/194 = -8/-2, margin 48 at 39 °C: 95/89 °C, its classic thresholds.
        """
        n = self.nvml
        wanted = {key: getattr(n, name, None) for key, name in TLIMIT_FIELDS.items()}
        ids = [field for field in wanted.values() if field is not None]
        values = get(n.nvmlDeviceGetFieldValues, handle, ids) if ids else None
        if not values:
            return {}
        relative = {int(v.fieldId): get.field(v, str(int(v.fieldId))) for v in values}
        margin = _float(get(n.nvmlDeviceGetMarginTemperature, handle))
        now = _float(get(n.nvmlDeviceGetTemperature, handle, n.NVML_TEMPERATURE_GPU))
        return {key: value for key, field in wanted.items()
                if (value := tlimit_threshold(now, margin, relative.get(field) if field is not None else None))
                is not None}

    def _nvlinks(self, index: int, handle: Any, get: _Reader) -> list[NvLink] | None:
        """The GPU's NVLinks: all of them in one field-values call where the driver
        answers the per-link fields, else five calls per link (state, four counters).
        Which links answer is probed once (:attr:`_links`), again when one stops answering."""
        n = self.nvml
        known = self._links.get(index)
        candidates = list(known if known is not None else range(getattr(n, "NVML_NVLINK_MAX_LINKS", 18)))
        if not candidates:
            return None
        if self._link_fields:
            batched = self._nvlinks_batched(handle, get, candidates, known=known is not None)
            if batched is _REPROBE:  # a link that answered before no longer does: probe afresh
                del self._links[index]
                return self._nvlinks(index, handle, get)
            if isinstance(batched, list):
                if known is None:
                    self._links[index] = [link.link for link in batched]
                return batched or None
        links = self._nvlinks_per_link(index, handle, get, candidates)
        if links and self._link_fields:
            # The per-link calls find links the fields did not: this driver has no per-link fields.
            log.info("nvlink_fields_unsupported", gpu=index, action="NVLinks read link by link")
            self._link_fields = False
        return links

    def _nvlinks_batched(self, handle: Any, get: _Reader, candidates: list[int], *,
                         known: bool) -> list[NvLink] | object | None:
        """``candidates`` in one ``nvmlDeviceGetFieldValues`` (:data:`NVLINK_FIELDS`, scopeId = link):
        the links whose state answered; :data:`_REPROBE` when a ``known`` link no longer
        answers; None when the fields gave no link at all (the per-link calls then tell
        a driver without these fields from a GPU without NVLink)."""
        n = self.nvml
        ids = {key: getattr(n, name) for key, name in NVLINK_FIELDS.items() if hasattr(n, name)}
        if "up" not in ids:
            self._link_fields = False
            return None
        # CRC data has no scoped field: its legacy per-link fields name links 0-11 only.
        data = {field: link for link in candidates
                if (field := getattr(n, f"NVML_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_L{link}", None)) is not None}
        request = [(field, link) for link in candidates for field in ids.values()] + list(data)
        errors = len(get.errors)
        values = get(n.nvmlDeviceGetFieldValues, handle, request)
        if values is None:
            if len(get.errors) == errors and not get.reset_required:  # NOT_SUPPORTED, FUNCTION_NOT_FOUND...
                self._link_fields = False
            return None
        key_of = {field: key for key, field in ids.items()}
        read: dict[tuple[str, int], float | None] = {}
        for value in values:
            field, scope = int(value.fieldId), int(value.scopeId)
            key, link = (key_of[field], scope) if field in key_of else ("crc_data", data[field])
            read[key, link] = get.field(value, f"{NVLINK_FIELDS.get(key, 'NVLink CRC data')}, link {link}")
        if not known and all(read.get(("up", link)) is None for link in candidates):
            return None
        links = []
        for link in candidates:
            state = read.get(("up", link))
            if state is None:
                if known:
                    return _REPROBE
                continue
            crc = [read.get(("crc_flit", link)), read.get(("crc_data", link))]
            links.append(NvLink(
                link=link, up=bool(state),
                replay_errors=_int(read.get(("replay_errors", link))),
                recovery_errors=_int(read.get(("recovery_errors", link))),
                crc_errors=None if all(c is None for c in crc) else sum(int(c or 0) for c in crc),
            ))
        return links

    def _nvlinks_per_link(self, index: int, handle: Any, get: _Reader, candidates: list[int]) -> list[NvLink] | None:
        n = self.nvml
        known = self._links.get(index)
        links = []
        for link in candidates:
            state = get(n.nvmlDeviceGetNvLinkState, handle, link)
            if state is None:
                if known is not None:  # a link that answered before no longer does: probe afresh
                    del self._links[index]
                    return self._nvlinks(index, handle, get)
                continue

            def counter(kind: str, link: int = link) -> int | None:
                value = get(n.nvmlDeviceGetNvLinkErrorCounter, handle, link, getattr(n, kind))
                return None if value is None else int(value)

            crc = [counter("NVML_NVLINK_ERROR_DL_CRC_FLIT"), counter("NVML_NVLINK_ERROR_DL_CRC_DATA")]
            links.append(NvLink(
                link=link, up=bool(state),
                replay_errors=counter("NVML_NVLINK_ERROR_DL_REPLAY"),
                recovery_errors=counter("NVML_NVLINK_ERROR_DL_RECOVERY"),
                crc_errors=None if all(c is None for c in crc) else sum(c or 0 for c in crc),
            ))
        if known is None:
            self._links[index] = [link.link for link in links]
        return links or None

    def expected_gpus(self) -> int | None:
        return self._expected()

    def watch(self, on_event: OnEvent, stop: threading.Event) -> None:
        """Wait on an NVML event set for XIDs, double-bit ECC errors and the
        other health events (:data:`_EVENT_TYPES`) each GPU supports.

        Bus ids are read once, when the GPUs register: an event about a GPU
        that has just fallen off the bus must not need that GPU to answer.
        Once a GPU is lost, every wait on a set it is in answers
        ``GPU_IS_LOST`` at once: the set is then built again without it (the
        lost GPU reported once, as ``gpu_unavailable``; its XID 79/119/120
        come from the kernel log), so the other GPUs' events still arrive.
        While NVML is released for a reset the set is freed, and built again after.
        """
        with self._use:
            self._watching = True
        lost: set[int] = set()
        backoff = Backoff(base=1.0, cap=30.0)
        fruitless = 0
        try:
            while not stop.is_set():
                if not self._wait_while_released(stop):
                    return
                newly_lost = self._watch_once(on_event, stop, lost)
                if newly_lost is None:  # released, or stopping
                    continue
                # A set that answers GPU_IS_LOST is built again at once (the other GPUs'
                # events are missed meanwhile); one that keeps answering it although no
                # GPU is newly lost at registration is built again with back-off, not in a hot loop.
                fruitless = 0 if newly_lost else fruitless + 1
                if fruitless < 2:
                    backoff.reset()
                elif stop.wait(backoff.next()):
                    return
        finally:
            with self._use:
                self._watching = False
            self._parked.set()

    def _wait_while_released(self, stop: threading.Event) -> bool:
        """Park while NVML is released for a reset; False when stopping."""
        with self._use:
            while self._released:
                self._parked.set()
                self._use.wait(0.5)
                if stop.is_set():
                    return False
        return not stop.is_set()

    def _watch_once(self, on_event: OnEvent, stop: threading.Event, lost: set[int]) -> bool | None:
        """One event set, until it answers GPU_IS_LOST (True: a GPU was newly found lost and
        reported; False: none), NVML is released or ``stop`` (None)."""
        n = self.nvml
        xid_type, dbe_type = n.nvmlEventTypeXidCriticalError, n.nvmlEventTypeDoubleBitEccError
        # An older pynvml lacks the newer types: those are then not watched.
        others = {getattr(n, name): kind for name, kind in _EVENT_TYPES.items() if hasattr(n, name)}
        wanted = functools.reduce(operator.or_, others, xid_type | dbe_type)
        names = {xid_type: "xid", dbe_type: "dbe", **others}
        events = n.nvmlEventSetCreate()
        bus_of: dict[int | None, str] = {}
        watched: dict[str, list[int]] = {}
        newly_lost = False
        try:
            for index in range(n.nvmlDeviceGetCount()):
                try:
                    handle = n.nvmlDeviceGetHandleByIndex(index)
                    bus_of[_address(handle)] = self._bus_of[index] = \
                        self._text(n.nvmlDeviceGetPciInfo(handle).busId) or f"gpu{index}"
                    supported = n.nvmlDeviceGetSupportedEventTypes(handle)
                    if supported & wanted:
                        n.nvmlDeviceRegisterEvents(handle, supported & wanted, events)
                    for bit, kind in names.items():
                        if supported & bit:
                            watched.setdefault(kind, []).append(index)
                except n.NVMLError as exc:
                    if getattr(exc, "value", None) == n.NVML_ERROR_GPU_IS_LOST:
                        if index not in lost:
                            lost.add(index)
                            newly_lost = True
                            known = self._known.get(index)
                            bus = self._bus_of.get(index) or (known.pci_bus_id if known else "") or f"gpu{index}"
                            log.warning("gpu_events_lost_gpu", gpu=index, pci=bus)
                            on_event(DriverEvent(bus, "gpu_unavailable", 0,
                                                 "GPU is lost (NVML_ERROR_GPU_IS_LOST): no longer watched"))
                        continue
                    # One GPU that cannot register (no event support, no permission) leaves the others
                    # watched; the kernel log still reports its XIDs.
                    log.warning("xid_events_unavailable", gpu=index, error=str(exc))
            log.info("gpu_events_watched", gpus_by_type=watched, lost=sorted(lost))
            while not stop.is_set():
                if self._released:
                    return None
                try:
                    data = n.nvmlEventSetWait_v2(events, 500)
                except n.NVMLError_Timeout:
                    continue
                except n.NVMLError as exc:
                    if getattr(exc, "value", None) == n.NVML_ERROR_GPU_IS_LOST:
                        log.warning("gpu_events_set_lost", error=str(exc), action="rebuild without the lost GPU")
                        return newly_lost
                    log.warning("xid_event_wait_failed", error=str(exc))
                    stop.wait(1.0)
                    continue
                bus = bus_of.get(_address(data.device), "unknown")
                if data.eventType & xid_type:
                    on_event(DriverEvent(bus, "xid", int(data.eventData), "reported by NVML"))
                elif data.eventType & dbe_type:
                    on_event(DriverEvent(bus, "xid", 48, "double-bit ECC error event from NVML"))
                for bit, kind in others.items():
                    if data.eventType & bit:
                        detail = self._recovery_action(data.device) if kind == "recovery_action" else ""
                        on_event(DriverEvent(bus, kind, int(data.eventData), detail))
            return None
        finally:
            try:
                n.nvmlEventSetFree(events)
            except n.NVMLError as exc:
                log.warning("gpu_event_set_free_failed", error=str(exc))

    def _recovery_action(self, handle: Any) -> str:
        """The action the driver now asks for, read as ``gpu_health`` reads it.

        NVML documents the field, not what the event's data carries, so the
        field is the word vetd goes by; the event's data is reported raw.
        """
        get = self._reader()
        try:
            value = self._fields(handle, get).get("recovery_action")
        except _Lost as exc:
            return f"unreadable: {exc}"
        if value is None:
            return "unreadable: " + ("; ".join(get.errors) or "not supported")
        return _recovery_name(int(value))


#: NVML event types watched besides XIDs and double-bit ECC (an XID 48), by
#: pynvml's name → vetd's name (:data:`~vetd.plugins.gpu_health.model.GPU_EVENTS`).
#: NVML has no PCIe or NVLink event: those are read by ``gpu_health``.
_EVENT_TYPES = {
    "nvmlEventTypeGpuUnavailableError": "gpu_unavailable",
    "nvmlEventTypeFatalPoisonError": "fatal_poison",
    "nvmlEventTypeNonFatalPoisonError": "nonfatal_poison",
    "nvmlEventTypeDramRetirementFailure": "row_remap_failure",
    "nvmlEventTypeDramRetirementEvent": "row_remap",
    "nvmlEventTypeSingleBitEccErrorStorm": "sbe_storm",
    "nvmlEventTypeGpuRecoveryAction": "recovery_action",
}
assert set(_EVENT_TYPES.values()) == set(GPU_EVENTS)


#: nvmlDeviceGpuRecoveryAction_t, in nvidia-smi's words.
_RECOVERY = {0: "None", 1: "Reset", 2: "Reboot", 3: "Drain P2P", 4: "Drain and Reset",
             5: "Recover IMEX domain", 6: "Bus reset", 7: "System reboot"}


def _recovery_name(value: int) -> str:
    return _RECOVERY.get(value, f"action {value}")


#: Snapshot key → the NVML field id (pynvml's name) it is read from; an older pynvml lacks some.
FIELDS = {
    "reset_required": "NVML_FI_DEV_RESET_STATUS",
    "drain_and_reset_recommended": "NVML_FI_DEV_DRAIN_AND_RESET_STATUS",
    "recovery_action": "NVML_FI_DEV_GET_GPU_RECOVERY_ACTION",
    "temp_memory_c": "NVML_FI_DEV_MEMORY_TEMP",
}

#: NvLink key → the NVML field (pynvml's name) read per link, with the link as scopeId.
#: ``crc_flit`` stands for what ``nvmlDeviceGetNvLinkErrorCounter`` calls DL_CRC_FLIT;
#: the CRC data counter has no scoped field (legacy ``..._CRC_DATA_ERROR_COUNT_L0..L11``).
NVLINK_FIELDS = {
    "up": "NVML_FI_DEV_NVLINK_GET_STATE",
    "replay_errors": "NVML_FI_DEV_NVLINK_ERROR_DL_REPLAY",
    "recovery_errors": "NVML_FI_DEV_NVLINK_ERROR_DL_RECOVERY",
    "crc_flit": "NVML_FI_DEV_NVLINK_ERROR_DL_CRC",
}

#: Temperature threshold → its NVML field relative to T.Limit, for GPUs without the classic thresholds.
TLIMIT_FIELDS = {
    "slowdown": "NVML_FI_DEV_TEMPERATURE_SLOWDOWN_TLIMIT",
    "shutdown": "NVML_FI_DEV_TEMPERATURE_SHUTDOWN_TLIMIT",
}

#: :meth:`NvmlSource._nvlinks_batched`: a link known to answer no longer does.
_REPROBE = object()

#: c_nvmlValue_t member by nvmlValueType_t.
_VALUE_MEMBERS = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}


def field_value(value: Any) -> float | None:
    member = _VALUE_MEMBERS.get(int(value.valueType))
    return None if member is None else float(getattr(value.value, member))


def _flag(value: float | None) -> bool | None:
    return None if value is None else bool(value)


def _address(handle: Any) -> int | None:
    """A device handle's pointer value: the same GPU gives the same address."""
    return ctypes.cast(handle, ctypes.c_void_p).value


def _process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""  # gone already, or in another PID namespace


def _len(value: Any) -> int | None:
    return None if value is None else len(value)


def _bool(value: Any) -> bool | None:
    return None if value is None else bool(value)


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _cuda(value: Any) -> str | None:
    if value is None:
        return None
    return f"{int(value) // 1000}.{int(value) % 1000 // 10}"
