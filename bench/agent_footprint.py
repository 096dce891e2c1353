"""Agent memory and CPU: RSS after start and after N minutes, CPU per cycle.

A cycle is one round of every periodic check at the 1 s interval (and the
telemetry plugin's samples, 1 s, windows of 10 s); the cycles are counted, not assumed: the ``host_memory``
results the broker saw in the window. CPU per cycle = the agent's user+system
CPU over the window divided by those cycles. Checked first: each host check
ran as often as host_memory, and the agent kept close to its 1 s interval.
Figures go to bench/results/agent_footprint.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import verify, write_results
from tests.support.procs import VetdProcess, Watcher, vetd_env
from tests.support.services import Mosquitto
from tests.support.wait import wait_for
from vetd.core.protocol import Result

HOST_CHECKS = ("host_memory", "host_disk", "host_env", "host_paths", "host_load")


def runs(watcher: Watcher, check: str) -> int:
    """Runs of ``check`` seen: its results divided by the entities it reports on (host_disk: one a mount)."""
    results = watcher.select(lambda m: isinstance(m, Result) and m.check == check)
    return len(results) // max(1, len({r.entity for r in results}))  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=5.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = Mosquitto(work / "mosquitto").start()
        config = work / "agent.toml"
        config.write_text('[agent]\ninterval = "1s"\ntelemetry_interval = "1s"\n')
        watcher = Watcher(broker.port, "vetd/v1/bench/#")
        agent = VetdProcess(["agent", "--config", str(config)], work / "agent.log",
                            vetd_env(VETD_BROKER=broker.url, VETD_CLUSTER="bench", VETD_NODE="n1",
                                     VETD_LOG_LEVEL="warning")).start()
        try:
            assert agent.process is not None
            proc = psutil.Process(agent.process.pid)
            wait_for(lambda: len(watcher.messages) >= 6, 30, "first results")
            rss_start = proc.memory_info().rss
            cpu_start = sum(proc.cpu_times()[:2])
            runs_start = {check: runs(watcher, check) for check in HOST_CHECKS}
            t0 = time.monotonic()
            time.sleep(args.minutes * 60)
            elapsed = time.monotonic() - t0
            rss_end = proc.memory_info().rss
            cpu = sum(proc.cpu_times()[:2]) - cpu_start
            ran = {check: runs(watcher, check) - runs_start[check] for check in HOST_CHECKS}
            messages = len(watcher.messages)
        finally:
            agent.stop()
            watcher.close()
            broker.stop()
    cycles = ran["host_memory"]
    verify(all(abs(n - cycles) <= 1 for n in ran.values()), f"each host check ran once a cycle: {ran}")
    verify(cycles >= 0.9 * elapsed, f"{cycles} cycles in {elapsed:.0f} s at a 1 s interval")
    figures = {"rss_start_mib": round(rss_start / 2**20, 1), "rss_end_mib": round(rss_end / 2**20, 1),
               "cpu_s": round(cpu, 2), "window_s": round(elapsed, 1), "cycles": cycles,
               "cpu_ms_per_cycle": round(1000 * cpu / cycles, 2), "messages": messages}
    path = write_results("agent_footprint", figures, minutes=args.minutes, interval_s=1.0)
    print(f"agent RSS after start:        {rss_start / 2**20:.1f} MiB")
    print(f"agent RSS after {args.minutes:g} min:        {rss_end / 2**20:.1f} MiB")
    print(f"agent CPU over the window:    {cpu:.2f} s in {elapsed:.0f} s ({100 * cpu / elapsed:.2f} % of a core)")
    print(f"cycles counted:               {cycles} in {elapsed:.0f} s")
    print(f"agent CPU per cycle:          {1000 * cpu / cycles:.2f} ms (5 host checks + the telemetry plugin's samples)")
    print(f"messages seen on the broker:  {messages}; figures in {path}")


if __name__ == "__main__":
    main()
