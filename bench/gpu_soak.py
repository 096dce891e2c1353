"""The agent under the real driver, idle and while a GEMM loop keeps the GPU busy.

A real Mosquitto, a real ``vetd agent`` (``gpu_health`` from NVML, every
check and telemetry at 1 s) and a subscriber that keeps what the agent
publishes. Three phases: idle, ``--stress`` seconds of a CuPy matrix-product
loop in a process of its own, then cooling down. Prints, per phase, the
agent's RSS and CPU, and the medians of what vetd reported for the GPU
(utilisation, power, SM and memory clocks, temperature) from its telemetry
and its ``gpu_health`` results, beside ``nvidia-smi``'s reading of the same
moment; ``--json F`` keeps all of it (samples included).

    python bench/gpu_soak.py --idle 40 --stress 60 --cool 30 --json h200.soak.json

Needs mosquitto, CuPy (for the stress) and nvidia-ml-py. Without an NVIDIA
driver the agent reads the H200's capture through the simulated library
(``--scenario F`` another source), and the stress phase is ``skip`` with
why: that much runs anywhere. Checked before any figure: the agent exited
0; in every phase it sent ``gpu_health`` verdicts and ``gpu`` telemetry at
its 1 s interval (at least a third of the seconds); the stress, when it ran,
measured a GEMM rate and vetd saw the GPU busy (utilisation median ≥ 50 %).
Writes ``bench/results/gpu_soak.json`` (the per-second samples only to ``--json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import no_gpu_driver, verify, write_results
from tests.support.procs import VetdProcess, Watcher, vetd_env
from tests.support.services import Mosquitto
from tests.support.wait import wait_for
from vetd.core.protocol import Result, Telemetry

#: What vetd reports for a GPU that a GEMM loop should move.
WATCHED = ("utilization_pct", "power_w", "clock_sm_mhz", "clock_memory_mhz", "temp_c")
SMI_QUERY = "utilization.gpu,power.draw,clocks.sm,clocks.mem,temperature.gpu"


def gemm(seconds: float, size: int, dtype: str) -> None:
    """Matrix products back to back for ``seconds``; prints the rate measured with CUDA events."""
    import cupy

    a = cupy.random.random((size, size), dtype=cupy.float32).astype(dtype)
    b = cupy.random.random((size, size), dtype=cupy.float32).astype(dtype)
    c = a @ b
    cupy.cuda.Device().synchronize()
    flops = 2.0 * size**3
    rates = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        for _ in range(20):
            cupy.matmul(a, b, out=c)
        end.record()
        end.synchronize()
        rates.append(20 * flops / (cupy.cuda.get_elapsed_time(start, end) / 1e3) / 1e12)
    print(json.dumps({"gemm_tflops_median": statistics.median(rates), "gemm_tflops_max": max(rates),
                      "batches": len(rates), "size": size, "dtype": dtype}), flush=True)


def smi() -> dict[str, float]:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={SMI_QUERY}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, check=True, timeout=20).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return {}
    values = {}
    for key, text in zip(("utilization_pct", "power_w", "clock_sm_mhz", "clock_memory_mhz", "temp_c"),
                         out.split(","), strict=False):
        try:
            values[key] = float(text)
        except ValueError:
            continue
    return values


#: GPM metrics (Hopper and later) read beside the agent, for the saturation score to come.
GPM_METRICS = ("GRAPHICS_UTIL", "SM_UTIL", "SM_OCCUPANCY", "ANY_TENSOR_UTIL", "DRAM_BW_UTIL", "FP16_UTIL",
               "FP32_UTIL")


def gpm(seconds: float = 1.0) -> dict[str, Any]:
    """GPU performance metrics over ``seconds`` on GPU 0, each as NVML answered (a value or an error)."""
    try:
        import pynvml as n

        n.nvmlInit()
        handle = n.nvmlDeviceGetHandleByIndex(0)
        if not n.nvmlGpmQueryDeviceSupport(handle).isSupportedDevice:
            return {"error": "GPM not supported on this GPU"}
        first, second = n.nvmlGpmSampleAlloc(), n.nvmlGpmSampleAlloc()
        try:
            n.nvmlGpmSampleGet(handle, first)
            time.sleep(seconds)
            n.nvmlGpmSampleGet(handle, second)
            request = n.c_nvmlGpmMetricsGet_t()
            request.version = n.NVML_GPM_METRICS_GET_VERSION
            request.numMetrics = len(GPM_METRICS)
            request.sample1, request.sample2 = first, second
            for i, name in enumerate(GPM_METRICS):
                request.metrics[i].metricId = getattr(n, f"NVML_GPM_METRIC_{name}")
            n.nvmlGpmMetricsGet(request)
            return {name.lower(): (round(request.metrics[i].value, 2) if request.metrics[i].nvmlReturn == 0
                                   else f"error {request.metrics[i].nvmlReturn}")
                    for i, name in enumerate(GPM_METRICS)}
        finally:
            n.nvmlGpmSampleFree(first)
            n.nvmlGpmSampleFree(second)
    except Exception as exc:  # noqa: BLE001 - a reading beside the bench: its failure is reported, not fatal
        return {"error": f"{type(exc).__name__}: {exc}"}


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


CAPTURE = Path(__file__).resolve().parents[1] / "tests" / "data" / "nvidia-smi" / "h200.xml"


def no_stress(source: str) -> str:
    """Why the GEMM stress cannot run here; empty when it can."""
    if source != "nvml":
        return f"no GPU to load: the agent reads {source}"
    try:
        import cupy  # noqa: F401
    except ImportError:
        return "CuPy is not installed"
    return ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle", type=float, default=40.0)
    parser.add_argument("--stress", type=float, default=60.0)
    parser.add_argument("--cool", type=float, default=30.0)
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--scenario", type=Path, help="no GPU: the agent reads this scenario through the "
                        "simulated libnvidia-ml (tries this bench; the stress then moves nothing)")
    parser.add_argument("--gemm", type=float, metavar="SECONDS", help=argparse.SUPPRESS)  # the stress process
    args = parser.parse_args()
    if args.gemm is not None:
        gemm(args.gemm, args.size, args.dtype)
        return 0

    samples: list[dict[str, Any]] = []
    phases: list[tuple[str, float, float]] = []
    stress_out = ""
    driver_missing = "" if args.scenario else no_gpu_driver()
    if args.scenario:
        source, table = f"scenario {args.scenario.name}", (
            f'[plugins.gpu_health]\nsource = "scenario"\nscenario = "{args.scenario.resolve()}"\nthrough_nvml = true\n')
    elif driver_missing:
        print(f"driver: skip ({driver_missing}); the agent reads {CAPTURE.name} through the simulated library")
        source, table = f"capture {CAPTURE.name} (simulated library)", (
            f'[plugins.gpu_health]\nsource = "capture"\ncapture = "{CAPTURE}"\nthrough_nvml = true\ntelemetry = true\n')
    else:  # the `gpu` single samples are what it compares with nvidia-smi (off by default)
        source, table = "nvml", "[plugins.gpu_health]\ntelemetry = true\n"
    stress_skipped = no_stress(source)
    if stress_skipped:
        print(f"stress: skip ({stress_skipped})")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = Mosquitto(work / "mosquitto").start()
        config = work / "agent.toml"
        config.write_text('[agent]\ninterval = "1s"\ntelemetry_interval = "1s"\n' + table)
        watcher = Watcher(broker.port, "vetd/v1/soak/#")
        agent = VetdProcess(["agent", "--config", str(config)], work / "agent.log",
                            vetd_env(VETD_BROKER=broker.url, VETD_CLUSTER="soak", VETD_NODE="gpu1",
                                     VETD_LOG_LEVEL="info")).start()
        stop = threading.Event()
        try:
            assert agent.process is not None
            proc = psutil.Process(agent.process.pid)
            wait_for(lambda: watcher.select(lambda m: isinstance(m, Result) and m.check == "gpu_health"), 60,
                     "first gpu_health result")
            t0 = time.monotonic()
            cpu0 = sum(proc.cpu_times()[:2])

            def sample() -> None:
                while not stop.wait(1.0):
                    samples.append({"t": round(time.monotonic() - t0, 2), "rss_mib": proc.memory_info().rss / 2**20,
                                    "cpu_s": sum(proc.cpu_times()[:2]) - cpu0})

            sampler = threading.Thread(target=sample, name="soak.sampler", daemon=True)
            sampler.start()
            smi_readings: dict[str, dict[str, float]] = {}
            gpm_readings: dict[str, dict[str, Any]] = {}

            def phase(name: str, seconds: float) -> None:
                start = time.monotonic() - t0
                time.sleep(seconds / 2)
                smi_readings[name] = smi()
                gpm_readings[name] = gpm()
                time.sleep(max(0.0, start + seconds - (time.monotonic() - t0)))
                phases.append((name, start, time.monotonic() - t0))

            phase("idle", args.idle)
            if not stress_skipped:
                stress = subprocess.Popen([sys.executable, __file__, "--gemm", str(args.stress), "--size",
                                           str(args.size), "--dtype", args.dtype], stdout=subprocess.PIPE, text=True)
                phase("stress", args.stress)
                stress_out = stress.communicate(timeout=60)[0]
            phase("cool", args.cool)
        finally:
            stop.set()
            code = agent.stop()
            watcher.close()
            broker.stop()
            log = agent.output
    reported: dict[str, dict[str, list[float]]] = {name: {} for name, _, _ in phases}
    statuses: dict[str, int] = {}
    codes: dict[str, dict[str, int]] = {name: {} for name, _, _ in phases}
    for message in watcher.select():
        if not isinstance(message, Result | Telemetry) or message.entity != "gpu0":
            continue
        if isinstance(message, Result):
            statuses[f"{message.check} {message.status}"] = statuses.get(f"{message.check} {message.status}", 0) + 1
            if message.check != "gpu_health":
                continue
        elif message.source != "gpu":
            continue
        when = message.ts - (time.time() - time.monotonic()) - t0
        for name, start, end in phases:
            if start <= when < end:
                if isinstance(message, Result):
                    for each in message.codes or [message.status]:
                        codes[name][each] = codes[name].get(each, 0) + 1
                for key in WATCHED:
                    if key in message.metrics:
                        reported[name].setdefault(key, []).append(message.metrics[key])
    summary: dict[str, Any] = {"source": source, "phases": {}, "statuses": statuses, "agent_exit": code,
                               "stress": json.loads(stress_out.strip().splitlines()[-1]) if stress_out.strip() else
                               {"status": "skip", "why": stress_skipped} if stress_skipped else None}
    if driver_missing:
        summary["driver"] = {"status": "skip", "why": driver_missing}
    print(f"agent exit {code}; results seen (gpu0): {statuses}")
    for name, start, end in phases:
        inside = [s for s in samples if start <= s["t"] < end]
        cpu = (inside[-1]["cpu_s"] - inside[0]["cpu_s"]) / max(1e-9, inside[-1]["t"] - inside[0]["t"]) if len(inside) > 1 else None
        medians = {key: _median(values) for key, values in reported[name].items()}
        summary["phases"][name] = {
            "seconds": round(end - start, 1),
            "agent_rss_mib_max": round(max((s["rss_mib"] for s in inside), default=0.0), 1),
            "agent_cpu_pct": None if cpu is None else round(100 * cpu, 2),
            "vetd_medians": medians, "samples_reported": {k: len(v) for k, v in reported[name].items()},
            "nvidia_smi": smi_readings.get(name, {}),
            "gpm": gpm_readings.get(name, {}),
            "gpu_health_codes": codes[name],
        }
        print(f"{name:6} {end - start:5.0f} s: agent RSS max {summary['phases'][name]['agent_rss_mib_max']} MiB, "
              f"CPU {summary['phases'][name]['agent_cpu_pct']} % of a core; gpu_health {codes[name]}; vetd {medians}; "
              f"nvidia-smi {smi_readings.get(name)}; GPM {gpm_readings.get(name)}")
    print(f"stress: {summary['stress']}")
    if args.json:
        args.json.write_text(json.dumps({**summary, "samples": samples, "agent_log_tail": log.splitlines()[-40:]},
                                        indent=1) + "\n")
    verify(code == 0, f"the agent exited {code}")
    for name, start, end in phases:
        counted = summary["phases"][name]["samples_reported"]
        least = int((end - start) / 3)
        verify(sum(codes[name].values()) >= least, f"{name}: {sum(codes[name].values())} gpu_health verdicts in "
               f"{end - start:.0f} s at a 1 s interval")
        verify(counted.get("utilization_pct", 0) >= least, f"{name}: {counted} GPU readings in {end - start:.0f} s")
    if not stress_skipped:
        verify(summary["stress"] and summary["stress"].get("batches"), f"the stress measured nothing: {stress_out!r}")
        busy = summary["phases"]["stress"]["vetd_medians"].get("utilization_pct") or 0
        verify(busy >= 50, f"vetd saw the GPU {busy} % busy under the GEMM loop")
    print(f"written to {write_results('gpu_soak', summary, idle_s=args.idle, stress_s=args.stress, cool_s=args.cool)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
