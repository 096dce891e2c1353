"""Telemetry windows at the controller: stored per job in full, rolled up per node, pruned, exported."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from tests.support.procs import run_vetd
from vetd.controller.config import load_controller_config
from vetd.controller.service import Controller
from vetd.controller.store import Store
from vetd.controller.telemetry import TelemetryStore, default_path
from vetd.core import protocol
from vetd.core.protocol import Telemetry

DAY = 86400.0


def window(ts: float, entity: str = "gpu0", node: str = "nid001", job: str | None = "42", util: float = 50.0,
           samples: int = 10, cluster: str = "c1", **extra: float) -> Telemetry:
    return Telemetry(cluster=cluster, node=node, session="s", seq=0, ts=ts, source="telemetry_gpu", entity=entity,
                     metrics={"utilization_pct": util, "power_w": 400.123, **extra}, window_s=10.0, samples=samples,
                     min={"utilization_pct": util - 10, "power_w": 400.123}, max={"utilization_pct": util + 10,
                                                                                  "power_w": 400.123}, job_id=job)


def test_windows_come_back_as_stored_to_a_tenth_and_only_once(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path / "t.db")
    sample = Telemetry(cluster="c1", node="nid001", session="s", seq=0, ts=5.0, source="host", metrics={"x": 1.0})
    assert store.add([window(1000.0), window(1010.0, util=97.004), sample], now=1020.0) == 2
    assert store.add([window(1000.0)], now=1021.0) == 0  # the same window again
    assert (store.counters["telemetry_windows"], store.counters["telemetry_duplicates"],
            store.counters["telemetry_samples"]) == (2, 1, 1)
    got = list(store.job_windows("42"))
    assert [(w.ts, w.node, w.entity, w.job, w.samples, w.length) for w in got] == [
        (1000.0, "nid001", "gpu0", "42", 10, 10.0), (1010.0, "nid001", "gpu0", "42", 10, 10.0)]
    assert got[1].mean == {"utilization_pct": 97.0, "power_w": 400.1}
    assert got[1].minimum["utilization_pct"] == 87.0 and got[1].maximum["utilization_pct"] == 107.0
    assert list(store.job_windows("43")) == []
    latest = store.current(now=1030.0, max_age=60.0)
    assert [(c.entity, c.job, c.mean["utilization_pct"]) for c in latest] == [("gpu0", "42", 97.004)]
    assert store.current(now=2000.0, max_age=60.0) == []
    store.close()
    again = TelemetryStore(tmp_path / "t.db", readonly=True)  # names and series come back from the file
    assert [w.mean for w in again.job_windows("42")] == [w.mean for w in got]


def test_node_history_is_rolled_up_and_each_tier_kept_as_long_as_configured(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path / "t.db")
    t0 = 100 * 300.0
    # 5 minutes of windows of a job GPU and of a GPU in no job, then a later bucket still open
    store.add([window(t0 + 10 * i, util=10.0 * i, samples=10) for i in range(30)], now=t0)
    store.add([window(t0 + 10 * i, entity="gpu1", job=None, util=20.0) for i in range(30)], now=t0)
    store.add([window(t0 + 300 + 10 * i, entity="gpu1", job=None) for i in range(3)], now=t0)
    keep = {"keep_nodes": 7 * DAY, "keep_jobs": 90 * DAY, "resolution": 300.0, "late": 60.0}
    before = list(store.job_windows("42"))
    assert len(before) == 30 and before[7].minimum["utilization_pct"] == 60.0
    done = store.tick(t0 + 300 + 60, **keep)
    assert done["rolled_up"] == 2  # one bucket, two series
    rollups = {w.entity: w for w in store.node_windows(0, t0 + 10 * DAY)}
    assert rollups["gpu0"].mean["utilization_pct"] == pytest.approx(sum(10.0 * i for i in range(30)) / 30)
    assert rollups["gpu0"].minimum["utilization_pct"] == -10.0 and rollups["gpu0"].maximum["utilization_pct"] == 300.0
    assert (rollups["gpu0"].samples, rollups["gpu0"].length, rollups["gpu1"].mean["utilization_pct"]) == (
        300, 300.0, 20.0)
    # the job's windows stay in full, packed in a chunk, exactly as they were; the rolled-up windows
    # of no job are gone; the open bucket's wait
    assert list(store.job_windows("42")) == before
    size = store.size()
    assert (size["windows"], size["chunks"], size["rollups"], done["packed"]) == (3, 1, 2, 1)
    # a window arriving after its bucket was rolled up stays only if it belongs to a job
    store.add([window(t0 + 5, entity="gpu2", job=None), window(t0 + 5, entity="gpu3", job="43")], now=t0 + 400)
    assert store.tick(t0 + 400, **keep)["late"] == 1
    assert {w.entity for w in store.node_windows(0, t0 + 10 * DAY)} == {"gpu0", "gpu1"}
    assert [w.entity for w in store.job_windows("43")] == ["gpu3"] and list(store.job_windows("42")) == before
    # past their keeps: rollups after keep_nodes, job windows after keep_jobs
    store.tick(t0 + 8 * DAY, **keep)
    assert list(store.node_windows(0, t0 + 10 * DAY)) == []
    assert list(store.job_windows("42")) == before
    store.tick(t0 + 91 * DAY, **keep)
    assert list(store.job_windows("42")) == [] and list(store.job_windows("43")) == []


def test_a_node_cannot_grow_series_without_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vetd.controller import telemetry

    monkeypatch.setattr(telemetry, "MAX_SERIES_PER_NODE", 3)
    store = TelemetryStore(tmp_path / "t.db")
    assert store.add([window(1000.0, entity=f"gpu{i}") for i in range(5)], now=1.0) == 3
    assert store.counters["telemetry_series_limit"] == 2
    assert store.add([window(1000.0, entity="gpu0", node="nid002")], now=1.0) == 1  # another node: its own


def test_the_controller_keeps_the_windows_of_its_batches(tmp_path: Path) -> None:
    config_path = tmp_path / "controller.toml"
    config_path.write_text('cluster = "c1"\nallow_unsigned_commands = true\n[store]\npath = "state/c.db"\n')
    controller = Controller(load_controller_config(config_path))
    assert controller.telemetry is not None
    assert controller.telemetry.path == tmp_path / "state" / "c.telemetry.db"
    batch = [(protocol.topic_for(m), protocol.encode(m)) for m in (window(1000.0), window(1000.0, cluster="c2"))]
    controller.process(batch, now=1001.0)
    assert [w.ts for w in controller.telemetry.job_windows("42")] == [1000.0]  # the foreign cluster's dropped
    assert controller.counters["telemetry"] == 1


def test_export_writes_a_jobs_windows_as_csv_and_json_lines(tmp_path: Path) -> None:
    config = tmp_path / "controller.toml"
    config.write_text('cluster = "c1"\n[store]\npath = "c.db"\n')
    Store(tmp_path / "c.db").close()
    telemetry = TelemetryStore(default_path(str(tmp_path / "c.db")))
    telemetry.add([window(1000.0), window(1000.0, entity="gpu1", sm_active_pct=12.5), window(1010.0, job="7")],
                  now=1.0)
    telemetry.close()
    done = run_vetd("export", "--telemetry", "--job", "42", "--format", "csv", "--config", str(config))
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    assert [(r["entity"], r["job"], r["time"]) for r in rows] == [("gpu0", "42", "1970-01-01T00:16:40Z"),
                                                                  ("gpu1", "42", "1970-01-01T00:16:40Z")]
    assert list(rows[0])[:12] == ["ts", "time", "cluster", "node", "entity", "source", "job", "window_s", "samples",
                                  "utilization_pct", "utilization_pct_min", "utilization_pct_max"]
    assert (rows[0]["sm_active_pct"], rows[1]["sm_active_pct"], rows[1]["power_w_max"]) == ("", "12.5", "400.1")
    done = run_vetd("export", "--telemetry", "--job", "42", "--config", str(config))
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert lines[0]["mean"] == {"utilization_pct": 50.0, "power_w": 400.1} and lines[0]["window_s"] == 10.0
    assert run_vetd("export", "--telemetry", "--job", "nope", "--config", str(config)).returncode == 1
    wrong = run_vetd("export", "--job", "42", "--config", str(config))
    assert wrong.returncode == 2 and wrong.stderr.strip() == "vetd: --job and --format go with --telemetry"
