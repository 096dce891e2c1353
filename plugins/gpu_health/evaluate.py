"""Turn GPU snapshots into check outcomes: facts in, status + codes + metrics out.

Rates (correctable ECC, PCIe replays, NVLink CRC, HW slowdown) and "sustained"
throttling need more than one sample, so :class:`Evaluator` keeps the previous
sample per GPU, when each HW slowdown reason was seen, and which NVLinks were
up. A single sample (``vetd check``, a capture) reports the counters as
metrics and judges only what one sample can show. A new driver (an upgrade or
a reload) restarts that history: counters start again from zero and links
train again.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from vetd.agent.api import Outcome, Status
from vetd.plugins.gpu_health.config import GpuHealthConfig
from vetd.plugins.gpu_health.model import GpuSnapshot, NodeSnapshot

_RANK: dict[Status, int] = {"skip": 0, "pass": 1, "warn": 2, "fail": 3, "error": 4, "timeout": 5}
HW_THROTTLE = ("hw_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown")
SW_THROTTLE = ("sw_thermal_slowdown", "sw_power_cap")
#: Recovery actions NVML/nvidia-smi recommend (driver 550+) that need the GPU out of service.
RECOVERY_FAIL = {"reset": "recovery_reset", "reboot": "recovery_reboot", "system reboot": "recovery_reboot",
                 "bus reset": "recovery_reset", "drain p2p": "recovery_drain_p2p",
                 "drain and reset": "drain_and_reset_recommended", "recover imex domain": "recovery_imex"}


@dataclass(frozen=True)
class Finding:
    status: Status
    code: str
    message: str


def worst(statuses: Iterable[Status]) -> Status:
    return max(statuses, key=lambda s: _RANK[s], default="pass")


def outcome(entity: str, findings: list[Finding], metrics: dict[str, float], ok: str) -> Outcome:
    problems = [f for f in findings if f.status != "pass"]
    return Outcome(
        status=worst(f.status for f in problems) if problems else "pass",
        entity=entity,
        codes=list(dict.fromkeys(f.code for f in problems)),
        metrics=metrics,
        message="; ".join(f.message for f in problems) if problems else ok,
    )


def gpu_metrics(gpu: GpuSnapshot) -> dict[str, float]:
    values = {
        "temp_c": gpu.temp_c,
        "temp_memory_c": gpu.temp_memory_c,
        "power_w": gpu.power_w,
        "power_limit_w": gpu.power_limit_w,
        "memory_used_mib": gpu.memory_used_mib,
        "memory_total_mib": gpu.memory_total_mib,
        "utilization_pct": gpu.utilization_pct,
        "clock_sm_mhz": gpu.clock_sm_mhz,
        "clock_memory_mhz": gpu.clock_memory_mhz,
        "clock_sm_max_mhz": gpu.clock_sm_max_mhz,
        "ecc_volatile_uncorrectable": gpu.volatile_uncorrectable,
        "ecc_volatile_correctable": gpu.volatile_correctable,
        "retired_pages": gpu.retired_pages,
        "remapped_rows_uncorrectable": gpu.remapped_rows_uncorrectable,
        "remapped_rows_correctable": gpu.remapped_rows_correctable,
        "pcie_gen": gpu.pcie_gen,
        "pcie_gen_max": gpu.pcie_gen_max,
        "pcie_width": gpu.pcie_width,
        "pcie_width_max": gpu.pcie_width_max,
        "pcie_replay_counter": gpu.pcie_replay_counter,
    }
    return {key: float(value) for key, value in values.items() if value is not None}


def _at_power_budget(gpu: GpuSnapshot, fraction: float) -> bool:
    """Drawing at least ``fraction`` of the enforced power limit: the SW power cap is then
    the GPU holding its budget under load (an H200 under a GEMM loop: 692 of 700 W),
    not a fault. Capped far below the limit, it is one."""
    if fraction <= 0 or gpu.power_w is None or not gpu.power_limit_w:
        return False
    return gpu.power_w >= fraction * gpu.power_limit_w


def _describe(gpu: GpuSnapshot) -> str:
    return f"{gpu.name or 'GPU'} {gpu.pci_bus_id}".strip()


def lost(gpu: GpuSnapshot) -> Outcome:
    """A GPU the driver lists but cannot reach: nothing else about it can be judged."""
    why = "; ".join(gpu.query_errors) or "GPU is lost"
    return Outcome(status="fail", entity=gpu.entity, codes=["gpu_lost"],
                   message=f"{_describe(gpu)} (index {gpu.index}) fell off the bus or is inaccessible: {why}")


def denied(gpu: GpuSnapshot) -> Outcome:
    """A GPU the driver counts but this agent may not open: not judged, and said so."""
    return Outcome(status="skip", entity=gpu.entity, codes=["no_permission"],
                   message=f"{_describe(gpu)} (index {gpu.index}): the driver lists it but denies this agent "
                           "access (NVML_ERROR_NO_PERMISSION: cgroup or device permissions); not checked")


def ours(gpu: GpuSnapshot, only: Collection[str] | None) -> bool:
    """Whether ``gpu`` is one of ``only`` (indices or UUIDs, as Slurm and CUDA name them); no list: every GPU."""
    return only is None or str(gpu.index) in only or bool(gpu.uuid) and gpu.uuid in only


def not_judged(gpu: GpuSnapshot, only: Collection[str] | None) -> Outcome | None:
    """The outcome of a GPU that is not judged on its readings (another job's, lost, no permission); None otherwise."""
    if not ours(gpu, only):
        return not_this_job(gpu)
    if gpu.lost:
        return lost(gpu)
    if gpu.no_permission:
        return denied(gpu)
    return None


def not_this_job(gpu: GpuSnapshot) -> Outcome:
    return Outcome(status="skip", entity=gpu.entity, codes=["not_this_job"],
                   message=f"{_describe(gpu)} (index {gpu.index}) is not one of this job's GPUs; not judged")


def unchecked(gpu: GpuSnapshot, *, idle: bool = False) -> list[tuple[str, str]]:
    """The checks this GPU's driver gave nothing to run on: (code, what), never a silent pass.

    ``mig_enabled``: MIG mode is on, and NVML answers NOT_SUPPORTED per device
    handle for volatile ECC, remapped rows and processes. ``unsupported:NAME``:
    the driver or GPU does not report what the check reads (driver 550 has no
    reset-status fields 226/227 and no recovery action 230; 570+ deprecates
    226/227 for 230, so either suffices for ``reset_status``).
    """
    found = []
    if gpu.mig_enabled:
        found.append(("mig_enabled", "MIG mode is on"))
    if idle:
        if gpu.processes is None:
            found.append(("unsupported:processes", "stray processes (no process list)"))
        return found
    if gpu.mig_enabled and gpu.volatile_uncorrectable is None:
        found.append(("unsupported:ecc_volatile", "double-bit ECC (no volatile ECC counts)"))
    if gpu.mig_enabled and gpu.remapped_rows_pending is None:
        found.append(("unsupported:row_remap", "row remapping (no remapped rows)"))
    if gpu.recovery_action is None:
        if gpu.reset_required is None and gpu.drain_and_reset_recommended is None:
            found.append(("unsupported:reset_status", "the driver's reset verdict (no NVML fields 226/227)"))
        found.append(("unsupported:recovery_action", "the driver's recovery action (no NVML field 230)"))
    if gpu.temp_slowdown_c is None:
        found.append(("unsupported:thermal", "temperature margin (no slowdown threshold)"))
    return found


def with_unchecked(result: Outcome, missing: list[tuple[str, str]]) -> Outcome:
    """``result`` with the checks that could not run named in its codes and message; its status unchanged."""
    if not missing:
        return result
    codes = [*result.codes, *(code for code, _ in missing if code not in result.codes)]
    message = f"{result.message}; not checked: {', '.join(what for code, what in missing if code != 'mig_enabled')}"
    if any(code == "mig_enabled" for code, _ in missing):
        message += " (MIG mode on)"
    return Outcome(status=result.status, entity=result.entity, codes=codes, metrics=result.metrics, message=message)


class Evaluator:
    """Health and idle verdicts, with the history that rates need."""

    def __init__(self, config: GpuHealthConfig) -> None:
        self.config = config
        self._previous: dict[str, tuple[float, GpuSnapshot]] = {}
        self._sw_streak: dict[tuple[str, str], int] = {}
        self._links_up: dict[str, set[int]] = {}
        #: (GPU, HW slowdown reason) → when samples showed it within the window.
        self._hw_seen: dict[tuple[str, str], deque[float]] = {}
        #: (GPU, HW slowdown reason) → the first sample of its current unbroken run.
        self._hw_since: dict[tuple[str, str], float] = {}
        self._driver: str | None = None

    def forget(self) -> None:
        """Drop the history rates and link states are judged against (a new driver, a GPU reset)."""
        self._previous.clear()
        self._sw_streak.clear()
        self._links_up.clear()
        self._hw_seen.clear()
        self._hw_since.clear()

    def _driver_changed(self, snapshot: NodeSnapshot) -> Finding | None:
        """A driver version other than the last sample's: a reload or upgrade. Not a fault:
        said once, and the history of the old driver's counters and links is dropped."""
        before, self._driver = self._driver, snapshot.driver_version or self._driver
        if before is None or not snapshot.driver_version or snapshot.driver_version == before:
            return None
        self.forget()
        return Finding("warn", "driver_changed",
                       f"GPU driver changed from {before} to {snapshot.driver_version} since the last sample "
                       "(reloaded or upgraded): rates and NVLink history start again")

    # -- node level --------------------------------------------------------

    def count(self, snapshot: NodeSnapshot, expected: int | None, reload: Finding | None = None) -> Outcome:
        listed = len(snapshot.gpus)
        denied_count = sum(gpu.no_permission for gpu in snapshot.gpus)
        found = sum(not gpu.lost and not gpu.no_permission for gpu in snapshot.gpus)
        metrics: dict[str, float] = {"gpus_found": float(found)}
        if found + denied_count != listed:
            metrics["gpus_lost"] = float(listed - found - denied_count)
        if denied_count:
            metrics["gpus_no_permission"] = float(denied_count)
        findings: list[Finding] = [reload] if reload else []
        if expected is not None and expected >= 0:
            metrics["gpus_expected"] = float(expected)
            # A GPU this agent may not open is present (the driver counts it), only not ours to use.
            if found + denied_count < expected:
                findings.append(Finding("fail", "gpu_missing",
                                        f"{found} of {expected} expected GPUs usable through the driver"))
            elif found > expected:
                findings.append(Finding("warn", "gpu_count_mismatch",
                                        f"{found} GPUs visible, {expected} expected"))
        if snapshot.attached_gpus is not None and snapshot.attached_gpus != listed:
            findings.append(Finding("warn", "gpu_list_incomplete",
                                    f"driver reports {snapshot.attached_gpus} GPUs attached, {listed} listed"))
        if snapshot.driver_version:
            parts = snapshot.driver_version.split(".")
            for name, part in zip(("driver_major", "driver_minor", "driver_patch"), parts, strict=False):
                if part.isdigit():
                    metrics[name] = float(part)
        driver = f"driver {snapshot.driver_version}" if snapshot.driver_version else "driver unknown"
        others = f" (and {denied_count} this agent may not open)" if denied_count else ""
        return outcome("node", findings, metrics, f"{found} GPUs{others}, {driver}")

    # -- per GPU health ----------------------------------------------------

    def health(self, snapshot: NodeSnapshot, expected: int | None,
               only: Collection[str] | None = None) -> list[Outcome]:
        """The node's outcome and one per GPU; with ``only`` (the job's GPUs, by index or
        UUID), the other GPUs are ``skip`` with ``not_this_job``."""
        outcomes = [self.count(snapshot, expected, self._driver_changed(snapshot))]
        for gpu in snapshot.gpus:
            if (unjudged := not_judged(gpu, only)) is not None:
                outcomes.append(unjudged)
                continue
            key = gpu.uuid or gpu.pci_bus_id or gpu.entity
            previous = self._previous.get(key)
            findings = [
                *self._queries(gpu),
                *self._ecc(gpu, previous, snapshot.taken),
                *self._memory(gpu),
                *self._reset(gpu),
                *self._clocks(gpu, key, snapshot.taken),
                *self._thermal(gpu),
                *self._pcie(gpu, previous, snapshot.taken),
                *self._nvlink(gpu, key, previous, snapshot.taken),
                *self._persistence(gpu),
            ]
            self._previous[key] = (snapshot.taken, gpu)
            outcomes.append(with_unchecked(outcome(gpu.entity, findings, gpu_metrics(gpu), f"{_describe(gpu)} healthy"),
                                           unchecked(gpu)))
        return outcomes

    def _queries(self, gpu: GpuSnapshot) -> list[Finding]:
        if not gpu.query_errors:
            return []
        shown = "; ".join(gpu.query_errors[:3]) + (" ..." if len(gpu.query_errors) > 3 else "")
        return [Finding("warn", "driver_query_failed",
                        f"{len(gpu.query_errors)} driver queries failed: {shown}")]

    def _ecc(self, gpu: GpuSnapshot, previous: tuple[float, GpuSnapshot] | None, now: float) -> list[Finding]:
        findings = []
        if gpu.ecc_enabled is False and self.config.ecc_disabled_status != "pass":
            findings.append(Finding(self.config.ecc_disabled_status, "ecc_disabled", "ECC is disabled"))
        dbe = gpu.volatile_uncorrectable
        if dbe:
            findings.append(Finding("fail", "ecc_dbe", f"{dbe} volatile uncorrectable ECC errors"))
        sbe = gpu.volatile_correctable
        if previous is not None and sbe is not None:
            then, before = previous
            earlier = before.volatile_correctable
            hours = (now - then) / 3600
            if earlier is not None and hours > 0 and sbe >= earlier:
                rate = (sbe - earlier) / hours
                if rate >= self.config.correctable_warn_per_hour:
                    findings.append(Finding("warn", "ecc_sbe_rate",
                                            f"correctable ECC errors at {rate:.0f}/h"))
        return findings

    def _memory(self, gpu: GpuSnapshot) -> list[Finding]:
        findings = []
        if gpu.retired_pages_pending:
            findings.append(Finding("warn", "retired_pages_pending", "page retirement pending (reset to apply)"))
        retired = gpu.retired_pages
        if retired is not None and retired >= self.config.retired_pages_fail:
            findings.append(Finding("fail", "retired_pages_limit",
                                    f"{retired} retired pages (limit {self.config.retired_pages_fail})"))
        if gpu.remapped_rows_failure:
            findings.append(Finding("fail", "row_remap_failure", "row remapping failed"))
        if gpu.remapped_rows_pending:
            # NVIDIA: new work can start; the remap is applied at the next reset (XID 63 is "ignore").
            findings.append(Finding("warn", "row_remap_pending", "row remapping pending (applied at the next GPU reset)"))
        unc = gpu.remapped_rows_uncorrectable
        if unc is not None and unc >= self.config.remapped_uncorrectable_warn:
            findings.append(Finding("warn", "row_remap_high", f"{unc} rows remapped for uncorrectable errors"))
        return findings

    def _reset(self, gpu: GpuSnapshot) -> list[Finding]:
        findings = []
        if gpu.reset_required:
            findings.append(Finding("fail", "reset_required", "driver reports a GPU reset is required"))
        if gpu.drain_and_reset_recommended:
            findings.append(Finding("fail", "drain_and_reset_recommended",
                                    "driver recommends draining and resetting the GPU"))
        action = (gpu.recovery_action or "").lower()
        if action in RECOVERY_FAIL:
            findings.append(Finding("fail", RECOVERY_FAIL[action],
                                    f"driver's recommended recovery action: {gpu.recovery_action}"))
        return findings

    def _clocks(self, gpu: GpuSnapshot, key: str, now: float) -> list[Finding]:
        if gpu.clock_reasons is None:
            return []
        active = set(gpu.clock_reasons)
        findings = [finding for reason in HW_THROTTLE
                    if (finding := self._hw_slowdown(key, reason, reason in active, now)) is not None]
        if "sw_power_cap" in active and _at_power_budget(gpu, self.config.power_cap_at_limit_fraction):
            active.discard("sw_power_cap")  # a busy GPU held at its power limit: working as designed
        for reason in SW_THROTTLE:
            streak = self._sw_streak.get((key, reason), 0) + 1 if reason in active else 0
            self._sw_streak[(key, reason)] = streak
            if streak >= self.config.sw_throttle_sustained_samples:
                findings.append(Finding("warn", reason,
                                        f"clocks held back by {reason.replace('_', ' ')} for {streak} samples"))
        return findings

    def _hw_slowdown(self, key: str, reason: str, active: bool, now: float) -> Finding | None:
        """HW slowdown as a rate of samples over a window (warn), or unbroken for longer (fail)."""
        window, sustained = float(self.config.hw_slowdown_window), float(self.config.hw_slowdown_sustained)
        seen = self._hw_seen.setdefault((key, reason), deque())
        while seen and seen[0] <= now - window:
            seen.popleft()
        what = reason.replace("_", " ")
        if not active:
            self._hw_since.pop((key, reason), None)
            return None
        seen.append(now)
        since = self._hw_since.setdefault((key, reason), now)
        if now - since >= sustained:
            return Finding("fail", reason, f"clocks slowed by {what} in every sample for {(now - since) / 60:.0f} min")
        rate = len(seen) / (window / 60)
        if rate >= self.config.hw_slowdown_warn_per_min:
            return Finding("warn", reason, f"clocks slowed by {what} in {len(seen)} samples in the last "
                                           f"{window / 60:g} min ({rate:.1f}/min)")
        return None

    def _thermal(self, gpu: GpuSnapshot) -> list[Finding]:
        if gpu.temp_c is None or gpu.temp_slowdown_c is None:
            return []
        if gpu.temp_c >= gpu.temp_slowdown_c - self.config.temp_margin_c:
            return [Finding("warn", "temp_high",
                            f"{gpu.temp_c:.0f} °C, slowdown at {gpu.temp_slowdown_c:.0f} °C")]
        return []

    def _pcie(self, gpu: GpuSnapshot, previous: tuple[float, GpuSnapshot] | None, now: float) -> list[Finding]:
        findings = []
        busy = gpu.utilization_pct is not None and gpu.utilization_pct >= self.config.pcie_busy_util_pct
        if busy and gpu.pcie_gen is not None and gpu.pcie_gen_max and gpu.pcie_gen < gpu.pcie_gen_max:
            findings.append(Finding("warn", "pcie_gen_degraded",
                                    f"PCIe gen {gpu.pcie_gen} of {gpu.pcie_gen_max} while {gpu.utilization_pct:.0f}% busy"))
        if busy and gpu.pcie_width is not None and gpu.pcie_width_max and gpu.pcie_width < gpu.pcie_width_max:
            findings.append(Finding("warn", "pcie_width_degraded",
                                    f"PCIe x{gpu.pcie_width} of x{gpu.pcie_width_max} while {gpu.utilization_pct:.0f}% busy"))
        if previous is not None and gpu.pcie_replay_counter is not None:
            then, before = previous
            minutes = (now - then) / 60
            earlier = before.pcie_replay_counter
            lanes = gpu.pcie_width or gpu.pcie_width_max or 16
            allowance = self.config.pcie_replay_per_min_per_lane.get(str(gpu.pcie_gen or gpu.pcie_gen_max or 4))
            if earlier is not None and minutes > 0 and allowance is not None and gpu.pcie_replay_counter >= earlier:
                rate = (gpu.pcie_replay_counter - earlier) / minutes / lanes
                if rate > allowance:
                    findings.append(Finding("warn", "pcie_replay_rate",
                                            f"PCIe replays at {rate:.2f}/min/lane (allowed {allowance})"))
        return findings

    def _nvlink(self, gpu: GpuSnapshot, key: str, previous: tuple[float, GpuSnapshot] | None,
                now: float) -> list[Finding]:
        if gpu.nvlinks is None:
            return []
        findings = []
        seen_up = self._links_up.setdefault(key, set())
        before = {link.link: link for link in (previous[1].nvlinks or [])} if previous else {}
        seconds = now - previous[0] if previous else 0.0
        expected = self.config.nvlink_expected_links
        for link in gpu.nvlinks:
            if link.up:
                seen_up.add(link.link)
            elif link.up is False and (link.link in seen_up or link.link in expected):
                # Down after it was up, or one the site says is wired. A link never up
                # is not wired on this board (its siblings being up says nothing).
                findings.append(Finding("fail", "nvlink_down", f"NVLink {link.link} is down"))
            old = before.get(link.link)
            if old is None:
                continue
            for counter in ("replay_errors", "recovery_errors"):
                now_count, then_count = getattr(link, counter), getattr(old, counter)
                if now_count is not None and then_count is not None and now_count > then_count:
                    findings.append(Finding("fail", f"nvlink_{counter.split('_')[0]}",
                                            f"NVLink {link.link}: {now_count - then_count} new {counter.replace('_', ' ')}"))
            if link.crc_errors is not None and old.crc_errors is not None and seconds > 0:
                rate = (link.crc_errors - old.crc_errors) / seconds
                if rate >= self.config.nvlink_crc_fail_per_s:
                    findings.append(Finding("fail", "nvlink_crc", f"NVLink {link.link}: {rate:.0f} CRC errors/s"))
                elif rate >= self.config.nvlink_crc_warn_per_s:
                    findings.append(Finding("warn", "nvlink_crc", f"NVLink {link.link}: {rate:.1f} CRC errors/s"))
        return findings

    def _persistence(self, gpu: GpuSnapshot) -> list[Finding]:
        if self.config.require_persistence_mode and gpu.persistence_mode is False:
            return [Finding("warn", "persistence_off", "persistence mode is off")]
        return []

    # -- idle vetting (prolog) ---------------------------------------------

    def idle(self, snapshot: NodeSnapshot, only: Collection[str] | None = None, *,
             after_job: bool = False) -> list[Outcome]:
        """Each GPU idle before a job; with ``only`` (the job's GPUs), the others are ``skip``.
        ``after_job`` (an epilog): no process left and the memory freed; the temperature is not
        judged (the GPU is still warm from the job)."""
        outcomes = []
        for gpu in snapshot.gpus:
            if (unjudged := not_judged(gpu, only)) is not None:
                outcomes.append(unjudged)
                continue
            findings = [] if after_job else self._idle_temp(gpu)
            if gpu.memory_used_mib is not None and gpu.memory_total_mib:
                fraction = gpu.memory_used_mib / gpu.memory_total_mib
                if fraction >= self.config.idle_memory_used_fraction:
                    findings.append(Finding("fail", "idle_memory_used",
                                            f"{fraction:.0%} of GPU memory in use "
                                            + ("after the job" if after_job else "before the job")))
            compute = [p for p in gpu.processes or [] if "C" in p.type]
            if compute:
                names = ", ".join(f"{p.name or '?'} ({p.pid})" for p in compute[:5])
                findings.append(Finding("fail", "stray_processes", f"compute processes still running: {names}"))
            metrics = {k: v for k, v in gpu_metrics(gpu).items()
                       if k in ("temp_c", "memory_used_mib", "memory_total_mib", "utilization_pct")}
            metrics["compute_processes"] = float(len(compute))
            outcomes.append(with_unchecked(outcome(gpu.entity, findings, metrics, f"{_describe(gpu)} idle"),
                                           unchecked(gpu, idle=True)))
        return outcomes

    def _idle_temp(self, gpu: GpuSnapshot) -> list[Finding]:
        """The site's absolute limit if it set one; otherwise fail this close to the GPU's own
        slowdown temperature and warn above an absolute value."""
        temp, config = gpu.temp_c, self.config
        if temp is None:
            return []
        if config.idle_temp_max_c is not None:
            if temp >= config.idle_temp_max_c:
                return [Finding("fail", "idle_temp_high", f"{temp:.0f} °C idle (limit {config.idle_temp_max_c:g} °C)")]
            return []
        slowdown = gpu.temp_slowdown_c
        if slowdown is not None and temp >= slowdown - config.idle_temp_margin_c:
            return [Finding("fail", "idle_temp_high", f"{temp:.0f} °C idle, within {config.idle_temp_margin_c:g} °C "
                                                      f"of its slowdown at {slowdown:.0f} °C")]
        if temp >= config.idle_temp_warn_c:
            return [Finding("warn", "idle_temp_high", f"{temp:.0f} °C idle (warn at {config.idle_temp_warn_c:g} °C)")]
        return []
