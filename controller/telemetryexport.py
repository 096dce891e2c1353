"""``vetd export --telemetry``: telemetry windows as JSON lines or CSV.

JSON lines, one window per line: ``ts`` (its start, Unix seconds), ``time`` (the same, ISO 8601 UTC),
``cluster``, ``node``, ``entity`` (``gpu3``, ``node``), ``source``, ``job`` (null when none),
``window_s``, ``samples``, and ``mean``, ``min``, ``max`` by metric (units in the names).
CSV: the same columns, then one per metric (its mean) with ``METRIC_min`` and ``METRIC_max`` beside
it, the metrics the telemetry plugin defines first; an empty cell where a window lacks the metric.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Iterable
from typing import TextIO

from vetd.controller.telemetry import GPU_METRICS, HOST_METRICS, StoredWindow

FIELDS = ("ts", "time", "cluster", "node", "entity", "source", "job", "window_s", "samples")


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + (f".{int(ts * 1000) % 1000:03d}Z"
                                                                   if ts % 1 else "Z")


def _head(window: StoredWindow) -> dict[str, object]:
    return {"ts": window.ts, "time": iso(window.ts), "cluster": window.cluster, "node": window.node,
            "entity": window.entity, "source": window.source, "job": window.job, "window_s": window.length,
            "samples": window.samples}


def export_windows(windows: Callable[[], Iterable[StoredWindow]], out: TextIO, fmt: str,
                   node: str | None = None) -> int:
    """Write the windows ``windows()`` gives (called twice for CSV: once for the columns); returns the count."""
    def chosen() -> Iterable[StoredWindow]:
        return (w for w in windows() if node is None or w.node == node)

    count = 0
    if fmt == "jsonl":
        for window in chosen():
            out.write(json.dumps({**_head(window), "mean": window.mean, "min": window.minimum,
                                  "max": window.maximum}) + "\n")
            count += 1
        return count
    seen: set[str] = set()
    for window in chosen():
        seen.update(window.mean)
    known = [m for m in (*GPU_METRICS, *HOST_METRICS) if m in seen]
    metrics = list(dict.fromkeys([*known, *sorted(seen - set(known))]))
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*FIELDS, *(f"{m}{suffix}" for m in metrics for suffix in ("", "_min", "_max"))])
    for window in chosen():
        head = _head(window)
        row = ["" if head[f] is None else head[f] for f in FIELDS]
        for metric in metrics:
            row += [window.mean.get(metric, ""), window.minimum.get(metric, ""), window.maximum.get(metric, "")]
        writer.writerow(row)
        count += 1
    return count
