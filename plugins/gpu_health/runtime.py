"""The GPU plugin's working parts: one config's source, driver guard and evaluator (:class:`GpuRuntime`)."""


from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import structlog

from vetd.agent.api import (
    Backoff,
    EventOutcome,
    Outcome,
    SourceUnavailable,
    current_job_gpus,
    current_profile,
)
from vetd.plugins.gpu_health.catalog import Verdict
from vetd.plugins.gpu_health.config import GpuHealthConfig
from vetd.plugins.gpu_health.evaluate import RECOVERY_FAIL, Evaluator
from vetd.plugins.gpu_health.model import GPU_EVENTS, DriverEvent, NodeSnapshot
from vetd.plugins.gpu_health.sources import DriverUnresponsive, Guard, OnEvent, Source, nvidia_gpus_in_sysfs
from vetd.plugins.gpu_health.xid import Deduper, follow_kmsg, normalize_pci

if TYPE_CHECKING:
    from vetd.agent.api import Emit

log = structlog.get_logger("vetd.gpu")

HEALTH_PROFILES = frozenset({"prolog", "periodic", "full"})
IDLE_PROFILES = frozenset({"prolog"})
#: Profiles run around one job: per-GPU verdicts judge the job's GPUs only.
JOB_PROFILES = frozenset({"prolog", "epilog"})
KMSG_PATH = "/dev/kmsg"
#: Where Slurm (prolog) and CUDA name a job's GPUs, by index or UUID; the first one set wins.
JOB_GPU_VARIABLES = ("SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES")


def job_gpus(environ: Mapping[str, str] | None = None) -> frozenset[str] | None:
    """The GPUs this job was given (``"0,3"``, ``"GPU-5ce0…"``), or None when nothing names them
    (the agent's own runs, an exclusive node): then every GPU is judged. A prolog that asks the
    agent names them in its request (``current_job_gpus``); ``vetd check`` in a prolog has them
    in its environment."""
    asked = current_job_gpus()
    if asked is not None:
        return frozenset(part.strip() for part in asked.split(",") if part.strip())
    environ = os.environ if environ is None else environ
    for name in JOB_GPU_VARIABLES:
        value = environ.get(name)
        if value is not None:
            return frozenset(part.strip() for part in value.split(",") if part.strip())
    return None


def event_codes(first: str, verdict: Verdict) -> list[str]:
    """``xid_79``, ``resolution_restart_bm``, ``robust_channel_gpu_has_fallen_off_the_bus``: what rules key on."""
    codes = [first, f"resolution_{verdict.resolution.lower()}"]
    return [*codes, verdict.mnemonic.lower()] if verdict.mnemonic else codes


def make_source(config: GpuHealthConfig, stand_in: Source | None = None) -> Source:
    """The configured source; raises ``SourceUnavailable`` when it cannot be had.

    ``stand_in``: the capture or scenario made on an earlier try, already
    served by the simulated library (``through_nvml``): opening NVML again
    after a late driver must not start the scenario's clock again.
    """
    replayed = stand_in or (simulate(config) if config.through_nvml else _replay_source(config))
    if replayed is None:
        from vetd.plugins.gpu_health.nvml import NvmlSource

        return NvmlSource()
    if not config.through_nvml:
        return replayed
    from vetd.plugins.gpu_health.nvml import NvmlSource

    return NvmlSource(expected=replayed.expected_gpus, name=f"nvml({replayed.name})", process_names=False)


def simulate(config: GpuHealthConfig) -> Source | None:
    """The configured capture or scenario, served from now on by the simulated libnvidia-ml."""
    replayed = _replay_source(config)
    if replayed is not None:
        from vetd.plugins.gpu_health.nvmlsim import SimulatedNvml, install

        install(SimulatedNvml.of(replayed))
    return replayed


def _replay_source(config: GpuHealthConfig) -> Source | None:
    if config.source == "capture":
        from vetd.plugins.gpu_health.replay import CaptureSource

        if not config.capture:
            raise SourceUnavailable("source = \"capture\" needs `capture` (a file path)")
        return CaptureSource(config.capture)
    if config.source == "scenario":
        from vetd.plugins.gpu_health.replay import ScenarioSource

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
        self._stand_in: Source | None = None
        #: Opening the source (``nvmlInit``) runs under the deadline too: it hangs as readily as a query.
        self._guard = Guard(self._take, float(config.driver_timeout))
        #: PCI bus id → entity, from every snapshot so far: a GPU that just fell
        #: off the bus is still named by what it was.
        self._entities: dict[str, str] = {}

    def source(self) -> Source:
        """The source, created on first use and retried while unavailable (a driver loading late)."""
        with self._lock:
            if self._source is None:
                if self.config.through_nvml and self._stand_in is None:
                    self._stand_in = simulate(self.config)
                self._source = make_source(self.config, self._stand_in)
            return self._source

    @asynccontextmanager
    async def nvml_released(self) -> AsyncIterator[str]:
        """NVML let go for the duration of a GPU reset (the driver refuses one while
        any client holds the GPU); a no-op for a capture, a scenario or an NVML never opened."""
        from vetd.plugins.gpu_health.nvml import NvmlSource

        source = self._source
        if not isinstance(source, NvmlSource):
            yield "NVML not open"
            return
        hold = source.released()
        note = await asyncio.to_thread(hold.__enter__)
        try:
            yield note
        finally:
            await asyncio.to_thread(hold.__exit__, None, None, None)
            with self._evaluating:
                self.evaluator.forget()  # a reset zeroes counters and retrains links

    def _take(self) -> NodeSnapshot:
        return self.source().snapshot()

    def snapshot(self) -> NodeSnapshot | Outcome:
        """A snapshot, or the node-level outcome that says why there is none."""
        from vetd.plugins.gpu_health.nvml import NvmlReleased

        try:
            snapshot = self._guard.snapshot()
        except NvmlReleased as exc:
            return Outcome(status="skip", codes=["gpu_reset_in_progress"], message=str(exc))
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
        # Around a job, its GPUs only: another job's busy GPU on a shared node is not this job's fault.
        only = job_gpus() if current_profile() in JOB_PROFILES else None
        with self._evaluating:
            return self.evaluator.health(snapshot, expected, only)

    def idle(self) -> list[Outcome]:
        snapshot = self.snapshot()
        if isinstance(snapshot, Outcome):
            return [snapshot]
        # After a job (epilog) a GPU is still warm from it: its temperature says nothing then.
        return (self.evaluator.idle(snapshot, job_gpus(), after_job=current_profile() == "epilog")
                or [Outcome(status="skip", message="no GPUs")])

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
            verdict = self.config.xid_verdict(event.value, event.detail)
            return EventOutcome(
                name="xid",
                severity=verdict.severity,
                entity=entity,
                codes=event_codes(f"xid_{event.value}", verdict),
                metrics={"xid": float(event.value)},
                message=f"Xid {event.value} on {entity} ({event.pci}): {event.detail or 'no detail'} "
                        f"({verdict.mnemonic or 'not in the catalog'}: {verdict.meaning}; "
                        f"NVIDIA: {verdict.resolution}) [{origin}]",
            )
        if event.kind == "sxid":
            verdict = self.config.sxid_verdict(event.value, event.detail)
            device = event.device or f"nvswitch:{normalize_pci(event.pci)}"
            return EventOutcome(
                name="sxid",
                severity=verdict.severity,
                entity=device,
                codes=event_codes(f"sxid_{event.value}", verdict),
                metrics={"sxid": float(event.value)},
                message=f"SXid {event.value} on {device} ({event.pci}): {event.detail or 'no detail'} [{origin}]",
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
        """Watch the driver's events; a driver not loaded yet (nvmlInit failing at
        agent start) is waited for with back-off, not given up on."""
        from vetd.plugins.gpu_health.nvml import DriverNotReady

        backoff = Backoff(base=0.5, cap=30.0)
        while not stop.is_set():
            try:
                source = self.source()
            except DriverNotReady as exc:
                delay = backoff.next()
                log.warning("gpu_driver_not_ready", error=str(exc), retry_in_s=round(delay, 2))
                if stop.wait(delay):
                    return
                continue
            source.watch(self._event_reporter(emit, source.name), stop)
            return

    def watch_kmsg(self, emit: Emit, stop: threading.Event) -> None:
        if self.config.source != "nvml":
            raise SourceUnavailable("kernel log is read only for live GPUs")
        if nvidia_gpus_in_sysfs() == 0:
            raise SourceUnavailable("no NVIDIA GPU on this node")
        follow_kmsg(self._event_reporter(emit, "kmsg"), stop, KMSG_PATH, float(self.config.kmsg_lookback))


