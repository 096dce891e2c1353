"""GPU compute and NCCL on the GPUs at hand: TFLOP/s per dtype and GB/s as a % of the published peak.

Runs `vetd check` as an operator would: the ``prolog`` profile (its wall time is
the figure a Slurm prolog pays; CSCS's prolog timeout is 10 s) and then the
``full`` profile, every compute check plus ``nccl_allreduce`` (``--force``: one
rank on a one-GPU machine, a local copy, not a link). Peaks come from the SKU
table (``plugins/gpu_compute/skus.toml``).

Two parts: the GPUs (CuPy; ``skip``, with why, where there is none), and the
same numerics on the CPU (``--array-backend numpy``: checksums, patterns,
bandwidth arithmetic). Checked before any figure, for each part run: each
profile exited 0 (all pass), every check answered, none errored or timed
out, and GEMM, bandwidth and memtest passed (their checksums and patterns
held); on the GPUs, the GPU was found in the SKU table, so its figures have a
peak. Writes ``bench/results/gpu_compute.json``; ``--out F`` keeps every result.

    python bench/gpu_compute.py [--out /tmp/gpu_compute.json] [--array-backend cupy|numpy]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import verify, write_results
from vetd.plugins.gpu_compute.skus import lookup

CHECKS = ["gpu_gemm", "gpu_memory_bandwidth", "gpu_memtest", "gpu_pcie_bandwidth", "nccl_allreduce"]
#: What must pass on a healthy machine, on either backend (the rest may skip: no PCIe on the CPU, one rank).
MUST_PASS = ("gpu_gemm", "gpu_memory_bandwidth", "gpu_memtest")


def vetd_check(profile: str, backend: str, timeout: float) -> tuple[float, int, list[dict[str, Any]], str]:
    argv = [sys.executable, "-m", "vetd.core.cli", "check", "--profile", profile, "--json", "--force",
            "--array-backend", backend, *CHECKS]
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    wall = time.monotonic() - started
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return wall, done.returncode, results, done.stderr[-2000:]


def no_gpu() -> str:
    """Why the checks cannot run on a GPU here; empty when they can."""
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed (pip install 'vetd[cuda]')"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - any CUDA failure means: no GPU to run on
        return f"no CUDA device: {type(exc).__name__}: {exc}"
    return "" if count else "no CUDA device"


def gpu_name(results: list[dict[str, Any]]) -> str:
    try:
        import pynvml

        pynvml.nvmlInit()
        name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # noqa: BLE001 - no NVML: take the name the worker reported in a message
        for result in results:
            message = str(result.get("message", ""))
            if result.get("check") == "gpu_gemm" and ":" in message:
                return message.split(":")[0].split(" (")[0]
    return ""


def percentages(results: list[dict[str, Any]], peak: dict[str, float]) -> list[dict[str, Any]]:
    rows = []
    for result in results:
        metrics = result.get("metrics") or {}
        for key, value in sorted(metrics.items()):
            if value is None:
                continue
            reference = peak.get(key) or (peak.get("mem_gbps") if key in ("copy_gbps", "triad_gbps") else None)
            if key.startswith(("tflops_", "copy_", "triad_", "h2d_", "d2h_", "busbw_gbps", "algbw_gbps")):
                rows.append({"check": result["check"], "entity": result["entity"], "metric": key, "value": value,
                             "peak": reference, "pct_of_peak": round(100 * value / reference, 1) if reference else None})
    return rows


def part(backend: str, timeout: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both profiles on ``backend``, checked; (figures, the whole report)."""
    report: dict[str, Any] = {}
    for profile in ("prolog", "full"):
        wall, rc, results, stderr = vetd_check(profile, backend, timeout)
        report[profile] = {"wall_s": round(wall, 3), "rc": rc, "results": results, "stderr": stderr}
        print(f"{backend}: profile {profile}: {wall:.2f} s wall, exit {rc}, {len(results)} results")
        statuses = {f"{r['check']} {r['entity']}": r["status"] for r in results}
        verify({r["check"] for r in results} == set(CHECKS), f"{backend} {profile}: results for "
               f"{sorted({r['check'] for r in results})}, not every check of {CHECKS}")
        bad = {k: v for k, v in statuses.items() if v in ("error", "timeout")}
        verify(not bad, f"{backend} {profile}: {bad}: {stderr[-300:]}")
        failing = {k: v for k, v in statuses.items() if k.split()[0] in MUST_PASS and v != "pass"}
        verify(not failing, f"{backend} {profile}: {failing}")
        verify(rc == 0, f"{backend} {profile}: vetd check exited {rc}")
    full = report["full"]["results"]
    name = gpu_name(full) if backend == "cupy" else "cpu"
    sku = lookup(name) if backend == "cupy" and name else None
    if backend == "cupy":
        verify(sku is not None, f"the GPU {name!r} is not in the SKU table: no peak to hold its figures to")
    rows = percentages(full, dict(sku.peak) if sku else {})
    report.update(gpu=name, sku=sku.name if sku else None, percent_of_peak=rows)
    print(f"{backend}: {name or '?'} (SKU {sku.name if sku else 'none'})")
    for row in rows:
        pct = f"{row['pct_of_peak']:5.1f} %" if row["pct_of_peak"] is not None else "      -"
        print(f"  {row['check']:<22} {row['entity']:<5} {row['metric']:<22} {row['value']:>10} {pct}")
    for result in full:
        print(f"  {result['check']:<22} {result['entity']:<5} {str(result['status']).upper():<7} {result['message']}")
    figures = {"device": name, "sku": sku.name if sku else None,
               "prolog_wall_s": report["prolog"]["wall_s"], "full_wall_s": report["full"]["wall_s"],
               "statuses": {f"{r['check']} {r['entity']}": r["status"] for r in full},
               "metrics": {f"{r['check']} {r['entity']} {r['metric']}": {"value": r["value"], "pct_of_peak": r["pct_of_peak"]}
                           for r in rows}}
    return figures, report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="JSON file to write every result to")
    parser.add_argument("--array-backend", choices=("cupy", "numpy"), help="only this part")
    parser.add_argument("--timeout", type=float, default=1800.0, help="per profile run (s)")
    args = parser.parse_args()
    figures: dict[str, Any] = {}
    reports: dict[str, Any] = {}
    if args.array_backend != "numpy":
        if why := no_gpu():
            verify(args.array_backend != "cupy", f"--array-backend cupy: {why}")
            figures["gpu"] = {"status": "skip", "why": why}
            print(f"gpu: skip ({why})")
        else:
            figures["gpu"], reports["gpu"] = part("cupy", args.timeout)
    if args.array_backend != "cupy":
        figures["cpu_numerics"], reports["cpu_numerics"] = part("numpy", args.timeout)
    if args.out:
        Path(args.out).write_text(json.dumps(reports, indent=1))
    print(f"written to {write_results('gpu_compute', figures, checks=CHECKS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
