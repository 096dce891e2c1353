"""Telemetry windows in their own SQLite database: per job in full, per node downsampled.

The agents send one window per entity (a GPU, the node) per ``[plugins.telemetry]
window``. They go to a database of their own (``[telemetry] path``, beside the
controller's): bulk data with its own retention, which never holds up a decision's
transaction and can be deleted without losing the fleet's state.

* ``windows``: every window as it came (its series, start, length, sample count,
  job, and the means, minima and maxima), until its ``node_resolution`` bucket
  (5 minutes) has closed and ``late`` (1 minute) has passed. Then, each minute:
* ``rollups``: per series, one row per bucket folding its windows (mean weighted
  by samples, min of minima, max of maxima), kept ``keep_nodes`` (7 days);
* ``chunks``: a job's windows of the bucket, per series, packed whole (every
  window, columns delta-coded and compressed: about a quarter of their size),
  kept ``keep_jobs`` (90 days). The windows themselves are then deleted.

Values are kept to a tenth of their unit (``power_w`` 612.4; NVML itself reports whole
percents, degrees and MHz), as integers in MessagePack, each metric by the number of its
name (``metric_names``). A window arriving after its bucket was rolled up is packed if it
has a job and dropped otherwise (counted ``telemetry_late``).

The latest window of each entity is also kept in memory for ``/metrics``.
"""

from __future__ import annotations

import itertools
import math
import operator
import sqlite3
import zlib
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import structlog

from vetd.controller.counters import Counters
from vetd.core.configfile import ConfigError
from vetd.core.files import create_private
from vetd.core.protocol import Message, Telemetry

log = structlog.get_logger("vetd.telemetry")

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    id INTEGER PRIMARY KEY,
    cluster TEXT NOT NULL,
    node TEXT NOT NULL,
    entity TEXT NOT NULL,
    source TEXT NOT NULL,
    UNIQUE (cluster, node, entity, source)
);
CREATE TABLE IF NOT EXISTS metric_names (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS windows (
    series INTEGER NOT NULL,
    ts REAL NOT NULL,
    length REAL NOT NULL,
    samples INTEGER NOT NULL,
    job TEXT,
    data BLOB NOT NULL,
    PRIMARY KEY (series, ts)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS windows_job ON windows (job, ts) WHERE job IS NOT NULL;
CREATE INDEX IF NOT EXISTS windows_ts ON windows (ts);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY,
    series INTEGER NOT NULL,
    ts REAL NOT NULL,
    until REAL NOT NULL,
    job TEXT NOT NULL,
    windows INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_job ON chunks (job, ts);
CREATE INDEX IF NOT EXISTS chunks_until ON chunks (until);
CREATE TABLE IF NOT EXISTS rollups (
    series INTEGER NOT NULL,
    ts REAL NOT NULL,
    length REAL NOT NULL,
    samples INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (series, ts)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS rollups_ts ON rollups (ts);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value REAL NOT NULL
);
"""
#: What the telemetry plugin measures per GPU and per host, with what each means: ``/metrics``
#: exports these (and only these: a node cannot invent series there), the report reads them.
GPU_METRICS = {
    "utilization_pct": "Share of time a kernel ran (NVML utilisation).",
    "memory_util_pct": "Share of time device memory was read or written (NVML).",
    "memory_used_mib": "Device memory used, MiB.",
    "memory_used_pct": "Device memory used, percent of total.",
    "clock_sm_mhz": "SM clock, MHz.",
    "clock_memory_mhz": "Memory clock, MHz.",
    "power_w": "Power draw, W.",
    "energy_j": "Energy since the driver loaded, J.",
    "temp_c": "GPU temperature, degrees C.",
    "throttle_power_pct": "Share of samples with the SW power cap active.",
    "throttle_thermal_pct": "Share of samples with SW or HW thermal slowdown active.",
    "throttle_hw_pct": "Share of samples with HW slowdown or power brake active.",
    "pcie_tx_mib_s": "PCIe transmit, MiB/s.",
    "pcie_rx_mib_s": "PCIe receive, MiB/s.",
    "nvlink_tx_mib_s": "NVLink transmit over all links, MiB/s.",
    "nvlink_rx_mib_s": "NVLink receive over all links, MiB/s.",
    "sm_active_pct": "SM activity (GPM SM_UTIL, DCGM 1002).",
    "sm_occupancy_pct": "SM occupancy (GPM, DCGM 1003).",
    "tensor_active_pct": "Tensor pipe activity (GPM ANY_TENSOR_UTIL, DCGM 1004).",
    "dram_active_pct": "DRAM bandwidth used (GPM DRAM_BW_UTIL, DCGM 1005).",
    "fp64_active_pct": "FP64 pipe activity (GPM, DCGM 1006).",
    "fp32_active_pct": "FP32 pipe activity (GPM, DCGM 1007).",
    "fp16_active_pct": "FP16 pipe activity (GPM, DCGM 1008).",
}
HOST_METRICS = {
    "cpu_pct": "CPU busy, percent of all CPUs.",
    "memory_used_pct": "Memory used, percent.",
    "load1": "1-minute load average.",
    "disk_read_mib_s": "Disk reads, MiB/s.",
    "disk_write_mib_s": "Disk writes, MiB/s.",
    "net_rx_mib_s": "Network receive, MiB/s.",
    "net_tx_mib_s": "Network transmit, MiB/s.",
}

#: Metric names the database keeps at most (a node inventing names cannot grow it without end).
MAX_METRIC_NAMES = 4096
#: Series (node, entity, source) one node may have.
MAX_SERIES_PER_NODE = 512
NAN = float("nan")
#: Rows deleted or rolled up per table per tick, at most.
TICK_ROWS = 20_000
#: Node buckets rolled up per tick, at most (a controller back after a long stop catches up over ticks).
TICK_BUCKETS = 2016
#: Stored values are tenths of their unit (NVML itself reports whole percents, degrees and MHz).
SCALE = 10.0
_UNSCALE = (1.0 / SCALE).__mul__

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(list[list[int]])


@dataclass(frozen=True)
class StoredWindow:
    """One window as stored (or a rollup of several)."""

    cluster: str
    node: str
    entity: str
    source: str
    ts: float
    length: float
    samples: int
    job: str | None
    mean: dict[str, float]
    minimum: dict[str, float]
    maximum: dict[str, float]


@dataclass
class Series:
    """One series of a job as columns (``array('d')``), in time order; NaN where a window lacks a metric."""

    cluster: str
    node: str
    entity: str
    source: str
    ts: array[float] = field(default_factory=lambda: array("d"))
    length: array[float] = field(default_factory=lambda: array("d"))
    samples: array[int] = field(default_factory=lambda: array("q"))
    mean: dict[str, array[float]] = field(default_factory=dict)
    minimum: dict[str, array[float]] = field(default_factory=dict)
    maximum: dict[str, array[float]] = field(default_factory=dict)

    def reorder(self, order: list[int]) -> None:
        self.ts = array("d", (self.ts[i] for i in order))
        self.length = array("d", (self.length[i] for i in order))
        self.samples = array("q", (self.samples[i] for i in order))
        for columns in (self.mean, self.minimum, self.maximum):
            for name, column in columns.items():
                columns[name] = array("d", (column[i] for i in order))


@dataclass(frozen=True)
class Current:
    """The latest window of one entity, for ``/metrics``."""

    cluster: str
    node: str
    entity: str
    source: str
    ts: float
    received: float
    job: str | None
    mean: dict[str, float]


def default_path(store_path: str) -> str:
    """``/var/lib/vetd/controller.db`` → ``/var/lib/vetd/controller.telemetry.db`` (``:memory:`` stays so)."""
    if store_path == ":memory:":
        return store_path
    path = Path(store_path)
    return str(path.with_name(f"{path.stem}.telemetry.db"))


class TelemetryStore:
    """The telemetry database: the controller writes it, ``vetd export`` and ``vetd job report`` read it."""

    def __init__(self, path: Path | str, *, readonly: bool = False, counters: Counters | None = None) -> None:
        self.path = Path(path)
        self.counters = counters or Counters()
        if readonly:
            if not self.path.exists():
                raise FileNotFoundError(f"no vetd telemetry database at {self.path}")
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10)
        else:
            if str(path) != ":memory:":
                self.path.parent.mkdir(parents=True, exist_ok=True)
                create_private(self.path)
            self.db = sqlite3.connect(str(path), timeout=10, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
        found = int(self.db.execute("PRAGMA user_version").fetchone()[0])
        if found > SCHEMA_VERSION:
            self.db.close()
            raise ConfigError(f"{self.path}: telemetry schema version {found} is newer than this vetd knows "
                              f"({SCHEMA_VERSION}); use the vetd that wrote it, or a newer one")
        if not readonly and found < SCHEMA_VERSION:
            self.db.execute("BEGIN IMMEDIATE")
            for statement in (part.strip() for part in SCHEMA.split(";")):
                if statement:
                    self.db.execute(statement)
            self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self.db.execute("COMMIT")
        self._series: dict[tuple[str, str, str, str], int] = {}
        self._series_per_node: dict[tuple[str, str], int] = {}
        self._names: dict[str, int] = {}
        self._name_of: dict[int, str] = {}
        self._key_of: dict[int, tuple[str, str, str, str]] = {}
        self._load_names()
        #: The latest window of each (cluster, node, entity, source): ``/metrics`` reads it.
        self.latest: dict[tuple[str, str, str, str], Current] = {}

    def close(self) -> None:
        self.db.close()

    def _load_names(self) -> None:
        try:
            for number, name in self.db.execute("SELECT id, name FROM metric_names"):
                self._names[name], self._name_of[number] = number, name
            for number, cluster, node, entity, source in self.db.execute(
                    "SELECT id, cluster, node, entity, source FROM series"):
                self._series[(cluster, node, entity, source)] = number
                self._key_of[number] = (cluster, node, entity, source)
                self._series_per_node[(cluster, node)] = self._series_per_node.get((cluster, node), 0) + 1
        except sqlite3.OperationalError:  # read-only, before the controller made the tables
            pass

    # -- writing -----------------------------------------------------------

    def add(self, messages: Iterable[Message], now: float) -> int:
        """Store the telemetry windows among ``messages`` (one transaction); returns how many were new.

        A single sample (``window_s`` 0, the older sources) is counted (``telemetry_samples``) and not
        stored; a window seen before is a duplicate (``telemetry_duplicates``).
        """
        rows = []
        for message in messages:
            if not isinstance(message, Telemetry):
                continue
            if not message.window_s:
                self.counters.count("telemetry_samples")
                continue
            series = self._series_id(message)
            if series is None:
                continue
            key = (message.cluster, message.node, message.entity, message.source)
            held = self.latest.get(key)
            if held is None or message.ts >= held.ts:  # a late or repeated window is not the latest
                self.latest[key] = Current(message.cluster, message.node, message.entity, message.source,
                                           message.ts, now, message.job_id, dict(message.metrics))
            rows.append((series, message.ts, message.window_s, message.samples, message.job_id or None,
                         self._encode(message.metrics, message.min, message.max)))
        if not rows:
            return 0
        self.db.execute("BEGIN IMMEDIATE")
        try:
            stored = sum(self.db.execute("INSERT OR IGNORE INTO windows (series, ts, length, samples, job, data) "
                                         "VALUES (?,?,?,?,?,?)", row).rowcount for row in rows)
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
        self.counters.count("telemetry_windows", stored)
        self.counters.count("telemetry_duplicates", len(rows) - stored)
        return stored

    def _series_id(self, message: Telemetry) -> int | None:
        key = (message.cluster, message.node, message.entity, message.source)
        number = self._series.get(key)
        if number is not None:
            return number
        node = (message.cluster, message.node)
        if self._series_per_node.get(node, 0) >= MAX_SERIES_PER_NODE:
            self.counters.count("telemetry_series_limit")
            return None
        cursor = self.db.execute("INSERT INTO series (cluster, node, entity, source) VALUES (?,?,?,?)", key)
        number = self._series[key] = int(cursor.lastrowid or 0)
        self._key_of[number] = key
        self._series_per_node[node] = self._series_per_node.get(node, 0) + 1
        return number

    def _name_id(self, name: str) -> int | None:
        number = self._names.get(name)
        if number is None:
            if len(self._names) >= MAX_METRIC_NAMES:
                self.counters.count("telemetry_metric_limit")
                return None
            cursor = self.db.execute("INSERT INTO metric_names (name) VALUES (?)", (name,))
            number = self._names[name] = int(cursor.lastrowid or 0)
            self._name_of[number] = name
        return number

    def _encode(self, mean: dict[str, float], low: dict[str, float], high: dict[str, float]) -> bytes:
        """``[[metric, mean], [metric, mean, min, max], …]`` in hundredths (min = max: the mean alone)."""
        items = []
        for name, value in mean.items():
            number = self._name_id(name)
            if number is None:
                continue
            center = _fixed(value)
            lowest, highest = _fixed(low.get(name, value)), _fixed(high.get(name, value))
            items.append([number, center] if lowest == highest == center else [number, center, lowest, highest])
        return _encoder.encode(items)

    def _decode(self, data: bytes) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
        mean, low, high = {}, {}, {}
        for item in _decoder.decode(data):
            name = self._name_of.get(item[0])
            if name is None:
                continue
            mean[name] = item[1] / SCALE
            low[name] = (item[2] if len(item) > 2 else item[1]) / SCALE
            high[name] = (item[3] if len(item) > 3 else item[1]) / SCALE
        return mean, low, high

    # -- packing, roll-up and retention -----------------------------------------

    def tick(self, now: float, *, keep_nodes: float, keep_jobs: float, resolution: float, late: float) -> dict[str, int]:
        """Pack and roll up the node buckets that closed more than ``late`` ago, then delete what is
        past its keep; bounded work (:data:`TICK_ROWS`, :data:`TICK_BUCKETS`). Returns counts by what was done."""
        done = {"rolled_up": 0, "packed": 0, "late": 0, "chunks_deleted": 0, "rollups_deleted": 0}
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self._roll_up(now - late, resolution, done)
            if keep_jobs:
                ids = self.db.execute("SELECT id FROM chunks WHERE until < ? LIMIT ?",
                                      (now - keep_jobs, TICK_ROWS)).fetchall()
                self.db.executemany("DELETE FROM chunks WHERE id=?", ids)
                done["chunks_deleted"] = len(ids)
            if keep_nodes:
                keys = self.db.execute("SELECT series, ts FROM rollups WHERE ts < ? LIMIT ?",
                                       (now - keep_nodes, TICK_ROWS)).fetchall()
                self.db.executemany("DELETE FROM rollups WHERE series=? AND ts=?", keys)
                done["rollups_deleted"] = len(keys)
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
        return done

    def _watermark(self) -> float | None:
        row = self.db.execute("SELECT value FROM meta WHERE key='rolled_until'").fetchone()
        return None if row is None else float(row[0])

    def _roll_up(self, until: float, resolution: float, done: dict[str, int]) -> None:
        """Each closed bucket after the watermark: its windows folded per series into a rollup, a
        job's packed into a chunk, then deleted; windows that came after their bucket closed: a
        job's packed, the others dropped (counted ``late``)."""
        watermark = self._watermark()
        if watermark is None:
            first = self.db.execute("SELECT min(ts) FROM windows").fetchone()[0]
            if first is None:
                return
            watermark = math.floor(first / resolution) * resolution
        stragglers = self._rows("ts < ?", (watermark,))
        if stragglers:
            done["packed"] += self._pack_jobs(stragglers)
            done["late"] += sum(1 for row in stragglers if row[4] is None)
            self.counters.count("telemetry_late", done["late"])
            self.db.execute("DELETE FROM windows WHERE ts < ?", (watermark,))
        buckets = 0
        while watermark + resolution <= until and done["rolled_up"] < TICK_ROWS and buckets < TICK_BUCKETS:
            buckets += 1
            bucket_end = watermark + resolution
            rows = self._rows("ts >= ? AND ts < ?", (watermark, bucket_end))
            by_series: dict[int, list[tuple[Any, ...]]] = {}
            for row in rows:
                by_series.setdefault(row[0], []).append(row)
            for series, windows in by_series.items():
                samples, data = self._fold(windows)
                self.db.execute("INSERT OR REPLACE INTO rollups (series, ts, length, samples, data) VALUES (?,?,?,?,?)",
                                (series, watermark, resolution, samples, data))
                done["rolled_up"] += 1
            done["packed"] += self._pack_jobs(rows)
            self.db.execute("DELETE FROM windows WHERE ts >= ? AND ts < ?", (watermark, bucket_end))
            watermark = bucket_end
            self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('rolled_until', ?)", (watermark,))

    def _rows(self, where: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """``(series, ts, length, samples, job, data)`` of the hot windows matching ``where``, by series and time."""
        return self.db.execute(f"SELECT series, ts, length, samples, job, data FROM windows WHERE {where} "
                               "ORDER BY series, ts", args).fetchall()

    def _pack_jobs(self, rows: Sequence[tuple[Any, ...]]) -> int:
        """The job windows among ``rows`` into one compressed chunk per series and job; returns the chunks made."""
        groups: dict[tuple[int, str], list[tuple[Any, ...]]] = {}
        for row in rows:
            if row[4] is not None:
                groups.setdefault((row[0], row[4]), []).append(row)
        for (series, job), windows in groups.items():
            self.db.execute("INSERT INTO chunks (series, ts, until, job, windows, data) VALUES (?,?,?,?,?,?)",
                            (series, windows[0][1], max(w[1] + w[2] for w in windows), job, len(windows),
                             _pack(windows)))
        return len(groups)

    @staticmethod
    def _fold(windows: Sequence[tuple[Any, ...]]) -> tuple[int, bytes]:
        """One row for several windows: means weighted by their samples, min of minima, max of maxima."""
        weight: dict[int, float] = {}
        total: dict[int, float] = {}
        low: dict[int, int] = {}
        high: dict[int, int] = {}
        for window in windows:
            n = max(1, window[3])
            for item in _decoder.decode(window[5]):
                number, center = item[0], item[1]
                weight[number] = weight.get(number, 0) + n
                total[number] = total.get(number, 0.0) + center * n
                lowest = item[2] if len(item) > 2 else center
                highest = item[3] if len(item) > 3 else center
                low[number] = min(low.get(number, lowest), lowest)
                high[number] = max(high.get(number, highest), highest)
        items = []
        for number in total:
            center = round(total[number] / weight[number])
            items.append([number, center] if low[number] == high[number] == center
                         else [number, center, low[number], high[number]])
        return sum(max(1, w[3]) for w in windows), _encoder.encode(items)

    # -- reading -----------------------------------------------------------

    def job_series(self, job: str, cluster: str | None = None, extremes: Sequence[str] = (),
                   series: int | None = None) -> list[Series]:
        """Every series (node, entity, source) of ``job`` as columns, each in time order (only the series
        numbered ``series``, if given): the means of every metric, the minima and maxima of ``extremes``
        only (what a report of a 24 h job on 64 GPUs can hold)."""
        blocks: dict[tuple[str, str, str, str], list[Block]] = {}
        query = ("SELECT s.cluster, s.node, s.entity, s.source, c.data FROM chunks c JOIN series s ON s.id = c.series "
                 "WHERE c.job = ? AND (? IS NULL OR s.cluster = ?) AND (? IS NULL OR c.series = ?)")
        for cluster_, node, entity, source, data in self.db.execute(query, (job, cluster, cluster, series, series)):
            blocks.setdefault((cluster_, node, entity, source), []).append(_unpack(data))
        query = ("SELECT s.cluster, s.node, s.entity, s.source, w.ts, w.length, w.samples, w.data "
                 "FROM windows w JOIN series s ON s.id = w.series WHERE w.job = ? AND (? IS NULL OR s.cluster = ?) "
                 "AND (? IS NULL OR w.series = ?)")
        for cluster_, node, entity, source, ts, length, samples, data in self.db.execute(
                query, (job, cluster, cluster, series, series)):
            blocks.setdefault((cluster_, node, entity, source), []).append(_block(ts, length, samples, data))
        return [self._columns(key, found, extremes) for key, found in sorted(blocks.items())]

    def _columns(self, key: tuple[str, str, str, str], blocks: list[Block], extremes: Sequence[str]) -> Series:
        blocks.sort(key=lambda block: block[0][0] if block[0] else 0.0)
        series = Series(*key)
        numbers = {number for block in blocks for number in block[3]}
        names = {number: self._name_of[number] for number in numbers if number in self._name_of}
        wanted = {number for number, name in names.items() if name in extremes}
        for ts, length, samples, columns in blocks:
            size, offset = len(ts), len(series.ts)
            series.ts.extend(ts)
            series.length.extend(length)
            series.samples.extend(samples)
            for number, name in names.items():
                column = columns.get(number)
                means, lowest, highest = (_grown(series.mean, name, offset), _grown(series.minimum, name, offset),
                                          _grown(series.maximum, name, offset)) if number in wanted else (
                    _grown(series.mean, name, offset), None, None)
                if column is None:
                    for each in (means, lowest, highest):
                        if each is not None:
                            each.extend([NAN] * size)
                    continue
                present, centers, lows, highs = column
                means.extend(_spread(present, list(map(_UNSCALE, centers)), size))
                if lowest is not None and highest is not None:
                    lowest.extend(_spread(present, list(map(_UNSCALE, map(operator.sub, centers, lows))), size))
                    highest.extend(_spread(present, list(map(_UNSCALE, map(operator.add, centers, highs))), size))
        if any(later < earlier for earlier, later in itertools.pairwise(series.ts)):  # late windows packed apart
            order = sorted(range(len(series.ts)), key=series.ts.__getitem__)
            series.reorder(order)
        return series

    def job_windows(self, job: str, cluster: str | None = None) -> Iterator[StoredWindow]:
        """Every window of ``job``, series by series (node, entity), each in time order; one series
        in memory at a time."""
        numbers = sorted({row[0] for row in self.db.execute(
            "SELECT DISTINCT series FROM chunks WHERE job = ? UNION SELECT DISTINCT series FROM windows WHERE job = ?",
            (job, job))}, key=lambda number: self._key_of.get(number, ("", "", "", "")))
        for series in (one for number in numbers
                       for one in self.job_series(job, cluster, extremes=tuple(self._names), series=number)):
            for i in range(len(series.ts)):
                mean = {name: column[i] for name, column in series.mean.items() if not math.isnan(column[i])}
                yield StoredWindow(series.cluster, series.node, series.entity, series.source, series.ts[i],
                                   series.length[i], int(series.samples[i]), job, mean,
                                   {name: series.minimum[name][i] for name in mean},
                                   {name: series.maximum[name][i] for name in mean})

    def node_windows(self, since: float, until: float, node: str | None = None,
                     cluster: str | None = None) -> Iterator[StoredWindow]:
        """Rolled-up node history (``node_resolution``) between ``since`` and ``until``, oldest first."""
        query = ("SELECT s.cluster, s.node, s.entity, s.source, r.ts, r.length, r.samples, NULL, r.data "
                 "FROM rollups r JOIN series s ON s.id = r.series WHERE r.ts >= ? AND r.ts < ? "
                 "AND (? IS NULL OR s.node = ?) AND (? IS NULL OR s.cluster = ?) ORDER BY r.ts, s.node, s.entity")
        for row in self.db.execute(query, (since, until, node, node, cluster, cluster)):
            yield self._window(row)

    def _window(self, row: Sequence[Any]) -> StoredWindow:
        mean, low, high = self._decode(row[8])
        return StoredWindow(cluster=row[0], node=row[1], entity=row[2], source=row[3], ts=row[4], length=row[5],
                            samples=row[6], job=row[7], mean=mean, minimum=low, maximum=high)

    def current(self, now: float, max_age: float) -> list[Current]:
        """The latest window of every entity that arrived within ``max_age``."""
        return [c for c in self.latest.values() if now - c.received <= max_age]

    def size(self) -> dict[str, int]:
        """Rows per table and bytes of the database file (after a checkpoint of the WAL)."""
        counts = {table: int(self.db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
                  for table in ("series", "windows", "chunks", "rollups")}
        page_size = int(self.db.execute("PRAGMA page_size").fetchone()[0])
        pages = int(self.db.execute("PRAGMA page_count").fetchone()[0])
        free = int(self.db.execute("PRAGMA freelist_count").fetchone()[0])
        return {**counts, "bytes": page_size * (pages - free)}


def _fixed(value: float) -> int:
    scaled = value * SCALE
    return round(scaled) if math.isfinite(scaled) and abs(scaled) < 2**62 else 0


#: A chunk (or one window) as columns: starts, lengths, sample counts, and per metric number
#: (the indices of the windows that have it, None: all; then its means, and how far its minima
#: and maxima lie below and above them, in tenths).
Block = tuple[list[float], list[float], list[int], dict[int, tuple[list[int] | None, list[int], list[int], list[int]]]]


def _deltas(values: Sequence[int]) -> list[int]:
    return [values[0], *(b - a for a, b in itertools.pairwise(values))] if values else []


def _pack(rows: Sequence[tuple[Any, ...]]) -> bytes:
    """Windows ``(series, ts, length, samples, job, data)`` of one series as a compressed chunk: columns
    (start, length and sample count, then per metric its means and how far its min and max lie from
    them), each delta-coded, in MessagePack, zlib-compressed: about a quarter of the windows' own size."""
    columns: dict[int, tuple[list[int], list[int], list[int], list[int]]] = {}
    for i, row in enumerate(rows):
        for item in _decoder.decode(row[5]):
            center = item[1]
            present, centers, lows, highs = columns.setdefault(item[0], ([], [], [], []))
            present.append(i)
            centers.append(center)
            lows.append(center - (item[2] if len(item) > 2 else center))
            highs.append((item[3] if len(item) > 3 else center) - center)
    metrics = [[number, None if len(present) == len(rows) else _deltas(present), _deltas(centers), _deltas(lows),
                _deltas(highs)] for number, (present, centers, lows, highs) in columns.items()]
    payload = [_deltas([round(row[1] * 1000) for row in rows]), _deltas([round(row[2] * 1000) for row in rows]),
               _deltas([int(row[3]) for row in rows]), metrics]
    return zlib.compress(_encoder.encode(payload), 6)


_chunk_decoder = msgspec.msgpack.Decoder()


def _unpack(data: bytes) -> Block:
    starts, lengths, samples, metrics = _chunk_decoder.decode(zlib.decompress(data))
    columns = {number: (None if present is None else list(itertools.accumulate(present)),
                        list(itertools.accumulate(centers)), list(itertools.accumulate(lows)),
                        list(itertools.accumulate(highs)))
               for number, present, centers, lows, highs in metrics}
    return ([t / 1000 for t in itertools.accumulate(starts)], [t / 1000 for t in itertools.accumulate(lengths)],
            list(itertools.accumulate(samples)), columns)


def _block(ts: float, length: float, samples: int, data: bytes) -> Block:
    """One window not packed yet, as a block of one."""
    columns: dict[int, tuple[list[int] | None, list[int], list[int], list[int]]] = {}
    for item in _decoder.decode(data):
        center = item[1]
        columns[item[0]] = (None, [center], [center - (item[2] if len(item) > 2 else center)],
                            [(item[3] if len(item) > 3 else center) - center])
    return [ts], [length], [samples], columns


def _grown(columns: dict[str, array[float]], name: str, offset: int) -> array[float]:
    """``columns[name]``, made (NaN up to ``offset``: windows before the metric appeared) if new."""
    column = columns.get(name)
    if column is None:
        column = columns[name] = array("d", [NAN] * offset)
    return column


def _spread(present: list[int] | None, values: list[float], size: int) -> list[float]:
    """``values`` at the ``present`` indices of ``size`` (None: all of them), NaN elsewhere."""
    if present is None:
        return values
    out = [NAN] * size
    for index, value in zip(present, values, strict=True):
        out[index] = value
    return out
