"""``vetd job report --png DIR / --html FILE``: the job's figures (matplotlib, Agg) and one HTML page.

Two figures, like the seed's (CSCS's GPU saturation scorer, its Fig. 1 and 2):

* ``activity.png``: one panel per metric (utilisation, SM activity and
  occupancy, DRAM and tensor activity, NVLink traffic, power, memory), one line
  per GPU, over the job's time;
* ``score.png``: the saturation score of each GPU per window (thin) and of the
  job (the mean over its GPUs, bold); a proxy, and labelled so, where the GPUs
  have no profiling metrics (neither GPM nor DCGM).

Beside each PNG, ``NAME.json`` holds exactly the series plotted (window start,
x, y per GPU per panel), so a test, or a person, can hold a figure to the
stored data. A line of more than :data:`MAX_POINTS` windows is plotted as the
means of consecutive groups of windows (``downsampled_by`` says how many).
Needs the ``report`` extra (``pip install 'vetd[report]'``: matplotlib).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from vetd.controller.jobreport import (
    COLUMNS,
    FORMULA,
    PROXY_SOURCE,
    SCORE_SOURCE,
    GpuReport,
    Report,
)

#: Points a line is plotted with at most.
MAX_POINTS = 1500
#: The activity panels: (metric, title, unit); ``nvlink`` is transmit + receive.
PANELS = (
    ("utilization_pct", "GPU utilisation (NVML)", "%"),
    ("sm_active_pct", "SM activity", "%"),
    ("sm_occupancy_pct", "SM occupancy", "%"),
    ("dram_active_pct", "DRAM activity", "%"),
    ("tensor_active_pct", "Tensor activity", "%"),
    ("nvlink", "NVLink traffic (transmit + receive)", "GiB/s"),
    ("power_w", "Power", "W"),
    ("memory_used_pct", "Memory used", "%"),
)


@dataclass(frozen=True)
class Figure:
    name: str
    data: dict[str, Any]
    png: bytes


def column(gpu: GpuReport, metric: str) -> Sequence[float] | None:
    """A GPU's means of ``metric`` per window (NaN: absent); ``nvlink`` is transmit + receive, GiB/s."""
    if metric != "nvlink":
        return gpu.series.mean.get(metric)
    parts = [gpu.series.mean[k] for k in ("nvlink_tx_mib_s", "nvlink_rx_mib_s") if k in gpu.series.mean]
    if not parts:
        return None
    return [sum(values) / 1024.0 for values in zip(*parts, strict=True)]


def downsample(points: list[tuple[float, float]]) -> tuple[list[tuple[float, float]], int]:
    """At most :data:`MAX_POINTS` points: means of consecutive groups; the group size."""
    if len(points) <= MAX_POINTS:
        return points, 1
    size = math.ceil(len(points) / MAX_POINTS)
    groups = [points[i:i + size] for i in range(0, len(points), size)]
    return [(group[0][0], sum(y for _, y in group) / len(group)) for group in groups], size


def _axis(report: Report) -> tuple[str, float]:
    """The x axis: hours since the job started for a long job, minutes for a shorter one, else seconds."""
    seconds = report.span.end - report.span.start
    if seconds > 3 * 3600:
        return "hours since the job started", 3600.0
    return ("minutes since the job started", 60.0) if seconds > 180 else ("seconds since the job started", 1.0)


def _line(gpu: GpuReport, metric: str, report: Report, unit: float) -> dict[str, Any] | None:
    values = column(gpu, metric)
    if values is None:
        return None
    points = [(t, y) for t, y in zip(gpu.series.ts, values, strict=True) if not math.isnan(y)]
    if not points:
        return None
    plotted, size = downsample(points)
    return {"node": gpu.node, "gpu": gpu.gpu, "label": f"{gpu.node}/{gpu.entity}", "downsampled_by": size,
            "t": [t for t, _ in plotted], "x": [round((t - report.span.start) / unit, 5) for t, _ in plotted],
            "y": [y for _, y in plotted]}


def figures(report: Report) -> list[Figure]:
    """The activity and score figures of ``report``, rendered, with the series they plot."""
    xlabel, unit = _axis(report)
    panels: list[dict[str, Any]] = []
    for metric, title, units in PANELS:
        drawn = [each for gpu in report.gpus if (each := _line(gpu, metric, report, unit)) is not None]
        if drawn:
            panels.append({"metric": metric, "title": title, "unit": units, "series": drawn})
    activity = {"job": report.span.job, "x": xlabel, "panels": panels}
    fig, axes = plt.subplots(max(1, len(panels)), 1, figsize=(11, 2.1 * max(1, len(panels)) + 0.8), sharex=True,
                             squeeze=False)
    for ax, panel in zip(axes[:, 0], panels, strict=False):
        for series in panel["series"]:
            ax.plot(series["x"], series["y"], linewidth=0.9, label=series["label"])
        ax.set_title(panel["title"], fontsize=9, loc="left")
        ax.set_ylabel(panel["unit"], fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel(xlabel, fontsize=8)
    fig.suptitle(f"job {report.span.job}: GPU activity ({len(report.gpus)} GPUs)", fontsize=11)
    top = 1.0
    if panels and len(report.gpus) <= 16:  # one entry per GPU above the panels; more would hide them
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, fontsize=7, ncol=min(8, len(labels)), loc="upper center",
                   bbox_to_anchor=(0.5, 0.985 - 0.1 / len(panels)), frameon=False)
        top = 0.97 - 0.25 / len(panels)
    fig.tight_layout(rect=(0, 0, 1, top))
    figures = [Figure("activity", activity, _png(fig))]

    proxy = report.score is None
    per_gpu: list[dict[str, Any]] = []
    by_time: dict[float, list[float]] = {}
    for gpu in report.gpus:
        if not gpu.scores or (not proxy and gpu.score is None):
            continue
        plotted, size = downsample(gpu.scores)
        per_gpu.append({"node": gpu.node, "gpu": gpu.gpu, "label": f"{gpu.node}/{gpu.entity}", "downsampled_by": size,
                        "t": [t for t, _ in plotted], "x": [round((t - report.span.start) / unit, 5) for t, _ in plotted],
                        "y": [y for _, y in plotted]})
        for ts, score in gpu.scores:
            by_time.setdefault(ts, []).append(score)
    aggregate_points, size = downsample(sorted((ts, sum(v) / len(v)) for ts, v in by_time.items()))
    aggregate: dict[str, Any] = {"label": "job (mean over its GPUs)", "downsampled_by": size, "t": [t for t, _ in aggregate_points],
                 "x": [round((t - report.span.start) / unit, 5) for t, _ in aggregate_points],
                 "y": [y for _, y in aggregate_points]}
    score_kind = "proxy" if proxy else "gssr"
    title = (f"job {report.span.job}: NVML utilisation as a PROXY (no profiling metrics): not the saturation score" if proxy
             else f"job {report.span.job}: GPU saturation score (GSSR) {report.score:.2f}")
    score_data = {"job": report.span.job, "x": xlabel, "kind": score_kind, "formula": FORMULA,
                  "source": PROXY_SOURCE if proxy else SCORE_SOURCE, "series": per_gpu, "aggregate": aggregate}
    fig, ax = plt.subplots(figsize=(11, 3.6))
    for series in per_gpu:
        ax.plot(series["x"], series["y"], linewidth=0.6, alpha=0.45)
    ax.plot(aggregate["x"], aggregate["y"], color="black", linewidth=2.0, label=aggregate["label"])
    ax.set_ylim(0, 1.0)
    ax.set_ylabel("proxy (utilisation)" if proxy else "saturation score S", fontsize=8)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_title(title, fontsize=10, loc="left")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    figures.append(Figure("score", score_data, _png(fig)))
    return figures


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def write_pngs(figures: list[Figure], folder: str) -> list[Path]:
    """``NAME.png`` and ``NAME.json`` (the plotted series) of each figure into ``folder``."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for figure in figures:
        (out / f"{figure.name}.png").write_bytes(figure.png)
        (out / f"{figure.name}.json").write_text(json.dumps(figure.data) + "\n")
        written.append(out / f"{figure.name}.png")
    return written


def when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def write_html(report: Report, figures: list[Figure], path: str) -> None:
    """One self-contained page: summary, flags, the GPU table, the figures (embedded)."""
    e = html.escape
    span = report.span
    if report.score is not None:
        score = f"<b>{report.score:.2f}</b> (GSSR{', GPUs with profiling metrics only' if report.score_kind == 'gssr_partial' else ''})"
    elif report.score_proxy is not None:
        score = f"none: no profiling metrics (GPM or DCGM). <i>{e(PROXY_SOURCE)}</i>: {report.score_proxy:.2f}"
    else:
        score = "none"
    rows = []
    for gpu in report.gpus:
        cells = [e(gpu.node), e(gpu.entity),
                 f"{gpu.score:.2f}" if gpu.score is not None else
                 (f"{gpu.score_proxy:.2f} (proxy)" if gpu.score_proxy is not None else "–")]
        for _, metric, what in COLUMNS:
            number = (gpu.mean if what == "mean" else gpu.p95).get(metric)
            cells.append("–" if number is None else f"{number:.1f}")
        cells.append("–" if gpu.energy_j is None else f"{gpu.energy_j / 3.6e6:.3f}")
        cells.append(f"{sum(gpu.throttled_s.values()):.0f}")
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{e(h)}</th>" for h in ("node", "GPU", "score", *(c[0] for c in COLUMNS), "kWh",
                                                 "throttled s"))
    flags = "".join(f"<li class='{e(f['severity'])}'><b>{e(f['kind'])}</b> ({e(f['severity'])}): {e(f['message'])}"
                    f"<br><code>{e(json.dumps(f['evidence']))}</code></li>" for f in report.flags) or "<li>none</li>"
    images = "".join(f"<figure><img alt='{e(fig.name)}' src='data:image/png;base64,"
                     f"{base64.b64encode(fig.png).decode()}'></figure>" for fig in figures)
    energy = "" if report.energy_j is None else f"<p>Energy: {report.energy_j / 3.6e6:.2f} kWh</p>"
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>vetd job report {e(span.job)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.85em; }}
th, td {{ border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: right; }}
th {{ background: #eee; }} td:first-child, td:nth-child(2) {{ text-align: left; }}
li.critical {{ color: #a00; }} li.warning {{ color: #a60; }} code {{ font-size: 0.8em; color: #555; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>Job {e(span.job)}</h1>
<p>{len(report.gpus)} GPUs on {len(span.nodes)} node(s): {e(", ".join(span.nodes))}<br>
{when(span.start)} to {when(span.end)} ({(span.end - span.start) / 3600:.2f} h), from its {e(span.source)}</p>
<p>Saturation score: {score}</p>
<p><small>{e(FORMULA)}; α 24.02, β 3.09, γ 2.05, λ 11.45. {e(SCORE_SOURCE)}.</small></p>
{energy}
<h2>Flags</h2><ul>{flags}</ul>
<h2>GPUs</h2><table><tr>{head}</tr>{"".join(rows)}</table>
<h2>Figures</h2>{images}
</body></html>
"""
    Path(path).write_text(page, encoding="utf-8")
