"""``vetd job report JOBID``: a job's GPUs from its telemetry windows: table, flags, saturation score.

The job's GPUs come from the telemetry windows tagged with its id; its nodes and
time span from those windows (:func:`span_of`), widened by what the controller's
jobs table (issue 17) knows of it (:func:`with_jobs_table`): its start and end,
and nodes that sent no telemetry, whose XIDs and failed checks still count.

Per GPU: the time-weighted mean and the p95 (over windows) of each metric, the
energy (growth of the driver's energy counter; where it is missing or went
back, a driver reload, mean power × time), the time throttled, and the
saturation score.

**The saturation score** is GSSR's (CSCS's GPU saturation scorer, CUG'25
"Evolving HPC services to enable ML workloads on HPE Cray EX", after the
performance model of Ferrari et al.), per window::

    S = 4 [σ(α A) − 0.5] · [σ(β F + γ O e^(−λ F)) − 0.5]

with σ the logistic function, A the SM activity, F the FP64+FP32+FP16+tensor
activity (capped at 1), O the SM occupancy, each a fraction of 1 (GPM's
percentages / 100, DCGM's fields 1002-1008), α 24.02, β 3.09,
γ 2.05, λ 11.45. A GPU's score is the time-weighted mean of its windows'
scores; the job's, the time-weighted mean over its GPUs with GPM. A GPU
without GPM (before Hopper, or GPM off) has no score: its NVML utilisation
(the share of time any kernel ran, which says nothing of how much of the GPU
it used) is shown as ``score_proxy``, labelled as a proxy, never as the score.

**Where the profiling metrics came from** (``profiling`` per GPU and for the
job): ``gpm``, ``dcgm`` (the node's dcgm-exporter: its windows carry the mark
``profiling_dcgm``), both over the job (``dcgm+gpm``: ``[plugins.telemetry]
profiling = "auto"`` moved the GPU between them), or none; with the windows of
each and those whose dcgm-exporter reading failed (``profiling_dcgm_failed``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import operator
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from vetd.controller.config import ControllerConfig, ReportSection
from vetd.controller.store import Store
from vetd.controller.telemetry import Series, TelemetryStore
from vetd.core.output import clean, table
from vetd.core.protocol import DCGM_FAILED, DCGM_MARK

#: GSSR's parameters (the formula is in this module's docstring and the README).
ALPHA, BETA, GAMMA, LAMBDA = 24.02, 3.09, 2.05, 11.45
FORMULA = "S = 4[σ(αA)−0.5]·[σ(βF+γO·e^(−λF))−0.5]"
SCORE_SOURCE = ("GSSR, the GPU saturation scorer of CSCS (Schuppli et al., 'Evolving HPC services to enable ML "
                "workloads on HPE Cray EX', CUG'25), after the performance model of Ferrari et al.; A = SM "
                "activity, F = FP64+FP32+FP16+tensor activity (at most 1), O = SM occupancy, as fractions "
                "(GPM or DCGM)")
PROXY_SOURCE = ("proxy: NVML utilisation (share of time any kernel ran), for GPUs without profiling metrics "
                "(GPM or DCGM); not the saturation score")
PROFILING_NAMES = {"gpm": "GPM", "dcgm": "dcgm-exporter", "dcgm+gpm": "dcgm-exporter and GPM"}
FP_METRICS = ("tensor_active_pct", "fp64_active_pct", "fp32_active_pct", "fp16_active_pct")
#: Columns of the text table: (title, metric, what of it).
COLUMNS = (("UTIL%", "utilization_pct", "mean"), ("SM%", "sm_active_pct", "mean"),
           ("OCC%", "sm_occupancy_pct", "mean"), ("TENSOR%", "tensor_active_pct", "mean"),
           ("DRAM%", "dram_active_pct", "mean"), ("MEM% p95", "memory_used_pct", "p95"),
           ("POWER W", "power_w", "mean"))
#: Metrics whose minima and maxima the report reads (of the others, the means).
EXTREMES = ("memory_used_pct", "energy_j")
#: Flags of one kind listed at most; beyond, one line says how many more.
MAX_FLAGS_PER_KIND = 20


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def gssr(sm_active: float, fp_active: float, occupancy: float) -> float:
    """GSSR's saturation score from fractions of 1 (see the module's docstring)."""
    a = min(max(sm_active, 0.0), 1.0)
    f = min(max(fp_active, 0.0), 1.0)
    o = min(max(occupancy, 0.0), 1.0)
    return 4.0 * (sigmoid(ALPHA * a) - 0.5) * (sigmoid(BETA * f + GAMMA * o * math.exp(-LAMBDA * f)) - 0.5)


def _score_pct(active: float, fp: float, occupancy: float) -> float:
    """:func:`gssr` of percentages (NaN where an input is NaN), as fast as Python goes: a 24 h job
    on 64 GPUs has half a million windows."""
    if active != active or occupancy != occupancy:  # NaN
        return NAN
    a = 0.0 if active < 0 else 1.0 if active > 100 else active / 100.0
    f = 0.0 if fp < 0 else 1.0 if fp > 100 else fp / 100.0
    o = 0.0 if occupancy < 0 else 1.0 if occupancy > 100 else occupancy / 100.0
    return 4.0 * (1.0 / (1.0 + _exp(-ALPHA * a)) - 0.5) * (1.0 / (1.0 + _exp(-(BETA * f + GAMMA * o * _exp(-LAMBDA * f))))
                                                           - 0.5)


_exp = math.exp
NAN = float("nan")


def window_score(mean: dict[str, float]) -> float | None:
    """The score of one window, or None without the GPM activities it needs."""
    if "sm_active_pct" not in mean or "sm_occupancy_pct" not in mean:
        return None
    fp = sum(mean.get(metric, 0.0) for metric in FP_METRICS) / 100.0
    return gssr(mean["sm_active_pct"] / 100.0, fp, mean["sm_occupancy_pct"] / 100.0)


@dataclass(frozen=True)
class JobSpan:
    """Where and when a job ran."""

    job: str
    cluster: str
    nodes: list[str]
    start: float
    end: float
    source: str = "telemetry windows"


def span_of(job: str, series: Sequence[Series]) -> JobSpan | None:
    """The job's nodes and span from its telemetry (None: it has none). The seam for the jobs
    table: where it knows the job, build the span from it instead."""
    series = [s for s in series if len(s.ts)]
    if not series:
        return None
    return JobSpan(job=job, cluster=series[0].cluster, nodes=sorted({s.node for s in series}),
                   start=min(s.ts[0] for s in series), end=max(s.ts[-1] + s.length[-1] for s in series))


def with_jobs_table(span: JobSpan, job: dict[str, Any] | None) -> JobSpan:
    """The span widened by what the controller's jobs table knows of the job (``Store.job``: its latest
    run's start and end, its nodes): a node that sent no telemetry still has its XIDs and failed checks
    looked for, and the span is the job's even when its first or last window was lost."""
    if job is None:
        return span
    nodes = sorted({*span.nodes, *(part["node"] for part in job.get("nodes", []))})
    start = min(span.start, float(job["started"])) if job.get("started") else span.start
    end = max(span.end, float(job["ended"])) if job.get("ended") else span.end
    return JobSpan(job=span.job, cluster=span.cluster, nodes=nodes, start=start, end=end,
                   source="jobs table and telemetry windows")


@dataclass
class GpuReport:
    series: Series
    mean: dict[str, float] = field(default_factory=dict)
    p95: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    energy_j: float | None = None
    energy_from: str = ""
    throttled_s: dict[str, float] = field(default_factory=dict)
    score: float | None = None
    score_proxy: float | None = None
    #: (window start, score or proxy) for the score plot.
    scores: list[tuple[float, float]] = field(default_factory=list)
    #: Windows whose profiling metrics came from each source (``gpm``, ``dcgm``), and those whose
    #: dcgm-exporter reading failed (``dcgm_failed``).
    profiling_windows: dict[str, int] = field(default_factory=dict)

    @property
    def profiling(self) -> str | None:
        """``gpm``, ``dcgm``, ``dcgm+gpm`` or None: where its profiling metrics came from."""
        return "+".join(sorted(k for k in ("dcgm", "gpm") if self.profiling_windows.get(k))) or None

    @property
    def node(self) -> str:
        return self.series.node

    @property
    def entity(self) -> str:
        return self.series.entity

    @property
    def gpu(self) -> int:
        return int(self.entity.removeprefix("gpu"))

    @property
    def activity_metric(self) -> str:
        return "sm_active_pct" if "sm_active_pct" in self.mean else "utilization_pct"

    def activity(self) -> float | None:
        return self.mean.get(self.activity_metric)


@dataclass
class Report:
    span: JobSpan
    gpus: list[GpuReport]
    flags: list[dict[str, Any]]
    score: float | None
    score_proxy: float | None
    energy_j: float | None

    @property
    def profiling(self) -> str | None:
        """Where the job's profiling metrics came from (its GPUs' sources, joined)."""
        sources = {part for g in self.gpus if g.profiling for part in g.profiling.split("+")}
        return "+".join(sorted(sources)) or None

    @property
    def score_kind(self) -> str:
        if self.score is not None:
            return "gssr" if all(g.score is not None for g in self.gpus) else "gssr_partial"
        return "proxy" if self.score_proxy is not None else "none"

    def to_json(self) -> dict[str, Any]:
        span = self.span
        return {
            "job": {"id": span.job, "cluster": span.cluster, "nodes": span.nodes, "gpus": len(self.gpus),
                    "start": span.start, "end": span.end, "duration_s": span.end - span.start,
                    "score": _round(self.score), "score_kind": self.score_kind,
                    "score_proxy": _round(self.score_proxy), "energy_j": _round(self.energy_j, 1),
                    "from": span.source, "profiling": self.profiling},
            "gpus": [{"node": g.node, "gpu": g.gpu, "entity": g.entity, "score": _round(g.score),
                      "score_kind": "gssr" if g.score is not None else "proxy",
                      "score_proxy": _round(g.score_proxy), "mean": _rounded(g.mean), "p95": _rounded(g.p95),
                      "energy_j": _round(g.energy_j, 1), "energy_from": g.energy_from,
                      "throttled_s": _rounded(g.throttled_s), "seconds": g.seconds, "windows": len(g.series.ts),
                      "profiling": g.profiling, "profiling_windows": g.profiling_windows}
                     for g in self.gpus],
            "flags": self.flags,
            "score": {"formula": FORMULA, "parameters": {"alpha": ALPHA, "beta": BETA, "gamma": GAMMA,
                                                         "lambda": LAMBDA},
                      "source": SCORE_SOURCE, "proxy": PROXY_SOURCE},
        }


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in values.items()}


def percentile(values: Sequence[float], share: float) -> float:
    """The ``share`` quantile, interpolated between the closest ranks."""
    ordered = sorted(values)
    position = share * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _present(column: Sequence[float], lengths: Sequence[float]) -> tuple[Sequence[float], Sequence[float]]:
    """The values of ``column`` that are there (not NaN) and their windows' lengths."""
    if not math.isnan(math.fsum(column)):  # the usual case, all in C
        return column, lengths
    kept = [(value, length) for value, length in zip(column, lengths, strict=True) if not math.isnan(value)]
    return [value for value, _ in kept], [length for _, length in kept]


def _weighted(values: Sequence[float], lengths: Sequence[float]) -> float:
    return math.fsum(map(operator.mul, values, lengths))


def summarize(gpu: GpuReport) -> None:
    """Means, p95s, energy, time throttled and score of one GPU from its windows."""
    series = gpu.series
    lengths = series.length
    for metric, column in series.mean.items():
        if metric in (DCGM_MARK, DCGM_FAILED):
            continue
        values, weights = _present(column, lengths)
        seconds = math.fsum(weights)
        if values and seconds > 0:
            gpu.mean[metric] = _weighted(values, weights) / seconds
            gpu.p95[metric] = percentile(values, 0.95)
    gpu.seconds = math.fsum(lengths)
    gpu.profiling_windows = profiling_windows(series)
    gpu.throttled_s = {kind: _weighted(*_present(series.mean[f"throttle_{kind}_pct"], lengths)) / 100.0
                       for kind in ("power", "thermal", "hw") if f"throttle_{kind}_pct" in gpu.mean}
    counter = series.mean.get("energy_j")
    if counter is not None and not any(math.isnan(v) for v in counter):
        highs = series.maximum.get("energy_j", counter)
        lows = series.minimum.get("energy_j", counter)
        grown = max(highs) - min(lows)
        if grown >= 0 and all(b >= a for a, b in itertools.pairwise(counter)):
            gpu.energy_j, gpu.energy_from = grown, "energy counter"
    if gpu.energy_j is None and "power_w" in gpu.mean:
        gpu.energy_j = _weighted(*_present(series.mean["power_w"], lengths))
        gpu.energy_from = "mean power"
    active, occupancy = series.mean.get("sm_active_pct"), series.mean.get("sm_occupancy_pct")
    if active is not None and occupancy is not None:
        nothing = [0.0] * len(series.ts)
        pipes = [series.mean.get(metric, nothing) for metric in FP_METRICS]
        fp = [math.fsum(v for v in values if v == v) for values in zip(*pipes, strict=True)]  # NaN != NaN
        scores = list(map(_score_pct, active, fp, occupancy))
        kept = [(ts, score, length) for ts, score, length in zip(series.ts, scores, lengths, strict=True)
                if score == score]
        gpu.scores = [(ts, score) for ts, score, _ in kept]
        seconds = math.fsum(length for _, _, length in kept)
        gpu.score = math.fsum(score * length for _, score, length in kept) / seconds if seconds else None
    if gpu.score is None and "utilization_pct" in gpu.mean:
        gpu.score_proxy = gpu.mean["utilization_pct"] / 100.0
        gpu.scores = [(series.ts[i], value / 100.0) for i, value in enumerate(series.mean["utilization_pct"])
                      if not math.isnan(value)]


def profiling_windows(series: Series) -> dict[str, int]:
    """Windows whose profiling metrics are dcgm-exporter's (marked), GPM's (SM activity without the mark),
    and those whose dcgm-exporter reading failed."""
    nothing = [NAN] * len(series.ts)
    marked, failed = series.mean.get(DCGM_MARK, nothing), series.mean.get(DCGM_FAILED, nothing)
    active = series.mean.get("sm_active_pct", nothing)
    counts = {"dcgm": sum(1 for mark in marked if mark == mark),  # NaN != NaN: the window lacks it
              "gpm": sum(1 for value, mark in zip(active, marked, strict=True) if value == value and mark != mark),
              "dcgm_failed": sum(1 for mark in failed if mark == mark)}
    return {kind: count for kind, count in counts.items() if count}


def build(job: str, series: Sequence[Series], history: Iterable[dict[str, Any]] | None,
          settings: ReportSection, span: JobSpan | None = None) -> Report | None:
    """The report of ``job`` from its telemetry (:meth:`TelemetryStore.job_series`) and the results and
    events of its nodes during it (``history``: the rows of its nodes while it ran, from the store);
    ``span``: where and when it ran, if known better than its telemetry says (:func:`with_jobs_table`)."""
    span = span or span_of(job, series)
    if span is None or not any(len(s.ts) for s in series):
        return None
    reports = sorted((GpuReport(s) for s in series
                      if s.entity.startswith("gpu") and s.entity[3:].isdigit() and len(s.ts)),
                     key=lambda g: (g.node, g.gpu))
    for gpu in reports:
        summarize(gpu)
    scored = [g for g in reports if g.score is not None]
    proxied = [g for g in reports if g.score_proxy is not None]
    score = (sum(g.score * g.seconds for g in scored if g.score is not None) / sum(g.seconds for g in scored)
             if scored and sum(g.seconds for g in scored) else None)
    proxy = (sum((g.score_proxy or 0.0) * g.seconds for g in proxied) / sum(g.seconds for g in proxied)
             if proxied and sum(g.seconds for g in proxied) else None)
    energies = [g.energy_j for g in reports if g.energy_j is not None]
    flags = flag(reports, settings)
    if history is not None:
        flags += incidents(span, history)
    return Report(span, reports, flags, score, proxy, sum(energies) if energies else None)


def flag(gpus: list[GpuReport], settings: ReportSection) -> list[dict[str, Any]]:
    """Idle GPUs, stragglers (GPUs and nodes), memory nearly full, throttling: each with its evidence."""
    flags: list[dict[str, Any]] = []
    idle = set()
    for gpu in gpus:
        activity = gpu.activity()
        if activity is not None and activity < settings.idle_pct:
            idle.add((gpu.node, gpu.entity))
            flags.append(_flag("idle_gpu", "warning", gpu.node, gpu.entity,
                               f"{gpu.node} {gpu.entity} idle: mean {_label(gpu.activity_metric)} "
                               f"{activity:.1f} % over {_duration(gpu.seconds)}",
                               {gpu.activity_metric: round(activity, 2), "utilization_pct":
                                round(gpu.mean.get("utilization_pct", float("nan")), 2),
                                "threshold_pct": settings.idle_pct}))
    busy = [g for g in gpus if (g.node, g.entity) not in idle and g.activity() is not None]
    flags += stragglers(busy, settings)
    for gpu in gpus:
        highs = gpu.series.maximum.get("memory_used_pct", gpu.series.mean.get("memory_used_pct"))
        values, weights = _present(highs, gpu.series.length) if highs is not None else ([], [])
        peak = max(values, default=0.0)
        if peak >= settings.memory_full_pct:
            full = math.fsum(length for value, length in zip(values, weights, strict=True)
                             if value >= settings.memory_full_pct)
            flags.append(_flag("memory_nearly_full", "warning", gpu.node, gpu.entity,
                               f"{gpu.node} {gpu.entity} memory nearly full: peak {peak:.1f} %, at or above "
                               f"{settings.memory_full_pct:g} % in windows covering {_duration(full)}",
                               {"peak_memory_used_pct": round(peak, 2), "seconds_at_or_above": full,
                                "threshold_pct": settings.memory_full_pct}))
        slowed = gpu.throttled_s.get("thermal", 0.0) + gpu.throttled_s.get("hw", 0.0)
        if gpu.seconds and slowed / gpu.seconds >= settings.throttle_share:
            flags.append(_flag("throttling", "warning", gpu.node, gpu.entity,
                               f"{gpu.node} {gpu.entity} slowed down {100 * slowed / gpu.seconds:.0f} % of the time "
                               f"(thermal {_duration(gpu.throttled_s.get('thermal', 0.0))}, "
                               f"HW {_duration(gpu.throttled_s.get('hw', 0.0))})",
                               {"thermal_s": round(gpu.throttled_s.get("thermal", 0.0), 1),
                                "hw_s": round(gpu.throttled_s.get("hw", 0.0), 1), "seconds": gpu.seconds,
                                "threshold_share": settings.throttle_share}))
        capped = gpu.throttled_s.get("power", 0.0)
        if gpu.seconds and capped / gpu.seconds >= 0.5:
            flags.append(_flag("power_capped", "info", gpu.node, gpu.entity,
                               f"{gpu.node} {gpu.entity} at its power limit {100 * capped / gpu.seconds:.0f} % of "
                               "the time (a busy GPU at its budget: no fault)",
                               {"power_capped_s": round(capped, 1), "seconds": gpu.seconds,
                                "mean_power_w": round(gpu.mean.get("power_w", float("nan")), 1)}))
    return flags


def stragglers(gpus: list[GpuReport], settings: ReportSection) -> list[dict[str, Any]]:
    """A GPU, or a node, below ``straggler_fraction`` of its peers' median in most of the windows."""
    flags: list[dict[str, Any]] = []
    if len(gpus) < 2:
        return flags
    metric = "sm_active_pct" if all("sm_active_pct" in g.mean for g in gpus) else "utilization_pct"
    by_time: dict[float, dict[tuple[str, str], float]] = {}
    for gpu in gpus:
        for ts, value in zip(gpu.series.ts, gpu.series.mean[metric], strict=True):
            if not math.isnan(value):
                by_time.setdefault(ts, {})[(gpu.node, gpu.entity)] = value
    medians = {ts: statistics.median(values.values()) for ts, values in by_time.items() if len(values) >= 2}
    peer_median = statistics.median(g.mean[metric] for g in gpus)
    for gpu in gpus:
        key = (gpu.node, gpu.entity)
        compared = [ts for ts in medians if key in by_time[ts]]
        below = [ts for ts in compared if by_time[ts][key] < settings.straggler_fraction * medians[ts]]
        share = len(below) / len(compared) if compared else 0.0
        if gpu.mean[metric] < settings.straggler_fraction * peer_median and share >= settings.straggler_windows:
            flags.append(_flag("straggler", "warning", gpu.node, gpu.entity,
                               f"{gpu.node} {gpu.entity} straggles: mean {_label(metric)} {gpu.mean[metric]:.1f} % "
                               f"against its peers' median {peer_median:.1f} %, below "
                               f"{100 * settings.straggler_fraction:.0f} % of it in {100 * share:.0f} % of the windows",
                               {metric: round(gpu.mean[metric], 2), "peer_median": round(peer_median, 2),
                                "windows_below": len(below), "windows_compared": len(compared),
                                "fraction": settings.straggler_fraction}))
    nodes: dict[str, list[float]] = {}
    for gpu in gpus:
        nodes.setdefault(gpu.node, []).append(gpu.mean[metric])
    if len(nodes) >= 2:
        means = {node: statistics.mean(values) for node, values in nodes.items()}
        median = statistics.median(means.values())
        for node, value in means.items():
            if value < settings.straggler_fraction * median:
                flags.append(_flag("straggler_node", "warning", node, None,
                                   f"{node} straggles: its GPUs' mean {_label(metric)} {value:.1f} % against the "
                                   f"nodes' median {median:.1f} %",
                                   {metric: round(value, 2), "node_median": round(median, 2),
                                    "fraction": settings.straggler_fraction}))
    return flags


#: Events that are flagged when they happen on a job's node during the job.
INCIDENT_EVENTS = ("xid", "sxid", "gpu_event")
BAD_RESULTS = ("fail", "error", "timeout")


def incidents(span: JobSpan, history: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """XIDs, GPU events and failed checks on the job's nodes while it ran (``history``: their rows)."""
    nodes = set(span.nodes)
    counts: dict[str, int] = {}
    flags: list[dict[str, Any]] = []
    for row in history:
        if row["node"] not in nodes or row["cluster"] != span.cluster or not span.start <= row["ts"] <= span.end:
            continue
        if row["kind"] == "event" and row["name"] in INCIDENT_EVENTS and row["status"] in ("warning", "critical"):
            kind = row["name"]
            severity = row["status"]
        elif row["kind"] == "result" and row["status"] in BAD_RESULTS:
            kind, severity = "failed_check", "critical" if row["status"] == "fail" else "warning"
        else:
            continue
        counts[kind] = counts.get(kind, 0) + 1
        if counts[kind] > MAX_FLAGS_PER_KIND:
            continue
        what = row["name"] if row["kind"] == "event" else f"{row['name']} {row['status']}"
        entity = row["entity"] if str(row["entity"]).startswith("gpu") else None
        flags.append(_flag(kind, severity, row["node"], entity,
                           f"{row['node']} {row['entity']}: {what} at {_when(row['ts'])}"
                           + (f" ({', '.join(row['codes'][:4])})" if row["codes"] else "")
                           + (f": {row['message'][:160]}" if row["message"] else ""),
                           {"ts": row["ts"], "name": row["name"], "status": row["status"], "entity": row["entity"],
                            "codes": row["codes"], "message": row["message"][:500], "history_id": row["id"]}))
    for kind, count in counts.items():
        if count > MAX_FLAGS_PER_KIND:
            flags.append(_flag(kind, "warning", "", None, f"{count - MAX_FLAGS_PER_KIND} more {kind} flags not listed",
                               {"total": count}))
    return flags


def _flag(kind: str, severity: str, node: str, entity: str | None, message: str,
          evidence: dict[str, Any]) -> dict[str, Any]:
    return {"kind": kind, "severity": severity, "node": node, "gpu": None if entity is None else
            int(entity.removeprefix("gpu")), "entity": entity, "message": message, "evidence": evidence}


def _label(metric: str) -> str:
    return {"sm_active_pct": "SM activity", "utilization_pct": "utilisation"}.get(metric, metric)


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def text(report: Report) -> str:
    """The report as a person reads it in a terminal."""
    span = report.span
    lines = [f"job {clean(span.job)} ({span.cluster}): {len(report.gpus)} GPUs on {len(span.nodes)} node(s) "
             f"{', '.join(clean(n) for n in span.nodes[:8])}{' …' if len(span.nodes) > 8 else ''}",
             f"  {_when(span.start)} to {_when(span.end)} ({_duration(span.end - span.start)}), from its {span.source}"]
    if report.score is not None:
        partial = " (GPUs with profiling metrics only)" if report.score_kind == "gssr_partial" else ""
        lines.append(f"  saturation score (GSSR) {report.score:.2f}{partial}: {FORMULA}")
    elif report.score_proxy is not None:
        lines.append(f"  saturation score: none (no profiling metrics: GPM or DCGM); {PROXY_SOURCE}: {report.score_proxy:.2f}")
    if report.profiling is not None:
        failed = sum(g.profiling_windows.get("dcgm_failed", 0) for g in report.gpus)
        lines.append(f"  profiling metrics (SM, tensor, DRAM, FP) from {PROFILING_NAMES.get(report.profiling, report.profiling)}"
                     + (f"; dcgm-exporter gave nothing in {failed} GPU windows" if failed else ""))
    if report.energy_j is not None:
        lines.append(f"  energy {report.energy_j / 3.6e6:.2f} kWh")
    rows = []
    for gpu in report.gpus:
        score = f"{gpu.score:.2f}" if gpu.score is not None else (
            f"{gpu.score_proxy:.2f}*" if gpu.score_proxy is not None else "-")
        cells = [clean(gpu.node), gpu.entity, score]
        for _, metric, what in COLUMNS:
            value = (gpu.mean if what == "mean" else gpu.p95).get(metric)
            cells.append("-" if value is None else f"{value:.0f}")
        cells.append("-" if gpu.energy_j is None else f"{gpu.energy_j / 3.6e6:.2f}")
        throttled = sum(gpu.throttled_s.values())
        cells.append(_duration(throttled) if throttled else "0")
        rows.append(cells)
    out = "\n".join(lines) + "\n\n"
    out += table(("NODE", "GPU", "SCORE", *(c[0] for c in COLUMNS), "kWh", "THROTTLED"), rows)
    if any(g.score is None and g.score_proxy is not None for g in report.gpus):
        out += f"  * {PROXY_SOURCE}\n"
    out += "\nflags:\n" if report.flags else "\nno flags\n"
    out += "".join(f"  [{f['severity']}] {f['kind']}: {clean(f['message'])}\n" for f in report.flags)
    return out


def run_report(store: Store, telemetry: TelemetryStore, config: ControllerConfig, args: argparse.Namespace,
               out: TextIO | None = None) -> int:
    """``vetd job report``: 0 with a report, 1 when the job has no telemetry, 2 when a figure cannot be made."""
    out = out or sys.stdout
    series = telemetry.job_series(args.job_id, config.cluster, extremes=EXTREMES)
    span = span_of(args.job_id, series)
    if span is not None:
        span = with_jobs_table(span, store.job(config.cluster, args.job_id))
    history = None if span is None else itertools.chain.from_iterable(
        itertools.takewhile(lambda row: row["ts"] <= span.end, store.history_since(span.start, node))
        for node in span.nodes)
    report = build(args.job_id, series, history, config.report, span)
    if report is None:
        print(f"vetd: no telemetry of job {clean(args.job_id)!r} in {telemetry.path} (kept {config.telemetry.keep_jobs:g}s "
              "after the job; is [plugins.telemetry] on its nodes, and did its job_start reach the agent?)",
              file=sys.stderr)
        return 1
    if args.png or args.html:
        try:
            from vetd.controller import plots
        except ImportError as exc:
            print(f"vetd: --png and --html need matplotlib: pip install 'vetd[report]' ({exc})", file=sys.stderr)
            return 2
        figures = plots.figures(report)
        if args.png:
            try:
                written = plots.write_pngs(figures, args.png)
            except OSError as exc:
                print(f"vetd: --png {args.png}: {exc.strerror or exc}", file=sys.stderr)
                return 2
            print(f"vetd: wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
        if args.html:
            try:
                plots.write_html(report, figures, args.html)
            except OSError as exc:
                print(f"vetd: --html {args.html}: {exc.strerror or exc}", file=sys.stderr)
                return 2
            print(f"vetd: wrote {args.html}", file=sys.stderr)
    if args.json:
        out.write(json.dumps(report.to_json(), indent=1) + "\n")
    else:
        out.write(text(report))
    return 0
