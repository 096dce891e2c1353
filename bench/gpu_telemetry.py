"""On a GPU node: the telemetry plugin's real NVML/GPM path under a CuPy load, recorded as a fixture.

While a CuPy FP16 matmul loop runs on GPU 0 (``--load`` seconds, then the GPU
idles), the plugin's GPU sampler (:class:`vetd.plugins.telemetry.gpu.GpuSampler`
over the live driver, GPM included) samples every ``--interval`` for
``--seconds``; the agent's window code folds the samples into ``--window``
windows. Written as one JSON file: every sample (values, raw GPM answers, CPU
and wall time of the sample), the windows, the load's phases and rate, the
sampling cost per GPU, and probes of what the driver answers (GPM support,
NVLink throughput fields per link and for all links, PCIe counters, energy,
``nvmlDeviceGetPcieThroughput``). ``tests/plugins/telemetry/test_gpu_fixture.py``
reads it from ``tests/data/telemetry/``.

    python bench/gpu_telemetry.py --out OUT.json [--seconds 20 --load 8 --interval 0.5 --window 2]
    python bench/gpu_telemetry.py --scenario packaging/scenarios/job-8gpu.yaml --out OUT.json   # no GPU: the simulation
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vetd.agent.checks import PluginConfigs
from vetd.agent.telemetry import Windows
from vetd.plugins.gpu_health.config import GpuHealthConfig
from vetd.plugins.telemetry import nvml_source
from vetd.plugins.telemetry.gpu import GpuSampler

LOAD = r"""
import sys, time
import cupy as cp
seconds, size = float(sys.argv[1]), 8192
a = cp.random.rand(size, size, dtype=cp.float32).astype(cp.float16)
b = cp.random.rand(size, size, dtype=cp.float32).astype(cp.float16)
cp.matmul(a, b); cp.cuda.Device().synchronize()
print(f"load_start {time.time():.3f}", flush=True)
start = time.perf_counter(); batches = 0
while time.perf_counter() - start < seconds:
    for _ in range(10):
        cp.matmul(a, b)
    cp.cuda.Device().synchronize(); batches += 10
elapsed = time.perf_counter() - start
print(f"load_end {time.time():.3f} tflops {2 * size**3 * batches / elapsed / 1e12:.1f}", flush=True)
"""


def probes(nvml: Any) -> dict[str, Any]:
    """What this driver answers to the calls and fields the telemetry plugin relies on, on GPU 0."""
    found: dict[str, Any] = {}
    handle = nvml.nvmlDeviceGetHandleByIndex(0)

    def probe(name: str, call: Any) -> None:
        try:
            found[name] = call()
        except Exception as exc:  # noqa: BLE001 - a probe records the driver's answer, whatever it is
            found[name] = f"{type(exc).__name__}: {exc}"

    probe("name", lambda: str(nvml.nvmlDeviceGetName(handle)))
    probe("driver", lambda: str(nvml.nvmlSystemGetDriverVersion()))
    probe("gpm_supported", lambda: int(nvml.nvmlGpmQueryDeviceSupport(handle).isSupportedDevice))
    probe("energy_mj", lambda: int(nvml.nvmlDeviceGetTotalEnergyConsumption(handle)))
    probe("pcie_throughput_tx_kb_s", lambda: int(nvml.nvmlDeviceGetPcieThroughput(handle, nvml.NVML_PCIE_UTIL_TX_BYTES)))

    def fields(requests: list[Any]) -> list[str]:
        from vetd.plugins.gpu_health.nvml import field_value

        return [f"{int(v.fieldId)}/{int(v.scopeId)}: " + (str(field_value(v)) if v.nvmlReturn == 0
                                                         else f"error {int(v.nvmlReturn)}")
                for v in nvml.nvmlDeviceGetFieldValues(handle, requests)]

    counters = [getattr(nvml, n) for n in ("NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "NVML_FI_DEV_PCIE_COUNT_TX_BYTES",
                                           "NVML_FI_DEV_PCIE_COUNT_RX_BYTES") if hasattr(nvml, n)]
    probe("fields_counters", lambda: fields(counters))
    tx = getattr(nvml, "NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX", None)
    if tx is not None:
        probe("fields_nvlink_tx_per_link", lambda: fields([(tx, link) for link in range(18)]))
        probe("fields_nvlink_tx_all_links", lambda: fields([(tx, 0xFFFFFFFF)]))
    return found


def load(seconds: float) -> tuple[subprocess.Popen[str] | None, str]:
    """The CuPy load in a process of its own (its CUDA context is not the sampler's)."""
    try:
        process = subprocess.Popen([sys.executable, "-c", LOAD, str(seconds)], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
    except OSError as exc:
        return None, str(exc)
    return process, ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--load", type=float, default=8.0, help="seconds of matmul at the start (0: none)")
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--window", type=float, default=2.0)
    parser.add_argument("--scenario", help="no GPU: sample this scenario through the simulated NVML (no load)")
    args = parser.parse_args()
    gpu_health = (GpuHealthConfig(source="scenario", scenario=args.scenario, through_nvml=True) if args.scenario
                  else GpuHealthConfig())
    opener = nvml_source(PluginConfigs({"gpu_health": gpu_health}))
    sampler = GpuSampler(opener)
    source = opener()
    with source.session() as nvml:
        found = probes(nvml)
    sampler.sample()  # handles, the NVLink probe, GPM buffers: the one-off first sample
    process, load_error = (None, "scenario: no load") if args.scenario or not args.load else load(args.load)
    windows = Windows(args.window, lambda _entity: None)
    samples: list[dict[str, Any]] = []
    closed: list[dict[str, Any]] = []
    t0 = time.time()
    while time.time() - t0 < args.seconds:
        started = time.monotonic()
        cpu = time.thread_time()
        values = sampler.sample()
        cpu_ms, wall_ms = 1e3 * (time.thread_time() - cpu), 1e3 * (time.monotonic() - started)
        now = time.time()
        if windows.due(now):
            closed += [{"entity": w.entity, "ts": w.started, "window_s": w.length, "samples": w.samples,
                        "mean": w.mean, "min": w.minimum, "max": w.maximum} for w in windows.close()]
        windows.add(values, now)
        samples.append({"t": round(now - t0, 3), "cpu_ms": round(cpu_ms, 3), "wall_ms": round(wall_ms, 3),
                        "values": values, "gpm": {f"gpu{i}": raw for i, raw in sampler.last_gpm.items()}})
        time.sleep(max(0.0, args.interval - (time.monotonic() - started)))
    closed += [{"entity": w.entity, "ts": w.started, "window_s": w.length, "samples": w.samples, "mean": w.mean,
                "min": w.minimum, "max": w.maximum} for w in windows.close()]
    phases: dict[str, Any] = {"error": load_error}
    if process is not None:
        try:
            output, _ = process.communicate(timeout=max(5.0, args.load + 30))
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        phases["output"] = output[-2000:]
        phases["exit"] = process.returncode
        for line in output.splitlines():
            words = line.split()
            if words and words[0] == "load_start":
                phases["start_s"] = round(float(words[1]) - t0, 3)
            elif words and words[0] == "load_end":
                phases["end_s"] = round(float(words[1]) - t0, 3)
                phases["tflops"] = float(words[3])
    gpus = max((len(s["values"]) for s in samples), default=0)
    cpu = [s["cpu_ms"] for s in samples]
    cost = {"gpus": gpus, "cpu_ms_per_sample_median": round(statistics.median(cpu), 3) if cpu else None,
            "cpu_ms_per_gpu_median": round(statistics.median(cpu) / gpus, 3) if cpu and gpus else None,
            "wall_ms_per_sample_median": round(statistics.median(s["wall_ms"] for s in samples), 3) if samples else None,
            "core_pct_at_1s_per_gpu": round(statistics.median(cpu) / gpus / 10, 4) if cpu and gpus else None}
    record = {"source": source.name, "interval_s": args.interval, "window_s": args.window, "seconds": args.seconds,
              "probes": found, "load": phases, "cost": cost, "samples": samples, "windows": closed}
    Path(args.out).write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(f"{len(samples)} samples of {gpus} GPU(s), {len(closed)} windows; sampling {cost['cpu_ms_per_gpu_median']} "
          f"ms CPU per GPU ({cost['core_pct_at_1s_per_gpu']} % of a core at 1 s); load {phases}")
    print(f"probes: {json.dumps(found, default=str)[:1500]}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
