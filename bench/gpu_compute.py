"""GPU compute and NCCL on the GPUs at hand: TFLOP/s per dtype and GB/s as a % of the published peak.

Runs `vetd check` as an operator would: the ``prolog`` profile (its wall time is
the figure a Slurm prolog pays; CSCS's prolog timeout is 10 s) and then the
``full`` profile, every compute check plus ``nccl_allreduce`` (``--force``: one
rank on a one-GPU machine, a local copy, not a link). Peaks come from the SKU
table (``plugins/gpu_compute/skus.toml``). Writes everything as JSON to ``--out``.

    python bench/gpu_compute.py --out /tmp/gpu_compute.json [--array-backend numpy]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vetd.plugins.gpu_compute.skus import lookup

CHECKS = ["gpu_gemm", "gpu_memory_bandwidth", "gpu_memtest", "gpu_pcie_bandwidth", "nccl_allreduce"]


def vetd_check(profile: str, backend: str | None, timeout: float) -> tuple[float, int, list[dict[str, object]], str]:
    argv = [sys.executable, "-m", "vetd.core.cli", "check", "--profile", profile, "--json", "--force", *CHECKS]
    if backend:
        argv[4:4] = ["--array-backend", backend]
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    wall = time.monotonic() - started
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return wall, done.returncode, results, done.stderr[-2000:]


def gpu_name(results: list[dict[str, object]]) -> str:
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


def percentages(results: list[dict[str, object]], peak: dict[str, float]) -> list[dict[str, object]]:
    rows = []
    for result in results:
        metrics = result.get("metrics") or {}
        assert isinstance(metrics, dict)
        for key, value in sorted(metrics.items()):
            if value is None:
                continue
            reference = peak.get(key) or (peak.get("mem_gbps") if key in ("copy_gbps", "triad_gbps") else None)
            if key.startswith(("tflops_", "copy_", "triad_", "h2d_", "d2h_", "busbw_gbps", "algbw_gbps")):
                rows.append({"check": result["check"], "entity": result["entity"], "metric": key, "value": value,
                             "peak": reference, "pct_of_peak": round(100 * value / reference, 1) if reference else None})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--array-backend", choices=("cupy", "numpy"))
    parser.add_argument("--timeout", type=float, default=1800.0, help="per profile run (s)")
    args = parser.parse_args()
    report: dict[str, object] = {}
    for profile in ("prolog", "full"):
        wall, rc, results, stderr = vetd_check(profile, args.array_backend, args.timeout)
        report[profile] = {"wall_s": round(wall, 3), "rc": rc, "results": results, "stderr": stderr}
        print(f"profile {profile}: {wall:.2f} s wall, exit {rc}, {len(results)} results")
    full = report["full"]["results"]  # type: ignore[index]
    name = gpu_name(full)
    sku = lookup(name) if name else None
    peak = dict(sku.peak) if sku else {}
    rows = percentages(full, peak)
    report.update(gpu=name, sku=sku.name if sku else None, peak=peak, percent_of_peak=rows)
    print(f"GPU: {name or '?'} (SKU {sku.name if sku else 'unknown'})")
    for row in rows:
        pct = f"{row['pct_of_peak']:5.1f} %" if row["pct_of_peak"] is not None else "      -"
        print(f"  {row['check']:<22} {row['entity']:<5} {row['metric']:<22} {row['value']:>10} {pct}")
    for result in full:
        print(f"  {result['check']:<22} {result['entity']:<5} {str(result['status']).upper():<7} {result['message']}")
    Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
