"""Telemetry windows on the node: samples folded per entity, one message per window.

A windowed :class:`~vetd.agent.checks.TelemetrySource` is sampled every
``interval``; :class:`Windows` keeps, per entity and metric, the count, sum,
minimum and maximum of the samples of the current window and hands them out
when the window closes, with the job that ran on the entity during most of its
samples. Windows are aligned on the wall clock (a 10 s window starts at :00,
:10, :20…), so the windows of every GPU and node of a job line up, and a window
closes at the first sample past its end.

What goes on the wire is bounded the same way whatever the sample rate: one
message per entity per window.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field


@dataclass
class _Stats:
    count: int = 0
    total: float = 0.0
    low: float = math.inf
    high: float = -math.inf

    def add(self, value: float) -> None:
        self.count += 1
        self.total += value
        self.low = min(self.low, value)
        self.high = max(self.high, value)


@dataclass
class _Entity:
    samples: int = 0
    metrics: dict[str, _Stats] = field(default_factory=dict)
    jobs: Counter[str | None] = field(default_factory=Counter)


@dataclass(frozen=True)
class Window:
    """One entity's samples over one window."""

    entity: str
    started: float
    length: float
    samples: int
    mean: dict[str, float]
    minimum: dict[str, float]
    maximum: dict[str, float]
    job_id: str | None


class Windows:
    """The open window of one source: :meth:`add` each sample, :meth:`close` when :meth:`due`."""

    def __init__(self, length: float, job_of: Callable[[str], str | None]) -> None:
        if not length > 0:
            raise ValueError("a telemetry window must be longer than 0 s")
        self.length = length
        self.job_of = job_of
        self.started: float | None = None
        self._entities: dict[str, _Entity] = {}

    def start_of(self, now: float) -> float:
        return math.floor(now / self.length) * self.length

    def due(self, now: float) -> bool:
        """Whether the open window has ended by ``now`` (close it before adding the sample of ``now``)."""
        return self.started is not None and now >= self.started + self.length

    def add(self, sample: Mapping[str, Mapping[str, float]], now: float) -> None:
        """One sample (``{entity: {metric: value}}``) taken at ``now``; NaN and infinite values are left out."""
        if self.started is None:
            self.started = self.start_of(now)
        for entity, metrics in sample.items():
            held = self._entities.setdefault(entity, _Entity())
            held.samples += 1
            held.jobs[self.job_of(entity)] += 1
            for name, value in metrics.items():
                number = float(value)
                if math.isfinite(number):
                    held.metrics.setdefault(name, _Stats()).add(number)

    def close(self) -> list[Window]:
        """The open window's per-entity summaries (none if it saw no sample); the next sample opens a new one."""
        started, entities = self.started, self._entities
        self.started, self._entities = None, {}
        if started is None:
            return []
        windows = []
        for entity, held in entities.items():
            job, _ = held.jobs.most_common(1)[0]
            stats = held.metrics
            windows.append(Window(
                entity=entity, started=started, length=self.length, samples=held.samples,
                mean={k: s.total / s.count for k, s in stats.items()},
                minimum={k: s.low for k, s in stats.items()},
                maximum={k: s.high for k, s in stats.items()},
                job_id=job,
            ))
        return windows
