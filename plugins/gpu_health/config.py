"""``[plugins.gpu_health]``: where GPU state comes from and every threshold.

Defaults follow DCGM's health limits and CSCS vetnode's idle limits
(``../shared/DESIGN.md``); XID severities follow NVIDIA's XID catalog
(:mod:`~vetd.plugins.gpu_health.catalog`). Every one can be overridden.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from vetd.agent.api import Duration
from vetd.plugins.gpu_health.catalog import Severity, Verdict, classify, classify_sxid
from vetd.plugins.gpu_health.model import GPU_EVENTS

NonNegative = Annotated[float, msgspec.Meta(ge=0.0)]
#: An XID or SXid number as a TOML key.
XidKey = Annotated[str, msgspec.Meta(pattern=r"^(0|[1-9][0-9]*)$")]


class GpuEventSeverity(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Severity of each NVML event other than an XID (:data:`~vetd.plugins.gpu_health.model.GPU_EVENTS`).

    Critical are the events after which the GPU cannot be trusted with a job
    until it is reset or replaced, as the driver documents them: unavailable,
    uncontained poison, a row that could not be remapped, a recovery action
    asked for (a ``None`` action, the driver clearing its request, is info).
    Warning are the ones the GPU survived: contained poison (the job died, like
    XID 94), a remapped row (pending until reset: ``gpu_health`` then warns
    with ``row_remap_pending``; NVIDIA says new work can start), an SBE storm.
    """

    gpu_unavailable: Severity = "critical"
    fatal_poison: Severity = "critical"
    row_remap_failure: Severity = "critical"
    recovery_action: Severity = "critical"
    nonfatal_poison: Severity = "warning"
    row_remap: Severity = "warning"
    sbe_storm: Severity = "warning"


assert set(GpuEventSeverity.__struct_fields__) == set(GPU_EVENTS)


class GpuHealthConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: ``nvml`` (live), ``capture`` (an ``nvidia-smi -q -x`` file), ``scenario`` (YAML).
    source: Literal["nvml", "capture", "scenario"] = "nvml"
    #: With ``source = "capture"``: the ``nvidia-smi -q -x`` file.
    capture: str = ""
    #: With ``source = "scenario"``: the scenario file (format in ``plugins/gpu_health/replay.py``).
    scenario: str = ""
    #: Serve the capture or scenario through a simulated libnvidia-ml, so the
    #: live NVML code path reads it (tests, demos, checking an NVML upgrade).
    through_nvml: bool = False
    #: Fixed time into the scenario to evaluate (``vetd check --at``); unset: live clock.
    scenario_at: Duration | None = None
    #: Expected GPU count; -1: the NVIDIA GPUs the kernel lists in sysfs
    #: (for a capture: its ``attached_gpus``).
    expected_gpus: int = -1
    #: Deadline of one round of NVML calls; beyond it: ``driver_unresponsive``.
    driver_timeout: Duration = Duration(5.0)
    #: Deadline of a whole gpu_health or gpu_idle run; beyond it: ``timeout``.
    check_timeout: Duration = Duration(15.0)
    #: Status of a GPU whose ECC is off (``ecc_disabled``).
    ecc_disabled_status: Literal["pass", "warn", "fail"] = "warn"
    #: Correctable ECC errors per hour between two samples that warn (``ecc_sbe_rate``).
    correctable_warn_per_hour: NonNegative = 100.0
    #: Retired pages (pre-Ampere) at which the GPU fails (DCGM: 63).
    retired_pages_fail: Annotated[int, msgspec.Meta(ge=1)] = 63
    #: Uncorrectable remapped rows that warn (DCGM: 512).
    remapped_uncorrectable_warn: Annotated[int, msgspec.Meta(ge=1)] = 512
    #: HW slowdown (``hw_slowdown``, ``hw_thermal_slowdown``, ``hw_power_brake_slowdown``)
    #: is judged as a rate: NVML reports it for a moment during P-state changes too, so one
    #: sample is no finding. The window its rate is taken over (gpud: 10 min).
    hw_slowdown_window: Duration = Duration(600.0)
    #: Samples per minute over the window showing a HW slowdown that warn (gpud: 0.6; at the
    #: default 1 m interval, 6 of the last 10 samples; with a longer interval, lower it).
    hw_slowdown_warn_per_min: Annotated[float, msgspec.Meta(gt=0.0)] = 0.6
    #: HW slowdown in every sample for this long fails (the GPU is held back for good).
    hw_slowdown_sustained: Duration = Duration(1800.0)
    #: Consecutive samples a SW thermal slowdown or power cap must be seen in before it warns.
    sw_throttle_sustained_samples: Annotated[int, msgspec.Meta(ge=1)] = 3
    #: SW power cap while drawing at least this fraction of the enforced power
    #: limit is a busy GPU at its budget, not a finding (0: always a finding).
    power_cap_at_limit_fraction: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.9
    #: Warn this close (°C) to the GPU's slowdown temperature (``temp_high``).
    temp_margin_c: NonNegative = 5.0
    #: PCIe generation and width are judged only at or above this utilisation
    #: (an idle GPU drops its link to save power).
    pcie_busy_util_pct: Annotated[float, msgspec.Meta(ge=0.0, le=100.0)] = 30.0
    #: Allowed replay rate, errors per minute per lane, by PCIe generation (DCGM).
    pcie_replay_per_min_per_lane: dict[str, float] = msgspec.field(
        default_factory=lambda: {"1": 0.24, "2": 0.48, "3": 0.48, "4": 0.96, "5": 1.92, "6": 3.84}
    )
    #: NVLink CRC errors per second that warn / fail (DCGM fails at 100/s).
    nvlink_crc_warn_per_s: NonNegative = 1.0
    nvlink_crc_fail_per_s: NonNegative = 100.0
    #: NVLinks every GPU must have up (``[0, 1, ...]``). Without it, only a link seen up since
    #: the agent started is down when it goes down: boards leave links unwired.
    nvlink_expected_links: list[Annotated[int, msgspec.Meta(ge=0)]] = []
    #: ``gpu_idle`` (prolog): an idle GPU this close (°C) to its own slowdown temperature fails
    #: (``idle_temp_high``): it cannot take a job's heat.
    idle_temp_margin_c: NonNegative = 20.0
    #: ``gpu_idle``: an idle GPU at or above this temperature warns (an air-cooled H200 idles at 34-39 °C).
    idle_temp_warn_c: float = 50.0
    #: ``gpu_idle``: a site's absolute limit; at or above it an idle GPU fails. Unset: judged by
    #: the two keys above. CSCS vetnode uses 30 for liquid-cooled GH200.
    idle_temp_max_c: float | None = None
    #: ``gpu_idle``: memory in use at or above this share of the total is left over from a job.
    idle_memory_used_fraction: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.20
    #: Warn when persistence mode is off (``persistence_off``).
    require_persistence_mode: bool = True
    #: Severity per XID, over NVIDIA's catalog (``{"13" = "critical"}``); the
    #: catalog's own (README "XID severity") for the rest; an XID not in it is a warning.
    xid_severity: dict[XidKey, Severity] = {}
    #: Severity per NVSwitch SXid (``{"12028" = "info"}``); otherwise as its line says:
    #: fatal SXids are critical, the others warnings.
    sxid_severity: dict[XidKey, Severity] = {}
    #: Older form of ``xid_severity``: XIDs always critical (``xid_severity`` wins).
    xid_critical: list[int] = []
    #: Older form of ``xid_severity``: XIDs always warnings (``xid_severity`` wins).
    xid_warning: list[int] = []
    #: NVML events other than XIDs (where the GPU and driver deliver them).
    event_severity: GpuEventSeverity = msgspec.field(default_factory=GpuEventSeverity)
    #: Read ``/dev/kmsg`` for XIDs, "fallen off the bus" and NVSwitch SXids as well as NVML events.
    kmsg: bool = True
    #: On start, report kernel-log XIDs this recent (an XID during an agent restart).
    kmsg_lookback: Duration = Duration(600.0)
    #: A single sample from each GPU (temperature, power, utilisation) every ``[agent]
    #: telemetry_interval``, for MQTT subscribers of their own: the controller keeps only the
    #: telemetry plugin's windows ([plugins.telemetry], the same and more), so this is off.
    telemetry: bool = False

    def xid_verdict(self, xid: int, detail: str = "") -> Verdict:
        """The catalog's verdict on an XID with this site's severity over it."""
        verdict = classify(xid, detail)
        if (override := self.xid_severity.get(str(xid))) is not None:
            return verdict._replace(severity=override)
        if xid in self.xid_critical:
            return verdict._replace(severity="critical")
        if xid in self.xid_warning:
            return verdict._replace(severity="warning")
        return verdict

    def sxid_verdict(self, sxid: int, detail: str = "") -> Verdict:
        verdict = classify_sxid(detail)
        override = self.sxid_severity.get(str(sxid))
        return verdict if override is None else verdict._replace(severity=override)

    def event_severity_of(self, kind: str, action: str = "") -> Severity:
        """The severity of a driver event; a recovery action of ``None`` is the driver clearing it."""
        if kind == "recovery_action" and action.lower() == "none":
            return "info"
        severity: Severity = getattr(self.event_severity, kind, "info")
        return severity
