"""GPU health: logic cost of one 8-GPU sample, and XID-to-controller latency.

1. CPU time of one full health sample for 8 GPUs from the scenario source
   (snapshot + every health verdict), median over many samples; target ≤ 2 ms.
   On a machine with an NVIDIA GPU, ``--nvml`` also times one NVML snapshot
   and each NVML call class; ``--nvml-sim`` times the NVML code path over the
   simulated library (how many calls one snapshot makes, and their Python cost).
2. XID latency: a scenario fires XIDs; each event's time at the agent
   (``ts``) against its arrival in the controller's store (``received_at``),
   through a real Mosquitto; median and p99.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import contextlib

from bench.record import verify, write_results
from tests.support.procs import VetdProcess, vetd_env
from tests.support.services import Mosquitto
from tests.support.wait import wait_for
from vetd.agent.daemon import RECHECK_SPACING_S
from vetd.controller.store import Store
from vetd.plugins.gpu_health.config import GpuHealthConfig
from vetd.plugins.gpu_health.evaluate import Evaluator
from vetd.plugins.gpu_health.replay import ScenarioSource

RULES = Path(__file__).resolve().parents[1] / "packaging" / "rules" / "default.yaml"


def logic_cost(samples: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.yaml"
        path.write_text("gpus: 8\ntimeline:\n  - {at: 0s, gpu: 3, set: {ecc_volatile_dram_correctable: 5}}\n")
        source = ScenarioSource(str(path))
        evaluator = Evaluator(GpuHealthConfig())
        snap_cpu, eval_cpu = [], []
        for _ in range(samples):
            t0 = time.process_time()
            snapshot = source.snapshot()
            t1 = time.process_time()
            verdict = evaluator.health(snapshot, 8)
            t2 = time.process_time()
            snap_cpu.append(t1 - t0)
            eval_cpu.append(t2 - t1)
    verify(len(snapshot.gpus) == 8, f"the scenario gave {len(snapshot.gpus)} GPUs, not 8")
    verify(len(verdict) > 8, f"{len(verdict)} outcomes: not the count and one per GPU")
    total = [a + b for a, b in zip(snap_cpu, eval_cpu, strict=True)]
    print(f"8-GPU health sample, scenario source, {samples} samples (CPU time):")
    print(f"  snapshot  median {1e3 * statistics.median(snap_cpu):.3f} ms")
    print(f"  verdicts  median {1e3 * statistics.median(eval_cpu):.3f} ms")
    print(f"  total     median {1e3 * statistics.median(total):.3f} ms, "
          f"p99 {1e3 * sorted(total)[int(0.99 * len(total))]:.3f} ms (target <= 2 ms)")
    return {"sample_cpu_ms_median": round(1e3 * statistics.median(total), 3),
            "sample_cpu_ms_p99": round(1e3 * sorted(total)[int(0.99 * len(total))], 3)}


def nvml_cost(samples: int) -> None:
    from vetd.plugins.gpu_health.nvml import NvmlSource

    source = NvmlSource()
    n = source.nvml
    handle = n.nvmlDeviceGetHandleByIndex(0)
    calls = {
        "temperature": lambda: n.nvmlDeviceGetTemperature(handle, n.NVML_TEMPERATURE_GPU),
        "memory info": lambda: n.nvmlDeviceGetMemoryInfo(handle),
        "ecc counter": lambda: n.nvmlDeviceGetMemoryErrorCounter(
            handle, n.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, n.NVML_VOLATILE_ECC, n.NVML_MEMORY_LOCATION_DEVICE_MEMORY),
        "clock reasons": lambda: n.nvmlDeviceGetCurrentClocksEventReasons(handle),
        "pcie link": lambda: n.nvmlDeviceGetCurrPcieLinkGeneration(handle),
        "remapped rows": lambda: n.nvmlDeviceGetRemappedRows(handle),
        "power": lambda: n.nvmlDeviceGetPowerUsage(handle),
        "processes": lambda: n.nvmlDeviceGetComputeRunningProcesses(handle),
        "nvlink state": lambda: n.nvmlDeviceGetNvLinkState(handle, 0),
    }
    print(f"NVML on {n.nvmlDeviceGetCount()} GPU(s), driver {n.nvmlSystemGetDriverVersion()}:")
    for name, call in calls.items():
        times = []
        for _ in range(samples):
            t0 = time.perf_counter()
            with contextlib.suppress(n.NVMLError):
                call()
            times.append(time.perf_counter() - t0)
        print(f"  {name:14} median {1e6 * statistics.median(times):8.1f} us")
    wall, cpu = [], []
    evaluator = Evaluator(GpuHealthConfig())
    for _ in range(max(5, samples // 20)):
        t0, c0 = time.perf_counter(), time.process_time()
        evaluator.health(source.snapshot(), None)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    print(f"  full snapshot + verdicts: wall median {1e3 * statistics.median(wall):.2f} ms, "
          f"CPU median {1e3 * statistics.median(cpu):.2f} ms")


def nvml_sim_cost(samples: int) -> None:
    """The live NVML path's own cost: pynvml and NvmlSource over the simulated library."""
    from vetd.plugins.gpu_health.nvml import NvmlSource
    from vetd.plugins.gpu_health.nvmlsim import SimulatedNvml, install

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.yaml"
        path.write_text("gpus: 8\n")
        scenario = ScenarioSource(str(path))
        simulation = SimulatedNvml.of(scenario)
        restore = install(simulation)
        try:
            source = NvmlSource(expected=lambda: 8, process_names=False)
            first_calls, w0 = simulation.calls, time.perf_counter()
            source.snapshot()  # probes which NVLinks answer
            first_wall, first_calls = time.perf_counter() - w0, simulation.calls - first_calls
            direct_cpu, cpu, wall, calls = [], [], [], []
            for _ in range(samples):
                c0 = time.process_time()
                scenario.snapshot()
                direct_cpu.append(time.process_time() - c0)
                before = simulation.calls
                c0, w0 = time.process_time(), time.perf_counter()
                source.snapshot()
                cpu.append(time.process_time() - c0)
                wall.append(time.perf_counter() - w0)
                calls.append(simulation.calls - before)
        finally:
            restore()
    per_call = [(c - d) / n for c, d, n in zip(cpu, direct_cpu, calls, strict=True)]
    print(f"8-GPU NVML snapshot through the simulated libnvidia-ml, {samples} samples (CPU time):")
    print(f"  {statistics.median(calls):.0f} NVML calls per snapshot; "
          f"snapshot median {1e3 * statistics.median(cpu):.2f} ms "
          f"(pynvml + NvmlSource + simulation; a real driver's time replaces the simulation's), "
          f"wall median {1e3 * statistics.median(wall):.2f} ms")
    print(f"  first snapshot (probes every NVLink): {first_calls} NVML calls, wall {1e3 * first_wall:.2f} ms")
    print(f"  about {1e6 * statistics.median(per_call):.1f} us per call once the scenario's own cost is taken off")


def xid_latency(count: int) -> dict[str, Any]:
    """XIDs through a real agent, Mosquitto and controller: event latency, and
    how soon the gpu_health verdict that an XID wakes (EventSource.recheck) follows."""
    xids = [13, 31, 43, 45, 94, 92, 63, 68]
    # XID 79 on gpu7 first (it falls off the bus), then a storm of warning XIDs on the others
    steps = ["  - {at: 1.0s, gpu: 7, xid: 79}", "  - {at: 1.0s, gpu: 7, vanish: true}"]
    steps += [f"  - {{at: {1.1 + 0.1 * i:.1f}s, gpu: {i % 7}, xid: {xids[(i // 7) % len(xids)]}}}"
              for i in range(count - 1)]
    storm_s = 0.1 * (count - 1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = Mosquitto(work / "mosquitto").start()
        (work / "s.yaml").write_text("gpus: 8\ntimeline:\n" + "\n".join(steps) + "\n")
        (work / "controller.toml").write_text(f'cluster = "bench"\nrules = ["{RULES}"]\n[store]\npath = "c.db"\n')
        (work / "agent.toml").write_text(f'[agent]\ninterval = "1h"\n[plugins.gpu_health]\nsource = "scenario"\n'
                                         f'scenario = "{work / "s.yaml"}"\n')
        env = vetd_env(VETD_BROKER=broker.url, VETD_LOG_LEVEL="warning")
        controller = VetdProcess(["controller", "--config", str(work / "controller.toml")], work / "c.log", env).start()
        wait_for((work / "c.db").exists, 20, "controller")
        agent = VetdProcess(["agent", "--config", str(work / "agent.toml")], work / "a.log",
                            vetd_env(VETD_BROKER=broker.url, VETD_CLUSTER="bench", VETD_NODE="n1",
                                     VETD_LOG_LEVEL="warning")).start()

        def rows(where: str) -> list[tuple[float, float, str]]:
            store = Store(work / "c.db", readonly=True)
            try:
                return store.db.execute(f"SELECT ts, received_at, codes FROM history WHERE {where} ORDER BY ts"
                                        ).fetchall()
            except sqlite3.OperationalError:  # the controller has not created its tables yet
                return []
            finally:
                store.close()

        try:
            events = wait_for(lambda: (v := rows("kind='event'")) and len(v) >= count and v, 60 + count,
                              "all XIDs stored", interval=0.5)
            time.sleep(2.0)  # the runs the last XIDs woke
            verdicts = rows("kind='result' AND name='gpu_health' AND entity='node'")
        finally:
            agent.stop()
            controller.stop()
            broker.stop()
    verify(len(events) == count, f"{len(events)} XID events stored of {count}")
    verify(sum("xid_79" in codes for _, _, codes in events) == 1, "the XID 79 stored once")
    values = sorted(received - ts for ts, received, _ in events)
    print(f"XID published -> stored by the controller, {len(values)} events through Mosquitto:")
    print(f"  median {1e3 * statistics.median(values):.1f} ms, p99 {1e3 * values[int(0.99 * (len(values) - 1))]:.1f} ms, "
          f"max {1e3 * values[-1]:.1f} ms (target <= 1000 ms)")
    fatal = next(ts for ts, _, codes in events if "xid_79" in codes)
    missing = next((received for ts, received, codes in verdicts if ts >= fatal and "gpu_missing" in codes), None)
    during = [ts for ts, _, _ in verdicts if fatal <= ts <= fatal + storm_s + 2.0]
    verify(missing is not None, "the XID 79 woke no gpu_health verdict with gpu_missing")
    verify(0 < len(during) <= storm_s / RECHECK_SPACING_S + 2, f"{len(during)} runs woken in {storm_s:.1f} s")
    print("XID 79 -> gpu_health verdict (gpu_missing) stored, interval 1 h: "
          + ("never" if missing is None else f"{1e3 * (missing - fatal):.0f} ms"))
    print(f"  gpu_health runs woken during the {count - 1} warning XIDs over {storm_s:.1f} s: {len(during)} "
          f"(at most one per {RECHECK_SPACING_S:g} s)")
    assert missing is not None
    return {"xid_stored_ms_median": round(1e3 * statistics.median(values), 1),
            "xid_stored_ms_p99": round(1e3 * values[int(0.99 * (len(values) - 1))], 1),
            "xid79_to_verdict_ms": round(1e3 * (missing - fatal)), "runs_woken_in_storm": len(during)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--xids", type=int, default=100)
    parser.add_argument("--nvml", action="store_true", help="also time NVML on this machine's GPUs")
    parser.add_argument("--nvml-sim", action="store_true",
                        help="also time the NVML code path over the simulated libnvidia-ml (no GPU needed)")
    parser.add_argument("--no-xid", action="store_true", help="skip the XID latency run (needs mosquitto)")
    args = parser.parse_args()
    figures = logic_cost(args.samples)
    if args.nvml_sim:
        nvml_sim_cost(max(20, args.samples // 20))
    if args.nvml:
        nvml_cost(args.samples)
    if not args.no_xid:
        figures |= xid_latency(args.xids)
    print(f"written to {write_results('gpu_health', figures, samples=args.samples, xids=0 if args.no_xid else args.xids)}")


if __name__ == "__main__":
    main()
