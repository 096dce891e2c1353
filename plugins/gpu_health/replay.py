"""GPU state without GPU hardware: capture replay and scripted scenarios.

The one place where GPU stand-ins live. Both are usable from the CLI
(``vetd check gpu_health --capture FILE.xml`` / ``--scenario FILE.yaml``) and
from the agent config (``[plugins.gpu_health] source = "scenario"``), so an
operator can replay what a test replays, and a demo cluster can show faults.

Scenario format (YAML)::

    gpus: 8                          # GPUs 0..7, healthy H100-like baseline
    driver: "550.54.15"              # 550: no NVML fields 226/227/230; 555+: 226/227; 570+: 230 (default 580)
    driver_ready_at: 3s              # nvmlInit fails (DRIVER_NOT_LOADED) until then
    devices: /tmp/node1-dev          # the simulated /dev: `vetd nvml-sim reset` refuses while NVML is held
    expected_gpus: 8                 # what sysfs would list (default: gpus)
    base: {name: NVIDIA H100 80GB HBM3, temp_c: 28}   # overrides for every GPU
    workload:                        # what the GPUs are busy with (plugins/gpu_health/workload.py)
      - {profile: training}
      - {gpus: [3], profile: training, scale: 0.55}
    timeline:
      - {at: 2s, gpu: 3, set: {ecc_volatile_dram_uncorrectable: 2}}
      - {at: 2s, gpu: 3, xid: 48, message: "DBE (Double Bit Error) ECC Error"}
      - {at: 3s, gpu: 4, event: fatal_poison}   # an NVML event other than an XID
      - {at: 5s, gpu: 5, set: {pcie_width: 8, utilization_pct: 95}}
      - {at: 6s, gpu: 6, nvlink_down: [0]}
      - {at: 8s, gpu: 7, vanish: true}   # fell off the bus
      - {at: 10s, gpu: 2, nvml_error: {nvmlDeviceGetPowerUsage: UNKNOWN}}   # --through-nvml only
      - {at: 0s, gpu: 3, nvml_error: {NVML_FI_DEV_NVLINK_GET_STATE: NOT_SUPPORTED}}   # one field refused
      - {at: 12s, hang: true}            # the driver stops answering
      - {at: 0s, gpu: 1, set: {no_permission: true}}   # counted, but denied to this agent (cgroups)
      - {at: 0s, gpu: 0, set: {mig_enabled: true}}     # no volatile ECC, remapped rows, processes per GPU

``set`` keys are :class:`~vetd.plugins.gpu_health.model.GpuSnapshot` field names
(``workload`` entries apply after ``base`` and before timeline steps; the
energy, PCIe and NVLink counters are integrated from the power and rates in
force at each snapshot);
``event`` names are :data:`~vetd.plugins.gpu_health.model.GPU_EVENTS` keys (a
``recovery_action`` event reports the GPU's ``recovery_action`` of that moment,
so set it in the same step).
With ``--through-nvml`` (``through_nvml = true``) the same state is served
through a simulated ``libnvidia-ml`` (:mod:`vetd.plugins.gpu_health.nvmlsim`), so the
live NVML code path reads it.
Times count from when the source starts (the agent's start); ``vetd check``
evaluates the state at the end of the timeline unless told ``--at``.
"""

from __future__ import annotations

import hashlib
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import msgspec

from vetd.agent.api import Duration, SourceUnavailable, dec_hook
from vetd.plugins.gpu_health.capture import CaptureError, load_capture
from vetd.plugins.gpu_health.model import GPU_EVENTS, DriverEvent, GpuSnapshot, NodeSnapshot, NvLink
from vetd.plugins.gpu_health.sources import OnEvent
from vetd.plugins.gpu_health.workload import Workload, apply_workloads


class CaptureSource:
    """A fixed ``nvidia-smi -q -x`` capture."""

    def __init__(self, path: str) -> None:
        self.name = f"capture:{path}"
        try:
            self._snapshot = load_capture(path)
        except CaptureError as exc:
            raise SourceUnavailable(str(exc)) from exc

    def snapshot(self) -> NodeSnapshot:
        return self._snapshot

    def expected_gpus(self) -> int | None:
        return None  # a capture cannot say what the node should have: --expect-gpus can

    def watch(self, on_event: OnEvent, stop: threading.Event) -> None:
        raise SourceUnavailable("a capture has no live events")


class Step(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    at: Duration = Duration(0.0)
    gpu: int | None = None
    set: dict[str, Any] = {}
    xid: int | None = None
    #: An NVML event other than an XID (a ``GPU_EVENTS`` name: ``gpu_unavailable``...).
    event: str | None = None
    message: str = ""
    vanish: bool = False
    hang: bool = False
    #: NVLink links of ``gpu`` to mark down.
    nvlink_down: list[int] = []
    #: Through the simulated NVML only (``--through-nvml``): these functions of
    #: ``gpu`` now fail with this error (``UNKNOWN``, ``GPU_IS_LOST``,
    #: ``RESET_REQUIRED``...), or these fields (pynvml's ``NVML_FI_...`` names)
    #: answer it in ``nvmlDeviceGetFieldValues``; ``{}`` ends earlier ones.
    nvml_error: dict[str, str] | None = None


class Scenario(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    gpus: int = 8
    #: The driver's version decides which NVML fields exist (:func:`driver_fields`).
    driver: str = "580.95.05"
    cuda: str = "13.0"
    expected_gpus: int | None = None
    #: The driver loads this long after the source starts: until then nvmlInit
    #: answers DRIVER_NOT_LOADED (and a direct scenario has no state).
    driver_ready_at: Duration | None = None
    #: The folder standing for ``/dev`` (``nvidiaN``, locked while NVML is held;
    #: ``vetd nvml-sim reset`` refuses then). Default: one per scenario file in the temp folder.
    devices: str = ""
    base: dict[str, Any] = {}
    #: What the GPUs are busy with over time (:mod:`~vetd.plugins.gpu_health.workload`).
    workload: list[Workload] = []
    timeline: list[Step] = []


def healthy_gpu(index: int) -> GpuSnapshot:
    """A healthy, idle, H100-SXM-like GPU."""
    return GpuSnapshot(
        index=index,
        uuid=f"GPU-5ce0a1e0-0000-4000-8000-{index:012d}",
        pci_bus_id=f"00000000:{0x18 + 0x10 * index:02X}:00.0",
        name="NVIDIA H100 80GB HBM3",
        serial=f"165232300{index:04d}",
        ecc_enabled=True,
        ecc_volatile_sram_correctable=0, ecc_volatile_sram_uncorrectable=0,
        ecc_volatile_dram_correctable=0, ecc_volatile_dram_uncorrectable=0,
        ecc_aggregate_sram_correctable=0, ecc_aggregate_sram_uncorrectable=0,
        ecc_aggregate_dram_correctable=0, ecc_aggregate_dram_uncorrectable=0,
        remapped_rows_correctable=0, remapped_rows_uncorrectable=0,
        remapped_rows_pending=False, remapped_rows_failure=False,
        reset_required=False, drain_and_reset_recommended=False, recovery_action="None",
        clock_reasons=["gpu_idle"], clock_sm_mhz=345.0, clock_memory_mhz=2619.0, clock_sm_max_mhz=1980.0,
        pcie_gen=5, pcie_gen_max=5, pcie_width=16, pcie_width_max=16, pcie_replay_counter=0,
        nvlinks=[NvLink(link=i, up=True, replay_errors=0, recovery_errors=0, crc_errors=0) for i in range(18)],
        temp_c=28.0, temp_memory_c=30.0, temp_slowdown_c=87.0, temp_shutdown_c=92.0,
        power_w=70.0, power_limit_w=700.0,
        memory_used_mib=0.0, memory_total_mib=81559.0, utilization_pct=0.0,
        persistence_mode=True, processes=[], mig_enabled=False,
        utilization_memory_pct=0.0, pcie_tx_mib_s=0.0, pcie_rx_mib_s=0.0, nvlink_tx_mib_s=0.0, nvlink_rx_mib_s=0.0,
        gpm_supported=True, sm_active_pct=0.0, sm_occupancy_pct=0.0, tensor_active_pct=0.0, dram_active_pct=0.0,
        fp64_active_pct=0.0, fp32_active_pct=0.0, fp16_active_pct=0.0,
    )


class ScenarioError(ValueError):
    pass


def load_scenario(path: str) -> Scenario:
    try:
        import yaml
    except ImportError as exc:  # the agent's base install has no YAML parser
        raise ScenarioError("scenarios need PyYAML: pip install 'vetd[gpu]'") from exc
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read scenario: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{path}: invalid YAML: {exc}") from exc
    try:
        scenario = msgspec.convert(data or {}, Scenario, dec_hook=dec_hook)
    except msgspec.ValidationError as exc:
        raise ScenarioError(f"{path}: {exc}") from exc
    fields = set(GpuSnapshot.__struct_fields__)
    for n, step in enumerate(scenario.timeline):
        unknown = set(step.set) - fields
        if unknown:
            raise ScenarioError(f"{path}: timeline[{n}].set: unknown GPU field(s) {', '.join(sorted(unknown))}")
        if (step.set or step.xid is not None or step.event is not None or step.vanish or step.nvlink_down
                or step.nvml_error is not None) and step.gpu is None:
            raise ScenarioError(f"{path}: timeline[{n}]: `gpu` is required with set, xid, event, vanish, "
                                "nvlink_down or nvml_error")
        if step.event is not None and step.event not in GPU_EVENTS:
            raise ScenarioError(f"{path}: timeline[{n}].event: unknown GPU event {step.event!r} "
                                f"(known: {', '.join(GPU_EVENTS)})")
        from vetd.plugins.gpu_health.nvmlsim import ERRORS

        bad = set((step.nvml_error or {}).values()) - set(ERRORS)
        if bad:
            raise ScenarioError(f"{path}: timeline[{n}].nvml_error: unknown NVML error(s) {', '.join(sorted(bad))} "
                                f"(known: {', '.join(ERRORS)})")
    unknown = set(scenario.base) - fields
    if unknown:
        raise ScenarioError(f"{path}: base: unknown GPU field(s) {', '.join(sorted(unknown))}")
    for n, workload in enumerate(scenario.workload):
        unknown = set(workload.set) - fields
        if unknown:
            raise ScenarioError(f"{path}: workload[{n}].set: unknown GPU field(s) {', '.join(sorted(unknown))}")
        if workload.period is not None and not (workload.period > 0 and 0.0 <= workload.duty <= 1.0):
            raise ScenarioError(f"{path}: workload[{n}]: period must be more than 0 and duty from 0 to 1")
    return scenario


class ScenarioSource:
    """GPUs whose state follows a scripted timeline."""

    def __init__(self, path: str, at: float | None = None) -> None:
        self.name = f"scenario:{path}"
        self.path = Path(path)
        try:
            self.scenario = load_scenario(path)
        except ScenarioError as exc:
            raise SourceUnavailable(str(exc)) from exc
        self.started = time.monotonic()
        self.started_wall = time.time()
        #: Fixed scenario time (``vetd check``); None: the live clock.
        self.at = at
        self._hung = threading.Event()
        #: The driver's counters (energy, PCIe and NVLink bytes) per GPU, integrated up to ``_counted``.
        self._counters: dict[int, dict[str, float]] = {}
        self._counted = 0.0
        self._counting = threading.Lock()

    def elapsed(self) -> float:
        return self.at if self.at is not None else time.monotonic() - self.started

    def driver_ready(self) -> bool:
        ready = self.scenario.driver_ready_at
        return ready is None or self.elapsed() >= ready

    def devices(self) -> Path:
        """The simulated ``/dev`` of this scenario's node (:func:`~vetd.plugins.gpu_health.nvmlsim.reset_stand_in`)."""
        if self.scenario.devices:
            return Path(self.scenario.devices)
        key = hashlib.sha256(str(self.path.resolve()).encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / "vetd-nvmlsim" / key

    def snapshot(self) -> NodeSnapshot:
        now = self.elapsed()
        if not self.driver_ready():
            raise SourceUnavailable("the GPU driver has not loaded yet (scenario driver_ready_at)")
        steps = [step for step in self.scenario.timeline if step.at <= now]
        if any(step.hang for step in steps):
            self._hung.wait()  # never set: the driver is gone
        gpus: dict[int, GpuSnapshot] = {}
        for index in range(self.scenario.gpus):
            gpus[index] = _apply(healthy_gpu(index), self.scenario.base)
            if self.scenario.workload and (busy := apply_workloads(self.scenario.workload, index, now)):
                gpus[index] = _apply(gpus[index], busy)
        for step in steps:
            if step.gpu is None or step.gpu not in gpus:
                continue
            if step.vanish:
                del gpus[step.gpu]
                continue
            if step.set:
                gpus[step.gpu] = _apply(gpus[step.gpu], step.set)
            if step.nvlink_down and gpus[step.gpu].nvlinks:
                links = [msgspec.structs.replace(link, up=False) if link.link in step.nvlink_down else link
                         for link in gpus[step.gpu].nvlinks or []]
                gpus[step.gpu] = msgspec.structs.replace(gpus[step.gpu], nvlinks=links)
        counters = self._count(gpus, now)
        for index, gpu in gpus.items():
            if gpu.no_permission:  # nothing about it can be read, as through NVML
                gpus[index] = GpuSnapshot(index=index, no_permission=True)
            else:
                gpus[index] = driver_fields(self.scenario.driver, _apply(gpu, counters.get(index, {})))
        return NodeSnapshot(
            source=self.name,
            taken=self.started_wall + now,
            gpus=list(gpus.values()),
            driver_version=self.scenario.driver,
            cuda_version=self.scenario.cuda,
            attached_gpus=len(gpus),
        )

    def _count(self, gpus: dict[int, GpuSnapshot], now: float) -> dict[int, dict[str, Any]]:
        """The driver's counters at ``now``: each grows by the power and rates in force now times the
        time since the last snapshot (a scenario time that moves back starts them again from 0)."""
        with self._counting:
            if now < self._counted:
                self._counters, self._counted = {}, 0.0
            elapsed, self._counted = now - self._counted, now
            values: dict[int, dict[str, Any]] = {}
            for index, gpu in gpus.items():
                held = self._counters.setdefault(index, dict.fromkeys(_COUNTERS, 0.0))
                for counter, (rate, scale) in _COUNTERS.items():
                    per_second = getattr(gpu, rate)
                    if per_second is not None:
                        held[counter] += per_second * scale * elapsed
                values[index] = {counter: (value if counter == "energy_mj" else int(value))
                                 for counter, value in held.items() if getattr(gpu, _COUNTERS[counter][0]) is not None}
            return values

    def slots(self) -> dict[int, str]:
        """Every GPU of the scenario, index → PCI bus id, vanished ones included."""
        return {i: _apply(healthy_gpu(i), self.scenario.base).pci_bus_id for i in range(self.scenario.gpus)}

    def nvml_errors(self) -> dict[int, dict[str, str]]:
        """GPU index → {NVML function: error name} in force now."""
        errors: dict[int, dict[str, str]] = {}
        elapsed = self.elapsed()
        for step in self.scenario.timeline:
            if step.at <= elapsed and step.gpu is not None and step.nvml_error is not None:
                errors[step.gpu] = {**errors.get(step.gpu, {}), **step.nvml_error} if step.nvml_error else {}
        return errors

    def expected_gpus(self) -> int | None:
        return self.scenario.expected_gpus if self.scenario.expected_gpus is not None else self.scenario.gpus

    def watch(self, on_event: OnEvent, stop: threading.Event) -> None:
        """Report the timeline's XIDs and other GPU events when their time comes."""
        pci = self.slots()
        for step in sorted(self.scenario.timeline, key=lambda s: s.at):
            if (step.xid is None and step.event is None) or step.gpu is None:
                continue
            if stop.wait(max(0.0, step.at - self.elapsed())):
                return
            bus = pci.get(step.gpu, f"gpu{step.gpu}")
            if step.xid is not None:
                on_event(DriverEvent(bus, "xid", step.xid, step.message))
            if step.event == "recovery_action":
                on_event(DriverEvent(bus, step.event, 0, self._recovery_action(step.gpu)))
            elif step.event is not None:
                on_event(DriverEvent(bus, step.event, 0, step.message))
        stop.wait()

    def _recovery_action(self, index: int) -> str:
        """A recovery-action event names the action the GPU has now, as the NVML source reads it."""
        gpu = next((g for g in self.snapshot().gpus if g.index == index), None)
        return (gpu.recovery_action if gpu else None) or "unreadable: not supported"


#: Driver counter → (the rate it grows by, units of counter per unit of rate per second).
_COUNTERS = {
    "energy_mj": ("power_w", 1000.0),
    "pcie_tx_bytes": ("pcie_tx_mib_s", 2.0**20),
    "pcie_rx_bytes": ("pcie_rx_mib_s", 2.0**20),
    "nvlink_tx_kib": ("nvlink_tx_mib_s", 1024.0),
    "nvlink_rx_kib": ("nvlink_rx_mib_s", 1024.0),
}

#: Per device handle under MIG, NVML answers NOT_SUPPORTED for these.
MIG_UNREPORTED = ("ecc_volatile_sram_correctable", "ecc_volatile_sram_uncorrectable",
                  "ecc_volatile_dram_correctable", "ecc_volatile_dram_uncorrectable",
                  "ecc_volatile_correctable_total", "ecc_volatile_uncorrectable_total",
                  "remapped_rows_correctable", "remapped_rows_uncorrectable", "remapped_rows_pending",
                  "remapped_rows_failure", "processes")


def driver_fields(version: str, gpu: GpuSnapshot) -> GpuSnapshot:
    """What a GPU reports under this driver (the scenario's ``driver``) and MIG mode.

    * before 555 (550): no reset-status fields (226/227) and no recovery action (230);
    * 555 to 569: 226/227, no 230;
    * 570 and later: 230 as well (226/227 deprecated but still answered, as
      580.159.04 on an H200 did); a GPU with nothing to recover from says ``None``.
    * MIG on: :data:`MIG_UNREPORTED` are not reported per device handle.
    """
    major = int(version.split(".")[0]) if version.split(".")[0].isdigit() else 0
    changes: dict[str, Any] = {}
    if major < 555:
        changes |= {"reset_required": None, "drain_and_reset_recommended": None, "recovery_action": None}
    elif major < 570:
        changes["recovery_action"] = None
    elif gpu.recovery_action is None:
        changes["recovery_action"] = "None"
    if gpu.mig_enabled:
        changes |= dict.fromkeys(MIG_UNREPORTED)
    return msgspec.structs.replace(gpu, **changes) if changes else gpu


def _apply(gpu: GpuSnapshot, changes: dict[str, Any]) -> GpuSnapshot:
    merged = {**msgspec.structs.asdict(gpu), **changes}
    return msgspec.convert(merged, GpuSnapshot, from_attributes=True)
