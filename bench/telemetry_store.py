"""Telemetry at the controller: bytes per node-day, a week of 1,000 nodes, ingest rate.

One node-day of 8 GPUs and the host at the plugin's defaults (1 s samples, 10 s
windows) is made the way an agent makes it: each second's values from the
``training`` workload of a scenario (3 % noise, a straggler, an idle GPU), folded
by the agent's own window code, encoded and decoded as on the wire, and stored by
the controller's telemetry store in batches of 1,000 as ingest hands them over.
Measured twice: a day that is all one job (every window kept in full, and rolled
up) and a day in no job (only the 5-minute node history stays). The database is
vacuumed before it is weighed.

    .venv/bin/python bench/telemetry_store.py [--nodes 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import verify, write_results
from vetd.agent.telemetry import Windows
from vetd.controller.telemetry import TelemetryStore
from vetd.core import protocol
from vetd.plugins.gpu_health.workload import Workload, apply_workloads

DAY = 86400
WINDOW = 10.0
WORKLOAD = [Workload(profile="training"), Workload(gpus=[3], profile="training", scale=0.55),
            Workload(gpus=[6], profile="idle")]
#: Simulated snapshot key -> telemetry metric name (the agent's GPU sampler names); bench/job_report.py uses it too.
GPU_KEYS = {"utilization_pct": "utilization_pct", "utilization_memory_pct": "memory_util_pct",
            "sm_active_pct": "sm_active_pct", "sm_occupancy_pct": "sm_occupancy_pct",
            "tensor_active_pct": "tensor_active_pct", "dram_active_pct": "dram_active_pct",
            "fp64_active_pct": "fp64_active_pct", "fp32_active_pct": "fp32_active_pct",
            "fp16_active_pct": "fp16_active_pct", "pcie_tx_mib_s": "pcie_tx_mib_s", "pcie_rx_mib_s": "pcie_rx_mib_s",
            "nvlink_tx_mib_s": "nvlink_tx_mib_s", "nvlink_rx_mib_s": "nvlink_rx_mib_s", "power_w": "power_w",
            "clock_sm_mhz": "clock_sm_mhz"}


def node_day(node: str, job: str | None, start: float) -> list[bytes]:
    """One node's windows over a day, as the agent would publish them (encoded)."""
    windows = Windows(WINDOW, lambda _entity: job)
    payloads: list[bytes] = []
    energy = [0.0] * 8
    for second in range(DAY):
        now = start + second
        if windows.due(now):
            for w in windows.close():
                payloads.append(protocol.encode(protocol.Telemetry(
                    cluster="bench", node=node, session="s", seq=0, ts=w.started,
                    source="telemetry_gpu" if w.entity != "node" else "telemetry_host", entity=w.entity,
                    metrics=w.mean, window_s=w.length, samples=w.samples, min=w.minimum, max=w.maximum,
                    job_id=w.job_id)))
        sample: dict[str, dict[str, float]] = {}
        for gpu in range(8):
            values = apply_workloads(WORKLOAD, gpu, float(second))
            metrics = {name: float(values[key]) for key, name in GPU_KEYS.items() if key in values}
            energy[gpu] += metrics["power_w"]
            metrics |= {"memory_used_mib": float(values.get("memory_used_mib", 0.0)), "clock_memory_mhz": 2619.0,
                        "temp_c": float(values.get("temp_c", 30.0)), "energy_j": energy[gpu],
                        "throttle_power_pct": 0.0, "throttle_thermal_pct": 0.0, "throttle_hw_pct": 0.0}
            metrics["memory_used_pct"] = 100.0 * metrics["memory_used_mib"] / 81559.0
            sample[f"gpu{gpu}"] = metrics
        sample["node"] = {"cpu_pct": 30.0 + (second % 7), "memory_used_pct": 41.5, "load1": 12.0 + (second % 3),
                          "disk_read_mib_s": 5.0 * (second % 5), "disk_write_mib_s": 1.0, "net_rx_mib_s": 800.0,
                          "net_tx_mib_s": 750.0 + second % 11}
        windows.add(sample, now)
    return payloads


def store_day(nodes: int, job: str | None, folder: Path) -> dict[str, Any]:
    start = 1_800_000_000.0
    payloads = [p for n in range(nodes) for p in node_day(f"nid{n:03d}", job and f"{job}{n}", start)]
    messages = [protocol.decode(p) for p in payloads]
    verify(len(messages) >= nodes * 9 * (DAY / WINDOW - 1), f"{len(messages)} windows for {nodes} node-days")
    path = folder / f"{job or 'nojob'}.telemetry.db"
    store = TelemetryStore(path)
    started = time.perf_counter()
    for i in range(0, len(messages), 1000):
        store.add(messages[i:i + 1000], now=start + DAY)
    ingest_s = time.perf_counter() - started
    rolled = 0
    started = time.perf_counter()
    while True:  # the controller's minute ticks, caught up
        done = store.tick(start + DAY + 120, keep_nodes=7 * DAY, keep_jobs=90 * DAY, resolution=300.0, late=60.0)
        rolled += done["rolled_up"]
        if not any(done.values()):
            break
    tick_s = time.perf_counter() - started
    verify(rolled == nodes * 9 * DAY // 300, f"{rolled} rollups for {nodes} node-days of 9 series")
    if job:
        kept = [w for n in range(nodes) for w in store.job_windows(f"{job}{n}")]
        verify(len(kept) == len(messages), f"{len(kept)} of {len(messages)} job windows kept in full")
        first = next(m for m in messages if isinstance(m, protocol.Telemetry) and m.entity == kept[0].entity
                     and m.node == kept[0].node and m.ts == kept[0].ts)
        verify(all(abs(kept[0].mean[k] - v) <= 0.05 + 1e-9 for k, v in first.metrics.items()),
               "a window comes back as sent, to a tenth")
    else:
        verify(store.size()["windows"] == store.size()["chunks"] == 0, "windows of no job are gone once rolled up")
    store.db.execute("VACUUM")
    size = store.size()
    store.close()
    return {"windows": len(messages), "bytes": size["bytes"], "payload_bytes": sum(map(len, payloads)),
            "ingest_windows_per_s": len(messages) / ingest_s, "ingest_s": ingest_s, "tick_s": tick_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=2, help="node-days to store (each measured once)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        in_job = store_day(args.nodes, "job", Path(tmp))
        no_job = store_day(args.nodes, None, Path(tmp))
    per_day_job = in_job["bytes"] / args.nodes
    per_day_idle = no_job["bytes"] / args.nodes
    figures = {
        "windows_per_node_day": in_job["windows"] // args.nodes,
        "wire_bytes_per_window": round(in_job["payload_bytes"] / in_job["windows"]),
        "stored_bytes_per_node_day_in_a_job": round(per_day_job),
        "stored_bytes_per_node_day_in_no_job": round(per_day_idle),
        "stored_bytes_per_window_in_a_job": round(in_job["bytes"] / in_job["windows"]),
        "week_1000_nodes_all_in_jobs_gib": round(7 * 1000 * per_day_job / 2**30, 2),
        "week_1000_nodes_no_jobs_gib": round(7 * 1000 * per_day_idle / 2**30, 3),
        "ingest_windows_per_s": round(in_job["ingest_windows_per_s"]),
        "fleet_1000_nodes_windows_per_s": 1000 * 9 / WINDOW,
        # the controller's work for 1,000 nodes in jobs: storing each window, then packing and rolling up
        "fleet_1000_nodes_controller_core_pct": round(100 * 1000 * (in_job["ingest_s"] + in_job["tick_s"])
                                                      / args.nodes / DAY, 1),
    }
    print(f"one node-day, 8 GPUs + host, 10 s windows: {figures['windows_per_node_day']} windows, "
          f"{figures['wire_bytes_per_window']} bytes each on the wire")
    print(f"  stored, all in a job (full + node history): {per_day_job / 2**20:.1f} MiB "
          f"({figures['stored_bytes_per_window_in_a_job']} bytes a window)")
    print(f"  stored, in no job (node history only):      {per_day_idle / 2**20:.2f} MiB")
    print(f"a week of 1,000 nodes: {figures['week_1000_nodes_all_in_jobs_gib']} GiB if every node runs jobs all "
          f"the time, {figures['week_1000_nodes_no_jobs_gib']} GiB if none does")
    print(f"ingest: {figures['ingest_windows_per_s']} windows/s into the store (1,000 nodes send "
          f"{figures['fleet_1000_nodes_windows_per_s']:.0f}/s); storing, packing and rolling up 1,000 nodes' "
          f"telemetry takes {figures['fleet_1000_nodes_controller_core_pct']} % of a core")
    print(f"wrote {write_results('telemetry_store', figures, nodes=args.nodes, window_s=WINDOW, resolution_s=300)}")


if __name__ == "__main__":
    main()
