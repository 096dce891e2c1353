"""A simulated ``libnvidia-ml``: the live NVML code path without a GPU.

:class:`SimulatedNvml` stands where pynvml expects the C library
(``pynvml.nvmlLib``) and answers the C functions pynvml calls, with the C
calling convention pynvml uses (out-parameters through ``byref``, return codes),
from the snapshots of a scenario or a capture. pynvml's own wrappers, its
structures, its error classes and all of :class:`~vetd.plugins.gpu_health.nvml.NvmlSource`
therefore run as they do on a node with GPUs; only the library below them is
stood in for. With it the NVML source is tested in CI, and an operator can
watch a scenario travel the live path (``vetd check gpu_health --scenario F
--through-nvml``).

How the simulated driver behaves, as the real one does:

* A value the snapshot lacks (``None``) is ``NVML_ERROR_NOT_SUPPORTED``; an
  NVLink beyond the GPU's links is ``NVML_ERROR_INVALID_ARGUMENT``.
* A GPU that vanishes from the scenario stays counted by
  ``nvmlDeviceGetCount_v2`` and answers ``NVML_ERROR_GPU_IS_LOST`` (fallen off
  the bus), including to ``nvmlDeviceGetHandleByIndex_v2``.
* A GPU with ``no_permission`` is counted, and its handle answers
  ``NVML_ERROR_NO_PERMISSION`` (an agent confined by cgroup device rules).
* A scenario ``hang`` blocks whichever call comes next, forever.
* The scenario's XIDs and other GPU events arrive through
  ``nvmlEventSetWait_v2``, for the GPUs and event types registered in that
  set; an event while no set watches its GPU is gone, as on a driver.
* Once a GPU registered in an event set is lost, ``nvmlEventSetWait_v2`` on
  that set answers ``NVML_ERROR_GPU_IS_LOST`` at once (after the events
  already pending), for good: only a set without that GPU waits again.
* ``nvmlInit`` answers ``NVML_ERROR_DRIVER_NOT_LOADED`` until the scenario's
  ``driver_ready_at`` (a driver loading after the agent started); device and
  event calls before ``nvmlInit`` or after the last ``nvmlShutdown`` answer
  ``NVML_ERROR_UNINITIALIZED``.
* A client holds the GPUs from ``nvmlInit`` to the last ``nvmlShutdown`` and
  while an event set is open: the simulated device nodes (``devices``, one
  file per GPU) are then locked, and ``vetd nvml-sim reset SCENARIO`` (the
  stand-in for ``nvidia-smi -r``) refuses, as the driver refuses a reset of a
  GPU another process has open.
* ``nvml_error`` steps make named functions fail with a named NVML error
  (``{at: 3s, gpu: 1, nvml_error: {nvmlDeviceGetPowerUsage: UNKNOWN}}``), or
  named fields answer it inside ``nvmlDeviceGetFieldValues``
  (``NVML_FI_DEV_NVLINK_GET_STATE: NOT_SUPPORTED``: a driver without the
  per-link fields).
* ``nvmlDeviceGetFieldValues`` answers each field on its own: the NVLink
  fields per link (``scopeId`` = link, as the per-link calls answer), the
  ``*_TLIMIT`` thresholds relative to a simulated T.Limit (the slowdown
  threshold), which ``nvmlDeviceGetMarginTemperature`` measures from.
* Functions this simulation does not know are missing symbols, which pynvml
  reports as ``NVML_ERROR_FUNCTION_NOT_FOUND`` (an older driver).

Codes, bit masks and field ids come from pynvml's constants, not from the
tables :class:`~vetd.plugins.gpu_health.nvml.NvmlSource` decodes with, so a wrong
entry in those tables shows as a difference in the tests.

Captures and scenarios (:mod:`vetd.plugins.gpu_health.replay`) stay the one home of
GPU stand-ins: this module adds no state of its own, it only serves theirs
through NVML's interface.
"""

from __future__ import annotations

import ctypes
import fcntl
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from vetd.agent.api import SourceUnavailable
from vetd.plugins.gpu_health.model import (
    CLOCK_REASONS,
    GPU_EVENTS,
    DriverEvent,
    GpuSnapshot,
    NodeSnapshot,
    NvLink,
)
from vetd.plugins.gpu_health.sources import Source

#: Handles are opaque pointers; ours are these addresses plus the GPU index.
_HANDLE_BASE = 0x5EED0000
_EVENT_SET_BASE = 0x5E700000
_GPM_SAMPLE_BASE = 0x6A700000
#: GPM metrics the simulated GPU measures, by pynvml's ``NVML_GPM_METRIC_<name>`` → the GpuSnapshot field.
_GPM_METRICS = {"GRAPHICS_UTIL": "utilization_pct", "SM_UTIL": "sm_active_pct", "SM_OCCUPANCY": "sm_occupancy_pct",
                "ANY_TENSOR_UTIL": "tensor_active_pct", "DRAM_BW_UTIL": "dram_active_pct",
                "FP64_UTIL": "fp64_active_pct", "FP32_UTIL": "fp32_active_pct", "FP16_UTIL": "fp16_active_pct",
                "PCIE_TX_PER_SEC": "pcie_tx_mib_s", "PCIE_RX_PER_SEC": "pcie_rx_mib_s",
                "NVLINK_TOTAL_TX_PER_SEC": "nvlink_tx_mib_s", "NVLINK_TOTAL_RX_PER_SEC": "nvlink_rx_mib_s"}
#: Snapshots are re-read at most this often (a scenario's time moves on).
REFRESH_S = 0.05

#: Errors an ``nvml_error`` scenario step may name (``NVML_ERROR_<name>``).
ERRORS = ("INVALID_ARGUMENT", "NOT_SUPPORTED", "NO_PERMISSION", "NOT_FOUND", "TIMEOUT", "IRQ_ISSUE",
          "CORRUPTED_INFOROM", "GPU_IS_LOST", "RESET_REQUIRED", "OPERATING_SYSTEM", "MEMORY", "NO_DATA", "UNKNOWN")
#: Snapshot clock reasons by pynvml's ``nvmlClocksEventReason<Name>``.
_REASON_NAMES = {
    "gpu_idle": "GpuIdle", "applications_clocks_setting": "ApplicationsClocksSetting",
    "sw_power_cap": "SwPowerCap", "hw_slowdown": "HwSlowdown", "sync_boost": "SyncBoost",
    "sw_thermal_slowdown": "SwThermalSlowdown", "hw_thermal_slowdown": "HwThermalSlowdown",
    "hw_power_brake_slowdown": "HwPowerBrakeSlowdown", "display_clocks_setting": "DisplayClockSetting",
}
assert set(_REASON_NAMES) == set(CLOCK_REASONS)
#: Recovery actions as nvidia-smi words them, by pynvml's ``NVML_GPU_RECOVERY_ACTION_<NAME>``.
_RECOVERY_NAMES = {"none": "NONE", "reset": "GPU_RESET", "reboot": "NODE_REBOOT", "drain p2p": "DRAIN_P2P",
                   "drain and reset": "DRAIN_AND_RESET", "recover imex domain": "RECOVER_IMEX_DOMAIN",
                   "bus reset": "BUS_RESET", "system reboot": "SYSTEM_REBOOT"}

#: Per-link NVLink fields (scopeId = link) by pynvml's name → what each answers.
_NVLINK_FIELDS = {"NVML_FI_DEV_NVLINK_GET_STATE": "up", "NVML_FI_DEV_NVLINK_ERROR_DL_REPLAY": "replay",
                  "NVML_FI_DEV_NVLINK_ERROR_DL_RECOVERY": "recovery", "NVML_FI_DEV_NVLINK_ERROR_DL_CRC": "crc_flit"} | {
    f"NVML_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_L{link}": "crc_data" for link in range(12)}

#: Scenario GPU events by pynvml's ``nvmlEventType<Name>``.
_EVENT_NAMES = {"gpu_unavailable": "GpuUnavailableError", "fatal_poison": "FatalPoisonError",
                "nonfatal_poison": "NonFatalPoisonError", "row_remap_failure": "DramRetirementFailure",
                "row_remap": "DramRetirementEvent", "sbe_storm": "SingleBitEccErrorStorm",
                "recovery_action": "GpuRecoveryAction"}
assert set(_EVENT_NAMES) == set(GPU_EVENTS)


class _EventSet:
    """One ``nvmlEventSet_t``: what is pending, and the GPUs and event types registered."""

    def __init__(self) -> None:
        self.pending: queue.SimpleQueue[DriverEvent] = queue.SimpleQueue()
        self.types = 0
        self.gpus: set[int] = set()
        #: A GPU of the set was lost: it answers GPU_IS_LOST for good and takes no more events.
        self.broken = False


class _Fail(Exception):
    """Inside a simulated call: return ``NVML_ERROR_<name>``."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _out(ref: Any) -> Any:
    """The object behind a ``byref(...)`` out-parameter."""
    return ref._obj


def _int(value: Any) -> int:
    return int(value.value) if hasattr(value, "value") else int(value)


def _address(pointer: Any) -> int:
    return ctypes.cast(pointer, ctypes.c_void_p).value or 0


def _set_pointer(ref: Any, address: int) -> None:
    target = _out(ref)
    ctypes.cast(ctypes.pointer(target), ctypes.POINTER(ctypes.c_void_p))[0] = address


def _need(value: Any) -> Any:
    if value is None:
        raise _Fail("NOT_SUPPORTED")
    return value


class SimulatedNvml:
    """The C side of NVML, answering from a :class:`~vetd.plugins.gpu_health.sources.Source`."""

    def __init__(self, source: Source, *, slots: dict[int, str] | None = None,
                 nvml_errors: Callable[[], dict[int, dict[str, str]]] | None = None,
                 driver_ready: Callable[[], bool] | None = None, devices: Path | None = None) -> None:
        """``slots``: every GPU the node has, index → PCI bus id (default: the
        first snapshot's); ``nvml_errors``: the failures in force now, {GPU
        index: {function: error name}}; ``driver_ready``: whether the driver
        has loaded yet; ``devices``: the folder standing for ``/dev`` (one
        ``nvidiaN`` per GPU, locked while a client holds NVML). :meth:`of`
        fills them from a scenario."""
        from vetd.plugins.gpu_health.nvml import _import

        #: pynvml's constants are the simulation's nvml.h: it shares no table with NvmlSource.
        self.n = nvml = _import()
        self.source = source
        self._nvml_errors = nvml_errors
        # An older pynvml lacks some names: the simulated driver then lacks those features too.
        self._reason_bits = {r: getattr(nvml, f"nvmlClocksEventReason{name}", None)
                             or getattr(nvml, f"nvmlClocksThrottleReason{name}") for r, name in _REASON_NAMES.items()}
        self._recovery = {words: getattr(nvml, f"NVML_GPU_RECOVERY_ACTION_{name}")
                          for words, name in _RECOVERY_NAMES.items()
                          if hasattr(nvml, f"NVML_GPU_RECOVERY_ACTION_{name}")}
        self._lock = threading.RLock()
        self._snapshot: NodeSnapshot | None = None
        self._taken = 0.0
        self._slots: list[int] | None = None if slots is None else sorted(slots)
        self._bus_of: dict[int, str] = dict(slots or {})
        #: Event types by vetd's name; one this pynvml lacks is one the simulated driver lacks.
        self._event_types = {"xid": nvml.nvmlEventTypeXidCriticalError} | {
            kind: getattr(nvml, f"nvmlEventType{name}") for kind, name in _EVENT_NAMES.items()
            if hasattr(nvml, f"nvmlEventType{name}")}
        self._events: dict[int, _EventSet] = {}
        self._feeding = False
        self._next_set = 0
        self._driver_ready = driver_ready
        self._devices = devices
        self._held: list[IO[bytes]] = []
        #: nvmlInit calls not yet matched by nvmlShutdown (the driver counts them too).
        self.inits = 0
        self.calls = 0
        #: GPM samples by number: (GPU index, {metric id: value}), None until taken.
        self._gpm_samples: dict[int, tuple[int, dict[int, float | None]] | None] = {}
        self._next_sample = 0
        self._gpm = {getattr(nvml, f"NVML_GPM_METRIC_{name}"): field for name, field in _GPM_METRICS.items()
                     if hasattr(nvml, f"NVML_GPM_METRIC_{name}")}

    @classmethod
    def of(cls, source: Source) -> SimulatedNvml:
        """The simulation of a capture or scenario (a scenario's vanished GPUs and ``nvml_error`` steps included)."""
        from vetd.plugins.gpu_health.replay import ScenarioSource

        if isinstance(source, ScenarioSource):
            return cls(source, slots=source.slots(), nvml_errors=source.nvml_errors,
                       driver_ready=source.driver_ready, devices=source.devices())
        return cls(source)

    # -- who holds the GPUs ----------------------------------------------------

    def held(self) -> bool:
        """A client has NVML open (initialised, or an event set open): a reset would be refused."""
        return self.inits > 0 or bool(self._events)

    def _hold(self) -> None:
        """Lock the simulated device nodes while held, as open ``/dev/nvidiaN`` files block ``nvidia-smi -r``."""
        if self._devices is None:
            return
        if self.held() and not self._held:
            self._devices.mkdir(parents=True, exist_ok=True)
            for index in self._slots_now():
                node = (self._devices / f"nvidia{index}").open("ab")
                fcntl.flock(node, fcntl.LOCK_SH)
                self._held.append(node)
        elif not self.held():
            while self._held:
                self._held.pop().close()

    # -- plumbing ------------------------------------------------------------

    def __getattr__(self, name: str) -> Callable[..., int]:
        method = getattr(type(self), f"_c_{name}", None)
        if method is None:
            raise AttributeError(name)  # pynvml: NVML_ERROR_FUNCTION_NOT_FOUND

        def call(*args: Any) -> int:
            self.calls += 1
            try:
                if name.startswith(("nvmlDevice", "nvmlEvent")) and self.inits <= 0:
                    raise _Fail("UNINITIALIZED")
                if args and name.startswith("nvmlDevice") and name != "nvmlDeviceGetCount_v2":
                    self._injected(name, args[0])
                result = method(self, *args)
            except _Fail as fail:
                return int(getattr(self.n, f"NVML_ERROR_{fail.name}"))
            return self.n.NVML_SUCCESS if result is None else int(result)

        return call

    def state(self) -> NodeSnapshot:
        with self._lock:
            now = time.monotonic()
            if self._snapshot is None or now - self._taken >= REFRESH_S:
                self._snapshot = self.source.snapshot()  # a scenario `hang` blocks here, as a driver would
                self._taken = now
                if self._slots is None:
                    self._slots = [gpu.index for gpu in self._snapshot.gpus]
                    self._bus_of = {gpu.index: gpu.pci_bus_id for gpu in self._snapshot.gpus}
            return self._snapshot

    def _slots_now(self) -> list[int]:
        self.state()
        assert self._slots is not None
        return self._slots

    def _index(self, handle: Any) -> int:
        offset = _address(handle) - _HANDLE_BASE
        if offset not in self._slots_now():
            raise _Fail("INVALID_ARGUMENT")
        return offset

    def _gpu(self, handle: Any) -> GpuSnapshot:
        index = self._index(handle)
        for gpu in self.state().gpus:
            if gpu.index == index:
                return gpu
        raise _Fail("GPU_IS_LOST")

    def _injected(self, name: str, first: Any) -> None:
        """Fail ``name`` as an ``nvml_error`` step says (``first``: its handle or index argument)."""
        if self._nvml_errors is None:
            return
        table = self._nvml_errors()
        if name == "nvmlDeviceGetHandleByIndex_v2":
            slots = self._slots_now()
            index = slots[_int(first)] if _int(first) < len(slots) else None
        else:
            index = _address(first) - _HANDLE_BASE
        error = table.get(index, {}).get(name) if index is not None else None
        if error is not None:
            raise _Fail(error)

    # -- system ----------------------------------------------------------------

    def _c_nvmlInitWithFlags(self, flags: Any) -> None:
        if self._driver_ready is not None and not self._driver_ready():
            raise _Fail("DRIVER_NOT_LOADED")
        self.state()
        with self._lock:
            self.inits += 1
            self._hold()

    def _c_nvmlShutdown(self) -> None:
        with self._lock:
            if self.inits <= 0:
                raise _Fail("UNINITIALIZED")
            self.inits -= 1
            self._hold()

    def _c_nvmlSystemGetDriverVersion(self, buffer: Any, size: Any) -> None:
        buffer.value = _need(self.state().driver_version).encode()

    def _c_nvmlSystemGetCudaDriverVersion_v2(self, ref: Any) -> None:
        major, _, minor = _need(self.state().cuda_version).partition(".")
        _out(ref).value = int(major) * 1000 + int(minor or 0) * 10

    def _c_nvmlDeviceGetCount_v2(self, ref: Any) -> None:
        _out(ref).value = len(self._slots_now())

    def _c_nvmlDeviceGetHandleByIndex_v2(self, index: Any, ref: Any) -> None:
        slots = self._slots_now()
        position = _int(index)
        if position >= len(slots):
            raise _Fail("INVALID_ARGUMENT")
        gpu = slots[position]
        present = next((g for g in self.state().gpus if g.index == gpu), None)
        if present is None:
            raise _Fail("GPU_IS_LOST")
        if present.no_permission:  # counted, but this process may not open it (cgroup device rules)
            raise _Fail("NO_PERMISSION")
        _set_pointer(ref, _HANDLE_BASE + gpu)

    # -- identity --------------------------------------------------------------

    def _string(self, buffer: Any, value: str | None) -> None:
        buffer.value = _need(value).encode()

    def _c_nvmlDeviceGetUUID(self, handle: Any, buffer: Any, size: Any) -> None:
        self._string(buffer, self._gpu(handle).uuid or None)

    def _c_nvmlDeviceGetName(self, handle: Any, buffer: Any, size: Any) -> None:
        self._string(buffer, self._gpu(handle).name or None)

    def _c_nvmlDeviceGetSerial(self, handle: Any, buffer: Any, size: Any) -> None:
        self._string(buffer, self._gpu(handle).serial)

    def _c_nvmlDeviceGetVbiosVersion(self, handle: Any, buffer: Any, size: Any) -> None:
        self._string(buffer, self._gpu(handle).vbios)

    def _c_nvmlDeviceGetPciInfo_v3(self, handle: Any, ref: Any) -> None:
        bus = _need(self._gpu(handle).pci_bus_id or None)
        info = _out(ref)
        info.busId = bus.encode()
        info.busIdLegacy = bus.encode()[-16:]
        domain, _, rest = bus.rpartition(":")[0].partition(":")
        info.domain = int(domain or "0", 16)
        info.bus = int(rest or "0", 16)

    # -- memory errors -----------------------------------------------------------

    def _ecc(self, gpu: GpuSnapshot, kind: int, scope: int, location: str) -> int | None:
        name = f"ecc_{'volatile' if scope == 0 else 'aggregate'}_{location}_" \
               f"{'uncorrectable' if kind == self.n.NVML_MEMORY_ERROR_TYPE_UNCORRECTED else 'correctable'}"
        value: int | None = getattr(gpu, name)
        return value

    def _c_nvmlDeviceGetEccMode(self, handle: Any, current: Any, pending: Any) -> None:
        enabled = int(_need(self._gpu(handle).ecc_enabled))
        _out(current).value = enabled
        _out(pending).value = enabled

    def _c_nvmlDeviceGetMemoryErrorCounter(self, handle: Any, kind: Any, scope: Any, location: Any, ref: Any) -> None:
        names = {self.n.NVML_MEMORY_LOCATION_DRAM: "dram", self.n.NVML_MEMORY_LOCATION_SRAM: "sram"}
        where = names.get(_int(location))
        if where is None:
            raise _Fail("NOT_SUPPORTED")
        _out(ref).value = _need(self._ecc(self._gpu(handle), _int(kind), _int(scope), where))

    def _c_nvmlDeviceGetTotalEccErrors(self, handle: Any, kind: Any, scope: Any, ref: Any) -> None:
        gpu = self._gpu(handle)
        parts = [self._ecc(gpu, _int(kind), _int(scope), where) for where in ("sram", "dram")]
        _out(ref).value = _need(None if all(p is None for p in parts) else sum(p or 0 for p in parts))

    def _c_nvmlDeviceGetRetiredPages(self, handle: Any, cause: Any, count_ref: Any, pages: Any) -> int:
        gpu = self._gpu(handle)
        count = _need(gpu.retired_pages_sbe if _int(cause) == self.n.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS else gpu.retired_pages_dbe)
        have = _out(count_ref)
        if pages is None or have.value < count:
            have.value = count
            return int(self.n.NVML_SUCCESS if count == 0 else self.n.NVML_ERROR_INSUFFICIENT_SIZE)
        for n in range(count):
            pages[n] = 0x1000 * (n + 1)
        have.value = count
        return int(self.n.NVML_SUCCESS)

    def _c_nvmlDeviceGetRetiredPagesPendingStatus(self, handle: Any, ref: Any) -> None:
        _out(ref).value = int(_need(self._gpu(handle).retired_pages_pending))

    def _c_nvmlDeviceGetRemappedRows(self, handle: Any, corr: Any, unc: Any, pending: Any, failure: Any) -> None:
        gpu = self._gpu(handle)
        values = (gpu.remapped_rows_correctable, gpu.remapped_rows_uncorrectable,
                  gpu.remapped_rows_pending, gpu.remapped_rows_failure)
        if any(v is None for v in values):
            raise _Fail("NOT_SUPPORTED")
        for ref, value in zip((corr, unc, pending, failure), values, strict=True):
            _out(ref).value = int(value)  # type: ignore[arg-type]

    def _c_nvmlDeviceGetFieldValues(self, handle: Any, count: Any, ref: Any) -> None:
        """Each field answers on its own: the GPU-wide ones, the NVLink ones per link
        (scopeId = link, as the per-link calls answer), the T.Limit thresholds; an
        ``nvml_error`` naming a field (``NVML_FI_DEV_NVLINK_GET_STATE: NOT_SUPPORTED``,
        an older driver) makes that field answer the error."""
        gpu = self._gpu(handle)
        values = _out(ref)
        n = self.n
        recovery = None if gpu.recovery_action is None else self._recovery.get(gpu.recovery_action.lower())
        unsigned, signed = n.NVML_VALUE_TYPE_UNSIGNED_INT, n.NVML_VALUE_TYPE_SIGNED_INT
        by_name: dict[str, tuple[int, int | None]] = {
            "NVML_FI_DEV_MEMORY_TEMP": (unsigned, None if gpu.temp_memory_c is None else round(gpu.temp_memory_c)),
            "NVML_FI_DEV_RESET_STATUS": (unsigned, None if gpu.reset_required is None else int(gpu.reset_required)),
            "NVML_FI_DEV_DRAIN_AND_RESET_STATUS": (unsigned, None if gpu.drain_and_reset_recommended is None
                                                   else int(gpu.drain_and_reset_recommended)),
            "NVML_FI_DEV_GET_GPU_RECOVERY_ACTION": (unsigned, recovery),
        }
        by_name["NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION"] = (
            n.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, None if gpu.energy_mj is None else round(gpu.energy_mj))
        for name, counter in (("NVML_FI_DEV_PCIE_COUNT_TX_BYTES", gpu.pcie_tx_bytes),
                              ("NVML_FI_DEV_PCIE_COUNT_RX_BYTES", gpu.pcie_rx_bytes)):
            by_name[name] = (n.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, counter)
        tlimit = self._tlimit_c(gpu)
        for name, threshold in (("NVML_FI_DEV_TEMPERATURE_SLOWDOWN_TLIMIT", gpu.temp_slowdown_c),
                                ("NVML_FI_DEV_TEMPERATURE_SHUTDOWN_TLIMIT", gpu.temp_shutdown_c)):
            # An H200 answers these as signed ints (-2, -8), relative to T.Limit.
            by_name[name] = (signed, None if tlimit is None or threshold is None else round(tlimit - threshold))
        answers = {getattr(n, name): value for name, value in by_name.items() if hasattr(n, name)}
        per_link = {getattr(n, name): kind for name, kind in _NVLINK_FIELDS.items() if hasattr(n, name)}
        injected = self._field_errors(handle)
        links = None if gpu.nvlinks is None else {link.link: link for link in gpu.nvlinks}
        throughput = {getattr(n, name): kind for name, kind in (("NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX", "tx"),
                                                                ("NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX", "rx"))
                      if hasattr(n, name)}
        for i in range(_int(count)):
            entry = values[i]
            field, scope = int(entry.fieldId), int(entry.scopeId)
            entry.timestamp = int(time.time() * 1e6)
            try:
                if field in injected:
                    raise _Fail(injected[field])
                if field in per_link:
                    value_type, value = self._link_field(links, per_link[field], scope)
                elif field in throughput:
                    value_type, value = self._link_throughput(gpu, links, throughput[field], scope)
                else:
                    value_type, value = answers.get(field, (unsigned, None))
                    _need(value)
            except _Fail as fail:
                entry.nvmlReturn = int(getattr(n, f"NVML_ERROR_{fail.name}"))
                continue
            entry.nvmlReturn = n.NVML_SUCCESS
            entry.valueType = value_type
            member = {unsigned: "uiVal", signed: "siVal", n.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: "ullVal"}[value_type]
            setattr(entry.value, member, value)

    def _field_errors(self, handle: Any) -> dict[int, str]:
        """Field id → the error an ``nvml_error`` step makes it answer on this GPU."""
        if self._nvml_errors is None:
            return {}
        named = self._nvml_errors().get(_address(handle) - _HANDLE_BASE, {})
        return {getattr(self.n, name): error for name, error in named.items()
                if name.startswith("NVML_FI_") and hasattr(self.n, name)}

    def _link_field(self, links: dict[int, NvLink] | None, kind: str, link: int) -> tuple[int, int]:
        """A per-link NVLink field, answered as the per-link calls answer for that link
        (:meth:`_link`; state an unsigned int, counters unsigned long long, as on a driver)."""
        state = _need(links).get(link)
        if state is None:
            raise _Fail("INVALID_ARGUMENT" if link > max(links or [-1]) else "NOT_SUPPORTED")
        if kind == "up":
            return self.n.NVML_VALUE_TYPE_UNSIGNED_INT, int(_need(state.up))
        if kind == "crc_data":
            raise _Fail("NOT_SUPPORTED")  # as nvmlDeviceGetNvLinkErrorCounter(DL_CRC_DATA) answers
        counter = {"replay": state.replay_errors, "recovery": state.recovery_errors, "crc_flit": state.crc_errors}
        return self.n.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, int(_need(counter[kind]))

    def _link_throughput(self, gpu: GpuSnapshot, links: dict[int, NvLink] | None, kind: str,
                         link: int) -> tuple[int, int]:
        """A link's share (KiB) of the GPU's NVLink data counter: the total split evenly over the
        links that are up, the remainder on the first (the per-link fields sum to the total)."""
        total = _need(gpu.nvlink_tx_kib if kind == "tx" else gpu.nvlink_rx_kib)
        state = _need(links).get(link)
        if state is None:
            raise _Fail("INVALID_ARGUMENT" if link > max(links or [-1]) else "NOT_SUPPORTED")
        up = sorted(number for number, each in (links or {}).items() if each.up)
        share = 0 if link not in up else total // len(up) + (total % len(up) if link == up[0] else 0)
        return self.n.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, share

    @staticmethod
    def _tlimit_c(gpu: GpuSnapshot) -> float | None:
        """T.Limit in °C. A snapshot has no T.Limit of its own: the simulated one is the
        slowdown threshold (an H200's is 2 °C below it); any choice gives the same thresholds."""
        return gpu.temp_slowdown_c

    def _c_nvmlDeviceGetMarginTemperature(self, handle: Any, ref: Any) -> None:
        gpu = self._gpu(handle)
        margin = _out(ref)
        if margin.version != self.n.nvmlMarginTemperature_v1:
            raise _Fail("ARGUMENT_VERSION_MISMATCH")
        tlimit, now = _need(self._tlimit_c(gpu)), _need(gpu.temp_c)
        margin.marginTemperature = round(tlimit - now)

    # -- clocks, thermals, power, use -------------------------------------------

    def _c_nvmlDeviceGetCurrentClocksEventReasons(self, handle: Any, ref: Any) -> None:
        reasons = _need(self._gpu(handle).clock_reasons)
        _out(ref).value = sum(self._reason_bits[r] for r in set(reasons))

    _c_nvmlDeviceGetCurrentClocksThrottleReasons = _c_nvmlDeviceGetCurrentClocksEventReasons

    def _c_nvmlDeviceGetClockInfo(self, handle: Any, domain: Any, ref: Any) -> None:
        gpu = self._gpu(handle)
        values = {self.n.NVML_CLOCK_SM: gpu.clock_sm_mhz, self.n.NVML_CLOCK_MEM: gpu.clock_memory_mhz}
        if _int(domain) not in values:
            raise _Fail("NOT_SUPPORTED")
        _out(ref).value = round(_need(values[_int(domain)]))

    def _c_nvmlDeviceGetMaxClockInfo(self, handle: Any, domain: Any, ref: Any) -> None:
        gpu = self._gpu(handle)
        if _int(domain) != self.n.NVML_CLOCK_SM:
            raise _Fail("NOT_SUPPORTED")
        _out(ref).value = round(_need(gpu.clock_sm_max_mhz))

    def _c_nvmlDeviceGetTemperature(self, handle: Any, sensor: Any, ref: Any) -> None:
        if _int(sensor) != self.n.NVML_TEMPERATURE_GPU:
            raise _Fail("INVALID_ARGUMENT")
        _out(ref).value = round(_need(self._gpu(handle).temp_c))

    def _c_nvmlDeviceGetTemperatureThreshold(self, handle: Any, which: Any, ref: Any) -> None:
        gpu = self._gpu(handle)
        values = {self.n.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN: gpu.temp_shutdown_c,
                  self.n.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN: gpu.temp_slowdown_c}
        _out(ref).value = round(_need(values.get(_int(which))))

    def _c_nvmlDeviceGetPowerUsage(self, handle: Any, ref: Any) -> None:
        _out(ref).value = round(_need(self._gpu(handle).power_w) * 1000)

    def _c_nvmlDeviceGetEnforcedPowerLimit(self, handle: Any, ref: Any) -> None:
        _out(ref).value = round(_need(self._gpu(handle).power_limit_w) * 1000)

    def _c_nvmlDeviceGetMemoryInfo(self, handle: Any, ref: Any) -> None:
        """v1: the driver's reservation counts as used (616 MiB on an idle H200)."""
        gpu = self._gpu(handle)
        total, used = _need(gpu.memory_total_mib), _need(gpu.memory_used_mib) + (gpu.memory_reserved_mib or 0.0)
        memory = _out(ref)
        memory.total, memory.used = round(total * 2**20), round(used * 2**20)
        memory.free = memory.total - memory.used

    def _c_nvmlDeviceGetMemoryInfo_v2(self, handle: Any, ref: Any) -> None:
        """v2: used, reserved and free apart, as nvidia-smi shows them (a capture
        that shows no reservation is from a driver before v2: not supported)."""
        gpu = self._gpu(handle)
        memory = _out(ref)
        if memory.version != self.n.nvmlMemory_v2:
            raise _Fail("ARGUMENT_VERSION_MISMATCH")
        total, used = _need(gpu.memory_total_mib), _need(gpu.memory_used_mib)
        reserved = _need(gpu.memory_reserved_mib)
        memory.total, memory.used = round(total * 2**20), round(used * 2**20)
        memory.reserved = round(reserved * 2**20)
        memory.free = memory.total - memory.used - memory.reserved

    def _c_nvmlDeviceGetUtilizationRates(self, handle: Any, ref: Any) -> None:
        gpu = self._gpu(handle)
        _out(ref).gpu = round(_need(gpu.utilization_pct))
        _out(ref).memory = round(gpu.utilization_memory_pct or 0.0)

    def _c_nvmlDeviceGetTotalEnergyConsumption(self, handle: Any, ref: Any) -> None:
        _out(ref).value = round(_need(self._gpu(handle).energy_mj))

    def _c_nvmlDeviceGetPcieThroughput(self, handle: Any, counter: Any, ref: Any) -> None:
        """KB/s over the driver's last 20 ms, as the driver answers it."""
        gpu = self._gpu(handle)
        rates = {self.n.NVML_PCIE_UTIL_TX_BYTES: gpu.pcie_tx_mib_s, self.n.NVML_PCIE_UTIL_RX_BYTES: gpu.pcie_rx_mib_s}
        if _int(counter) not in rates:
            raise _Fail("INVALID_ARGUMENT")
        _out(ref).value = round(_need(rates[_int(counter)]) * 1024)

    # -- GPU performance metrics (GPM) ---------------------------------------------

    def _c_nvmlGpmQueryDeviceSupport(self, handle: Any, ref: Any) -> None:
        support = _out(ref)
        if support.version != self.n.NVML_GPM_SUPPORT_VERSION:
            raise _Fail("ARGUMENT_VERSION_MISMATCH")
        support.isSupportedDevice = int(bool(self._gpu(handle).gpm_supported))

    def _c_nvmlGpmSampleAlloc(self, ref: Any) -> None:
        with self._lock:
            self._next_sample += 1
            number = self._next_sample
            self._gpm_samples[number] = None
        _set_pointer(ref, _GPM_SAMPLE_BASE + number)

    def _c_nvmlGpmSampleFree(self, sample: Any) -> None:
        with self._lock:
            if self._gpm_samples.pop(_address(sample) - _GPM_SAMPLE_BASE, False) is False:
                raise _Fail("INVALID_ARGUMENT")

    def _c_nvmlGpmSampleGet(self, handle: Any, sample: Any) -> None:
        """What the GPU's activity is at this moment, kept in the sample (a real GPU keeps counters)."""
        gpu = self._gpu(handle)
        number = _address(sample) - _GPM_SAMPLE_BASE
        if number not in self._gpm_samples:
            raise _Fail("INVALID_ARGUMENT")
        if not gpu.gpm_supported:
            raise _Fail("NOT_SUPPORTED")
        self._gpm_samples[number] = (gpu.index, {metric: getattr(gpu, name) for metric, name in self._gpm.items()})

    def _c_nvmlGpmMetricsGet(self, ref: Any) -> None:
        """Each metric between two samples of one GPU: the mean of the activity at the two moments
        (a real GPU measures the whole interval; a scenario's activity changes in steps)."""
        request = _out(ref)
        if request.version != self.n.NVML_GPM_METRICS_GET_VERSION:
            raise _Fail("ARGUMENT_VERSION_MISMATCH")
        first = self._gpm_samples.get(_address(request.sample1) - _GPM_SAMPLE_BASE)
        second = self._gpm_samples.get(_address(request.sample2) - _GPM_SAMPLE_BASE)
        if first is None or second is None or first[0] != second[0]:
            raise _Fail("INVALID_ARGUMENT")
        for i in range(_int(request.numMetrics)):
            metric = request.metrics[i]
            before, after = first[1].get(int(metric.metricId)), second[1].get(int(metric.metricId))
            if before is None or after is None:
                metric.nvmlReturn = self.n.NVML_ERROR_NOT_SUPPORTED
                continue
            metric.nvmlReturn = self.n.NVML_SUCCESS
            metric.value = (before + after) / 2

    def _c_nvmlDeviceGetPersistenceMode(self, handle: Any, ref: Any) -> None:
        _out(ref).value = int(_need(self._gpu(handle).persistence_mode))

    def _c_nvmlDeviceGetComputeRunningProcesses_v3(self, handle: Any, count_ref: Any, infos: Any) -> int:
        processes = [p for p in _need(self._gpu(handle).processes) if "C" in p.type]
        have = _out(count_ref)
        if not processes:
            have.value = 0
            return int(self.n.NVML_SUCCESS)
        if infos is None or have.value < len(processes):
            have.value = len(processes)
            return int(self.n.NVML_ERROR_INSUFFICIENT_SIZE)
        for n, process in enumerate(processes):
            infos[n].pid = process.pid
            infos[n].usedGpuMemory = (2**64 - 1 if process.used_memory_mib is None
                                      else round(process.used_memory_mib * 2**20))
        have.value = len(processes)
        return int(self.n.NVML_SUCCESS)

    def _c_nvmlDeviceGetMigMode(self, handle: Any, current: Any, pending: Any) -> None:
        enabled = int(_need(self._gpu(handle).mig_enabled))
        _out(current).value = enabled
        _out(pending).value = enabled

    # -- PCIe and NVLink ---------------------------------------------------------

    def _c_nvmlDeviceGetCurrPcieLinkGeneration(self, handle: Any, ref: Any) -> None:
        _out(ref).value = _need(self._gpu(handle).pcie_gen)

    def _c_nvmlDeviceGetMaxPcieLinkGeneration(self, handle: Any, ref: Any) -> None:
        _out(ref).value = _need(self._gpu(handle).pcie_gen_max)

    def _c_nvmlDeviceGetCurrPcieLinkWidth(self, handle: Any, ref: Any) -> None:
        _out(ref).value = _need(self._gpu(handle).pcie_width)

    def _c_nvmlDeviceGetMaxPcieLinkWidth(self, handle: Any, ref: Any) -> None:
        _out(ref).value = _need(self._gpu(handle).pcie_width_max)

    def _c_nvmlDeviceGetPcieReplayCounter(self, handle: Any, ref: Any) -> None:
        _out(ref).value = _need(self._gpu(handle).pcie_replay_counter)

    def _link(self, handle: Any, link: Any) -> Any:
        links = _need(self._gpu(handle).nvlinks)
        for each in links:
            if each.link == _int(link):
                return each
        raise _Fail("INVALID_ARGUMENT" if _int(link) > max((x.link for x in links), default=-1) else "NOT_SUPPORTED")

    def _c_nvmlDeviceGetNvLinkState(self, handle: Any, link: Any, ref: Any) -> None:
        _out(ref).value = int(_need(self._link(handle, link).up))

    def _c_nvmlDeviceGetNvLinkErrorCounter(self, handle: Any, link: Any, counter: Any, ref: Any) -> None:
        state = self._link(handle, link)
        values = {self.n.NVML_NVLINK_ERROR_DL_REPLAY: state.replay_errors,
                  self.n.NVML_NVLINK_ERROR_DL_RECOVERY: state.recovery_errors,
                  self.n.NVML_NVLINK_ERROR_DL_CRC_FLIT: state.crc_errors}
        _out(ref).value = _need(values.get(_int(counter)))

    # -- events ------------------------------------------------------------------

    def _c_nvmlDeviceGetSupportedEventTypes(self, handle: Any, ref: Any) -> None:
        self._gpu(handle)
        types = self.n.nvmlEventTypeDoubleBitEccError
        for bit in self._event_types.values():
            types |= bit
        _out(ref).value = types

    def _c_nvmlEventSetCreate(self, ref: Any) -> None:
        with self._lock:
            self._next_set += 1
            number = self._next_set
            self._events[number] = _EventSet()
            self._hold()
        _set_pointer(ref, _EVENT_SET_BASE + number)

    def _c_nvmlDeviceRegisterEvents(self, handle: Any, types: Any, event_set: Any) -> None:
        index = self._gpu(handle).index
        number = _address(event_set) - _EVENT_SET_BASE
        if number not in self._events:
            raise _Fail("INVALID_ARGUMENT")
        entry = self._events[number]
        with self._lock:
            entry.types |= _int(types)
            entry.gpus.add(index)
            if self._feeding:
                return
            self._feeding = True
        threading.Thread(target=self._feed, name="vetd.nvmlsim.events", daemon=True).start()

    def _feed(self) -> None:
        """The driver's side of every event set: each event goes to the sets watching its GPU at that moment."""

        def deliver(event: DriverEvent) -> None:
            index = next((i for i, b in self._bus_of.items() if b == event.pci), None)
            with self._lock:
                for entry in self._events.values():
                    if index in entry.gpus and not entry.broken:
                        entry.pending.put(event)

        try:
            self.source.watch(deliver, threading.Event())
        except SourceUnavailable:
            return  # a capture has no events: the sets just never fire

    def _lost_in(self, entry: _EventSet) -> bool:
        present = {gpu.index for gpu in self.state().gpus}
        return bool(entry.gpus - present)

    def _c_nvmlEventSetWait_v2(self, event_set: Any, ref: Any, timeout_ms: Any) -> None:
        number = _address(event_set) - _EVENT_SET_BASE
        if number not in self._events:
            raise _Fail("INVALID_ARGUMENT")
        entry = self._events[number]
        deadline = time.monotonic() + _int(timeout_ms) / 1000
        while True:  # events of types not registered are not delivered
            try:
                event = entry.pending.get_nowait()
            except queue.Empty:
                # Nothing pending: a set with a lost GPU in it fails at once, every time.
                if entry.broken or self._lost_in(entry):
                    entry.broken = True
                    raise _Fail("GPU_IS_LOST") from None
                try:
                    event = entry.pending.get(timeout=max(0.0, min(REFRESH_S, deadline - time.monotonic())))
                except queue.Empty:
                    if time.monotonic() >= deadline:
                        raise _Fail("TIMEOUT") from None
                    continue
            event_type = self._event_types.get(event.kind, 0)
            if event_type & entry.types:
                break
        # What the driver says after an event reflects it (the recovery action the event announces):
        # the next call reads the state afresh rather than a snapshot up to REFRESH_S older than the event.
        with self._lock:
            self._taken = float("-inf")
        index = next((i for i, b in self._bus_of.items() if b == event.pci), None)
        data = _out(ref)
        if index is not None:
            data.device = ctypes.cast(ctypes.c_void_p(_HANDLE_BASE + index), type(data.device))
        data.eventType = event_type
        data.eventData = event.value

    def _c_nvmlEventSetFree(self, event_set: Any) -> None:
        number = _address(event_set) - _EVENT_SET_BASE
        with self._lock:
            entry = self._events.pop(number, None)
            if entry is None:
                raise _Fail("INVALID_ARGUMENT")
            self._hold()


def install(simulation: SimulatedNvml) -> Callable[[], None]:
    """Make pynvml call ``simulation`` instead of ``libnvidia-ml.so.1``; returns the undo."""
    import pynvml

    with pynvml.libLoadLock:
        previous = pynvml.nvmlLib
        pynvml.nvmlLib = simulation
        pynvml._nvmlGetFunctionPointer_cache.clear()

    def restore() -> None:
        with pynvml.libLoadLock:
            pynvml.nvmlLib = previous
            pynvml._nvmlGetFunctionPointer_cache.clear()

    return restore


#: ``nvidia-smi -r``'s words when another process has the GPU open; its exit
#: status then (255, "other error") is not confirmed on a GPU yet.
IN_USE_EXIT = 255


def reset_stand_in(scenario: str, gpu: str = "all") -> tuple[int, str]:
    """What ``nvidia-smi -r [-i GPU]`` answers on the simulated node of ``scenario``: (exit status, output).

    Refused while any process holds the simulated device nodes (a
    :class:`SimulatedNvml` between ``nvmlInit`` and its last ``nvmlShutdown``,
    or with an event set open), as the driver refuses a reset while a client
    has the GPU open.
    """
    from vetd.plugins.gpu_health.replay import ScenarioError, ScenarioSource

    try:
        source = ScenarioSource(scenario, at=0.0)
    except (ScenarioError, SourceUnavailable) as exc:
        return 2, str(exc)
    slots = source.slots()
    targets = sorted(slots) if gpu == "all" else [int(gpu)] if gpu.isdigit() and int(gpu) in slots else None
    if targets is None:
        return 2, f"No GPU with index {gpu!r}"
    devices = source.devices()
    devices.mkdir(parents=True, exist_ok=True)
    busy, lines = [], []
    for index in targets:
        with (devices / f"nvidia{index}").open("ab") as node:
            try:
                fcntl.flock(node, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                busy.append(slots[index])
                continue
            fcntl.flock(node, fcntl.LOCK_UN)
        lines.append(f"GPU {slots[index]} was successfully reset.")
    if busy:
        lines = [f"GPU {bus} is currently in use by another process." for bus in busy]
        lines.append(f"{len(busy)} device(s) currently being used by one or more other processes (e.g., Fabric "
                     "Manager, CUDA application, graphics application such as an X server, or a monitoring "
                     "application such as another instance of nvidia-smi). Please first kill all processes "
                     "using the device(s) and all compute applications running in the system.")
        return IN_USE_EXIT, "\n".join(lines)
    return 0, "\n".join([*lines, "All done."])
