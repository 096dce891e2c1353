"""``gpu_health``: NVIDIA GPU health checks, XID events and GPU telemetry.

Checks:

* ``gpu_health`` (profiles ``prolog``, ``periodic``, ``full``): one result for
  the node (GPU count against the expected count, driver version as metrics)
  and one per GPU (``gpu0``…): ECC, retired pages / row remapping, the driver's
  reset-required / drain-and-reset / recovery-action verdicts, clock slowdown
  reasons, temperature margin, PCIe link and replays, NVLink state and
  errors, persistence mode.
* ``gpu_idle`` (profile ``prolog``): before a job, every GPU is cool, its
  memory is free and no compute process is left on it (CSCS vetnode's limits).

Event sources ``gpu_xid`` (NVML event set) and ``gpu_kmsg`` (``NVRM: Xid``
lines in ``/dev/kmsg``) publish an ``xid`` event the moment an XID happens,
with a severity from ``xid_critical`` / ``xid_warning``; the same XID from both
is reported once. The NVML event set also delivers the other health events a
GPU supports (GPU unavailable, poison, row-remap failure, recovery action...),
published as ``gpu_event`` with a severity from ``event_severity``. A warning
or critical event runs ``gpu_health`` at once.

State comes from NVML (``source = "nvml"``), an ``nvidia-smi -q -x`` capture
(``source = "capture"``) or a scenario (``source = "scenario"``); see
:mod:`vetd.plugins.gpu.replay`. A node without NVIDIA GPUs reports ``skip``
(``not_applicable``) once; a node whose sysfs lists NVIDIA GPUs but whose
driver cannot be reached fails with ``driver_unavailable``.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING

import msgspec
import structlog

from vetd.agent.checks import Check, EventOutcome, EventSource, Outcome, SourceUnavailable, TelemetrySource
from vetd.agent.hookspecs import hookimpl
from vetd.plugins.gpu.config import GpuHealthConfig
from vetd.plugins.gpu.evaluate import RECOVERY_FAIL, Evaluator
from vetd.plugins.gpu.model import GPU_EVENTS, DriverEvent, NodeSnapshot
from vetd.plugins.gpu.sources import DriverUnresponsive, Guard, OnEvent, Source, nvidia_gpus_in_sysfs
from vetd.plugins.gpu.xid import Deduper, follow_kmsg, normalize_pci

if TYPE_CHECKING:
    from vetd.agent.checks import CheckRegistry, Emit, EventSourceRegistry, PluginConfigs, TelemetryRegistry

log = structlog.get_logger("vetd.gpu")

HEALTH_PROFILES = frozenset({"prolog", "periodic", "full"})
IDLE_PROFILES = frozenset({"prolog"})
KMSG_PATH = "/dev/kmsg"


def make_source(config: GpuHealthConfig) -> Source:
    """The configured source; raises ``SourceUnavailable`` when it cannot be had."""
    replayed = _replay_source(config)
    if replayed is None:
        from vetd.plugins.gpu.nvml import NvmlSource

        return NvmlSource()
    if not config.through_nvml:
        return replayed
    from vetd.plugins.gpu.nvml import NvmlSource
    from vetd.plugins.gpu.nvmlsim import SimulatedNvml, install

    install(SimulatedNvml.of(replayed))
    return NvmlSource(expected=replayed.expected_gpus, name=f"nvml({replayed.name})", process_names=False)


def _replay_source(config: GpuHealthConfig) -> Source | None:
    if config.source == "capture":
        from vetd.plugins.gpu.replay import CaptureSource

        if not config.capture:
            raise SourceUnavailable("source = \"capture\" needs `capture` (a file path)")
        return CaptureSource(config.capture)
    if config.source == "scenario":
        from vetd.plugins.gpu.replay import ScenarioSource

        if not config.scenario:
            raise SourceUnavailable("source = \"scenario\" needs `scenario` (a file path)")
        at = None if config.scenario_at is None else float(config.scenario_at)
        return ScenarioSource(config.scenario, at=at)
    return None


class GpuRuntime:
    """One config's source, driver guard and evaluator, shared by checks and watchers."""

    def __init__(self, config: GpuHealthConfig) -> None:
        self.config = config
        self.evaluator = Evaluator(config)
        self.dedupe = Deduper()
        self._lock = threading.Lock()
        self._evaluating = threading.Lock()
        self._source: Source | None = None
        #: Opening the source (``nvmlInit``) runs under the deadline too: it hangs as readily as a query.
        self._guard = Guard(self._take, float(config.driver_timeout))
        #: PCI bus id → entity, from every snapshot so far: a GPU that just fell
        #: off the bus is still named by what it was.
        self._entities: dict[str, str] = {}

    def source(self) -> Source:
        """The source, created on first use and retried while unavailable (a driver loading late)."""
        with self._lock:
            if self._source is None:
                self._source = make_source(self.config)
            return self._source

    def _take(self) -> NodeSnapshot:
        return self.source().snapshot()

    def snapshot(self) -> NodeSnapshot | Outcome:
        """A snapshot, or the node-level outcome that says why there is none."""
        try:
            snapshot = self._guard.snapshot()
        except DriverUnresponsive as exc:
            return Outcome(status="fail", codes=["driver_unresponsive"], message=str(exc))
        except SourceUnavailable as exc:
            if self.config.source == "nvml" and (present := nvidia_gpus_in_sysfs()) > 0:
                return Outcome(status="fail", codes=["driver_unavailable"],
                               metrics={"gpus_in_sysfs": float(present)},
                               message=f"{present} NVIDIA GPUs on the PCI bus but no driver answers: {exc}")
            if self.config.source == "nvml":
                return Outcome(status="skip", codes=["not_applicable"],
                               message=f"no NVIDIA GPU on this node ({exc})")
            return Outcome(status="error", codes=["source_unavailable"], message=str(exc))
        self._entities.update({normalize_pci(gpu.pci_bus_id): gpu.entity for gpu in snapshot.gpus})
        return snapshot

    def expected(self) -> int | None:
        if self.config.expected_gpus >= 0:
            return self.config.expected_gpus
        return self.source().expected_gpus() if self._source is not None else None

    def health(self) -> list[Outcome]:
        snapshot = self.snapshot()
        if isinstance(snapshot, Outcome):
            return [snapshot]
        expected = self.expected()
        with self._evaluating:
            return self.evaluator.health(snapshot, expected)

    def idle(self) -> list[Outcome]:
        snapshot = self.snapshot()
        if isinstance(snapshot, Outcome):
            return [snapshot]
        return self.evaluator.idle(snapshot) or [Outcome(status="skip", message="no GPUs")]

    def telemetry(self) -> Mapping[str, Mapping[str, float]]:
        snapshot = self.snapshot()
        if isinstance(snapshot, Outcome):
            return {}
        sample = {}
        for gpu in snapshot.gpus:
            values = {"temp_c": gpu.temp_c, "power_w": gpu.power_w, "utilization_pct": gpu.utilization_pct,
                      "memory_used_mib": gpu.memory_used_mib, "clock_sm_mhz": gpu.clock_sm_mhz,
                      "clock_memory_mhz": gpu.clock_memory_mhz}
            sample[gpu.entity] = {k: float(v) for k, v in values.items() if v is not None}
        return sample

    # -- XID and other driver events ----------------------------------------

    def _event_reporter(self, emit: Emit, origin: str) -> OnEvent:
        def report(event: DriverEvent) -> None:
            if not self.dedupe.first(event):
                return
            emit(self._event_outcome(event, origin))
        return report

    def _event_outcome(self, event: DriverEvent, origin: str) -> EventOutcome:
        entity = self._entity_of(event.pci)
        if event.kind == "xid":
            return EventOutcome(
                name="xid",
                severity=self.config.xid_severity(event.value),
                entity=entity,
                codes=[f"xid_{event.value}"],
                metrics={"xid": float(event.value)},
                message=f"Xid {event.value} on {entity} ({event.pci}): {event.detail or 'no detail'} [{origin}]",
            )
        codes = [event.kind]
        if event.kind == "recovery_action" and (same := RECOVERY_FAIL.get(event.detail.lower())):
            codes.append(same)  # the code gpu_health gives the same action: one rule serves both
        detail = f": {event.detail}" if event.detail else ""
        return EventOutcome(
            name="gpu_event",
            severity=self.config.event_severity_of(event.kind, event.detail),
            entity=entity,
            codes=codes,
            metrics={"event_data": float(event.value)},
            message=f"{GPU_EVENTS.get(event.kind, event.kind)} on {entity} ({event.pci}){detail} [{origin}]",
        )

    def _entity_of(self, pci: str) -> str:
        """``gpuN`` as last seen (no driver call: it may be the thing that hangs)."""
        key = normalize_pci(pci)
        return self._entities.get(key, f"pci:{key}")

    def watch_driver(self, emit: Emit, stop: threading.Event) -> None:
        self.source().watch(self._event_reporter(emit, self.source().name), stop)

    def watch_kmsg(self, emit: Emit, stop: threading.Event) -> None:
        if self.config.source != "nvml":
            raise SourceUnavailable("kernel log is read only for live GPUs")
        if nvidia_gpus_in_sysfs() == 0:
            raise SourceUnavailable("no NVIDIA GPU on this node")
        follow_kmsg(self._event_reporter(emit, "kmsg"), stop, KMSG_PATH, float(self.config.kmsg_lookback))


_runtimes: weakref.WeakKeyDictionary[PluginConfigs, GpuRuntime] = weakref.WeakKeyDictionary()


def runtime_for(configs: PluginConfigs) -> GpuRuntime:
    """The runtime of one config load, shared by this plugin's hooks."""
    runtime = _runtimes.get(configs)
    if runtime is None:
        runtime = _runtimes[configs] = GpuRuntime(configs.typed("gpu_health", GpuHealthConfig))
    return runtime


@hookimpl
def vetd_config_tables() -> Mapping[str, type[msgspec.Struct]]:
    return {"gpu_health": GpuHealthConfig}


@hookimpl
def vetd_register_checks(registry: CheckRegistry, configs: PluginConfigs) -> None:
    runtime = runtime_for(configs)
    timeout = float(runtime.config.check_timeout)
    registry.add(Check("gpu_health", runtime.health, timeout, profiles=HEALTH_PROFILES,
                       description="ECC, memory, reset flags, clocks, PCIe, NVLink, GPU count"))
    registry.add(Check("gpu_idle", runtime.idle, timeout, profiles=IDLE_PROFILES,
                       description="GPUs cool, memory free, no stray processes before a job"))


@hookimpl
def vetd_register_telemetry(registry: TelemetryRegistry, configs: PluginConfigs) -> None:
    runtime = runtime_for(configs)
    if runtime.config.telemetry and (runtime.config.source != "nvml" or nvidia_gpus_in_sysfs() > 0):
        registry.add(TelemetrySource("gpu", runtime.telemetry, timeout=float(runtime.config.driver_timeout)))


@hookimpl
def vetd_register_event_sources(registry: EventSourceRegistry, configs: PluginConfigs) -> None:
    runtime = runtime_for(configs)
    # After a warning or critical event, gpu_health runs at once: which GPU is
    # lost or needs a reset is known seconds after the XID, not an interval later.
    recheck = ("gpu_health",)
    registry.add(EventSource("gpu_xid", runtime.watch_driver, recheck=recheck))  # XIDs and the other NVML events
    if runtime.config.kmsg:
        registry.add(EventSource("gpu_kmsg", runtime.watch_kmsg, recheck=recheck))


@hookimpl
def vetd_command_veto(action: str, args: Mapping[str, str], configs: PluginConfigs) -> str | None:
    """No GPU reset while compute processes are on the GPU (their work would be lost)."""
    if action != "gpu_reset":
        return None
    snapshot = runtime_for(configs).snapshot()
    if isinstance(snapshot, Outcome):
        return None  # the driver cannot tell; nvidia-smi -r refuses a busy GPU itself
    target = args.get("gpu", "all")
    busy = []
    for gpu in snapshot.gpus:
        compute = [p for p in gpu.processes or [] if "C" in p.type]
        if compute and target in ("all", str(gpu.index)):
            names = ", ".join(f"{p.name or '?'} ({p.pid})" for p in compute)
            busy.append(f"{gpu.entity}: {names}")
    return f"compute processes still running on {'; '.join(busy)}" if busy else None


@hookimpl
def vetd_node_labels(configs: PluginConfigs) -> Mapping[str, str]:
    runtime = runtime_for(configs)
    snapshot = runtime.snapshot()
    if isinstance(snapshot, Outcome) or not snapshot.gpus:
        return {}
    return {
        "gpu_model": snapshot.gpus[0].name,
        "gpu_count": str(len(snapshot.gpus)),
        "gpu_driver": snapshot.driver_version or "",
    }
