"""The normalized GPU snapshot every source produces and every check reads.

``None`` means "not supported or not reported" (a GeForce without ECC, an old
driver, a capture that omits the section), never 0: a check skips what is
``None`` instead of mistaking it for a healthy value.
"""

from __future__ import annotations

import msgspec

#: Clock event (throttle) reasons, named as nvidia-smi names them without prefix.
CLOCK_REASONS = (
    "gpu_idle",
    "applications_clocks_setting",
    "sw_power_cap",
    "hw_slowdown",
    "hw_thermal_slowdown",
    "hw_power_brake_slowdown",
    "sync_boost",
    "sw_thermal_slowdown",
    "display_clocks_setting",
)


class NvLink(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    link: int
    up: bool | None = None
    replay_errors: int | None = None
    recovery_errors: int | None = None
    crc_errors: int | None = None


class GpuProcess(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pid: int
    name: str = ""
    #: ``C`` compute, ``G`` graphics, ``C+G`` both.
    type: str = "C"
    used_memory_mib: float | None = None


class GpuSnapshot(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    index: int
    uuid: str = ""
    pci_bus_id: str = ""
    name: str = ""
    serial: str | None = None
    vbios: str | None = None
    # ECC
    ecc_enabled: bool | None = None
    ecc_volatile_sram_correctable: int | None = None
    ecc_volatile_sram_uncorrectable: int | None = None
    ecc_volatile_dram_correctable: int | None = None
    ecc_volatile_dram_uncorrectable: int | None = None
    ecc_aggregate_sram_correctable: int | None = None
    ecc_aggregate_sram_uncorrectable: int | None = None
    ecc_aggregate_dram_correctable: int | None = None
    ecc_aggregate_dram_uncorrectable: int | None = None
    #: Volatile totals, only where the driver gives no SRAM/DRAM split.
    ecc_volatile_correctable_total: int | None = None
    ecc_volatile_uncorrectable_total: int | None = None
    # page retirement (pre-Ampere) and row remapping (Ampere and later)
    retired_pages_sbe: int | None = None
    retired_pages_dbe: int | None = None
    retired_pages_pending: bool | None = None
    remapped_rows_correctable: int | None = None
    remapped_rows_uncorrectable: int | None = None
    remapped_rows_pending: bool | None = None
    remapped_rows_failure: bool | None = None
    # driver's own verdicts
    reset_required: bool | None = None
    drain_and_reset_recommended: bool | None = None
    recovery_action: str | None = None
    # clocks: the reasons currently active (None: not reported), current and maximum clocks
    clock_reasons: list[str] | None = None
    clock_sm_mhz: float | None = None
    clock_memory_mhz: float | None = None
    clock_sm_max_mhz: float | None = None
    # PCIe
    pcie_gen: int | None = None
    pcie_gen_max: int | None = None
    pcie_width: int | None = None
    pcie_width_max: int | None = None
    pcie_replay_counter: int | None = None
    # NVLink
    nvlinks: list[NvLink] | None = None
    # thermals and power
    temp_c: float | None = None
    temp_memory_c: float | None = None
    temp_slowdown_c: float | None = None
    temp_shutdown_c: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    # memory and use
    #: Used by processes, the driver's own reservation not counted (nvidia-smi's "used").
    memory_used_mib: float | None = None
    memory_total_mib: float | None = None
    memory_reserved_mib: float | None = None
    utilization_pct: float | None = None
    persistence_mode: bool | None = None
    processes: list[GpuProcess] | None = None
    # What the telemetry plugin samples (plugins/telemetry). A scenario sets the rates; the
    # counters are what the driver accumulates (a scenario integrates them from the rates).
    utilization_memory_pct: float | None = None
    #: Energy since the driver loaded, mJ (``nvmlDeviceGetTotalEnergyConsumption``).
    energy_mj: float | None = None
    pcie_tx_mib_s: float | None = None
    pcie_rx_mib_s: float | None = None
    #: PCIe bytes since the driver loaded (NVML fields 197/198).
    pcie_tx_bytes: int | None = None
    pcie_rx_bytes: int | None = None
    #: NVLink data over all links.
    nvlink_tx_mib_s: float | None = None
    nvlink_rx_mib_s: float | None = None
    #: NVLink data since the driver loaded, KiB, all links (NVML fields 138/139 read per link).
    nvlink_tx_kib: int | None = None
    nvlink_rx_kib: int | None = None
    #: GPU performance metrics (GPM, Hopper and later): whether the GPU has them, and the
    #: activities they measure, as DCGM's profiling fields 1002-1012 name them.
    gpm_supported: bool | None = None
    sm_active_pct: float | None = None
    sm_occupancy_pct: float | None = None
    tensor_active_pct: float | None = None
    dram_active_pct: float | None = None
    fp64_active_pct: float | None = None
    fp32_active_pct: float | None = None
    fp16_active_pct: float | None = None
    #: MIG mode (current). On, the per-GPU handle reports no volatile ECC, no
    #: remapped rows and no processes (NVML: NOT_SUPPORTED): those checks cannot run.
    mig_enabled: bool | None = None
    #: The driver answers GPU_IS_LOST: fallen off the bus or otherwise inaccessible.
    #: Only index, uuid, pci_bus_id and name (as last seen) are then known.
    lost: bool = False
    #: The driver counts the GPU but denies this process its handle
    #: (``NVML_ERROR_NO_PERMISSION``: an agent confined by cgroups or device
    #: permissions). Only ``index`` (and identity as last seen) is then known;
    #: the GPU is not this agent's to judge, and it is not lost.
    no_permission: bool = False
    #: Queries the driver failed for a reason other than "not supported",
    #: as ``"function: error"`` (an unknown error, a corrupted infoROM...).
    query_errors: list[str] = []

    @property
    def entity(self) -> str:
        return f"gpu{self.index}"

    @property
    def volatile_uncorrectable(self) -> int | None:
        split = _total(self.ecc_volatile_sram_uncorrectable, self.ecc_volatile_dram_uncorrectable)
        return self.ecc_volatile_uncorrectable_total if split is None else split

    @property
    def volatile_correctable(self) -> int | None:
        split = _total(self.ecc_volatile_sram_correctable, self.ecc_volatile_dram_correctable)
        return self.ecc_volatile_correctable_total if split is None else split

    @property
    def retired_pages(self) -> int | None:
        return _total(self.retired_pages_sbe, self.retired_pages_dbe)


#: Fields only the telemetry plugin reads (through NVML and GPM); ``gpu_health``'s NVML source
#: leaves them None: no check judges them, and reading them would cost every snapshot.
TELEMETRY_FIELDS = ("utilization_memory_pct", "energy_mj", "pcie_tx_mib_s", "pcie_rx_mib_s", "pcie_tx_bytes",
                    "pcie_rx_bytes", "nvlink_tx_mib_s", "nvlink_rx_mib_s", "nvlink_tx_kib", "nvlink_rx_kib",
                    "gpm_supported", "sm_active_pct", "sm_occupancy_pct", "tensor_active_pct", "dram_active_pct",
                    "fp64_active_pct", "fp32_active_pct", "fp16_active_pct")


class NodeSnapshot(msgspec.Struct, kw_only=True):
    """What one source saw at one moment."""

    source: str
    taken: float
    gpus: list[GpuSnapshot] = []
    driver_version: str | None = None
    cuda_version: str | None = None
    #: GPUs the driver says are attached (None: unknown).
    attached_gpus: int | None = None


def _total(*values: int | None) -> int | None:
    present = [v for v in values if v is not None]
    return sum(present) if present else None


#: Driver events other than XIDs, as NVML delivers them through an event set,
#: by vetd's name: what each means (severities are config: ``gpu_event_severity``).
GPU_EVENTS = {
    "gpu_unavailable": "the GPU became unavailable (nvmlEventTypeGpuUnavailableError)",
    "fatal_poison": "an uncontained poisoned-memory error (nvmlEventTypeFatalPoisonError)",
    "nonfatal_poison": "a contained poisoned-memory error (nvmlEventTypeNonFatalPoisonError)",
    "row_remap_failure": "a DRAM row could not be remapped (nvmlEventTypeDramRetirementFailure)",
    "row_remap": "a DRAM row was remapped; it takes effect at the next reset (nvmlEventTypeDramRetirementEvent)",
    "sbe_storm": "a storm of single-bit ECC errors (nvmlEventTypeSingleBitEccErrorStorm)",
    "recovery_action": "the driver set a recovery action for the GPU (nvmlEventTypeGpuRecoveryAction)",
}


class DriverEvent(msgspec.Struct, frozen=True):
    """Something the driver reported about one GPU, the moment it happened.

    ``kind`` is ``"xid"`` (``value``: the XID), ``"sxid"`` (an NVSwitch's:
    ``pci`` and ``device`` are the switch's) or a :data:`GPU_EVENTS` name
    (``value``: NVML's event data). ``detail`` is free text: the kernel log's
    words, or the recovery action the driver asks for.
    """

    pci: str
    kind: str
    value: int = 0
    detail: str = ""
    #: The kernel's name of the device when it is not a GPU (``nvswitch0``).
    device: str = ""


def tlimit_threshold(now_c: float | None, margin_c: float | None, relative_c: float | None) -> float | None:
    """A temperature threshold in °C from T.Limit, as newer drivers give Hopper's:
    ``margin_c`` is how far below T.Limit the GPU is now (nvidia-smi's
    ``gpu_temp_tlimit``, ``nvmlDeviceGetMarginTemperature``), ``relative_c`` the
    threshold against T.Limit (``gpu_temp_slow_tlimit_threshold``, NVML field 194:
    -2 is 2 °C past T.Limit). An H200 on 580.159.04: 39 + 48 - (-2) = 89 °C, its
    classic slowdown threshold."""
    if now_c is None or margin_c is None or relative_c is None:
        return None
    return now_c + margin_c - relative_c
