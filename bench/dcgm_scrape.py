"""What reading dcgm-exporter costs the agent ([plugins.telemetry] profiling = "dcgm" or "auto").

The simulated exporter (``vetd nvml-sim dcgm-exporter``, its own process) serves the
8 GPUs of ``packaging/scenarios/job-8gpu.yaml`` with every profiling field, as a
real one run with them enabled would; the telemetry plugin's reader
(:class:`vetd.plugins.telemetry.dcgm.Exporter`) fetches and parses its page. The
CPU time of the reading thread per reading (HTTP on loopback and the text parser)
is measured; the agent reads once per window, so its share of a core is that over
the window (10 s by default). Also measured: the same when nothing listens on the
port (``auto`` on a node without DCGM: one refused connection per window).

Checked before any figure: each reading has the 8 GPUs with SM activity and
occupancy in percent, the refused reading is counted as ``unreachable``.

    .venv/bin/python bench/dcgm_scrape.py [--reads 200]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import verify, write_results
from tests.support.procs import VetdProcess, vetd_env
from tests.support.services import free_port
from tests.support.wait import wait_for
from vetd.plugins.telemetry.dcgm import Exporter, ExporterError

SCENARIO = Path(__file__).resolve().parents[1] / "packaging" / "scenarios" / "job-8gpu.yaml"
WINDOW_S = 10.0


def cpu_ms(read: Callable[[], object], reads: int) -> list[float]:
    """CPU time of the reading thread per reading, ms (a failed reading counts as the exporter counts it)."""
    times = []
    for _ in range(reads):
        started = time.thread_time()
        with contextlib.suppress(ExporterError):
            read()
        times.append(1e3 * (time.thread_time() - started))
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=200)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="vetd-bench-dcgm-"))
    port = free_port()
    served = VetdProcess(["nvml-sim", "dcgm-exporter", str(SCENARIO), "--listen", f"127.0.0.1:{port}"],
                         root / "exporter.log", vetd_env()).start()
    try:
        wait_for(lambda: "serving http://" in served.output, 30, "the simulated exporter")
        exporter = Exporter(f"http://127.0.0.1:{port}/metrics", 2.0, expected=True)
        page = exporter.scrape()  # the first reading imports urllib and the parser: not counted
        verify(len(page) == 8, f"8 GPUs in the page, got {len(page)}")
        verify(all({"sm_active_pct", "sm_occupancy_pct"} <= set(v) for v in page.values()), "SM activity, occupancy")
        verify(all(0 <= v["sm_active_pct"] <= 100 for v in page.values()), "percent, not ratios")
        read = cpu_ms(exporter.scrape, args.reads)
        verify(exporter.failures == {}, f"failed readings: {exporter.failures}")
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            page_bytes = len(response.read())
    finally:
        served.stop()
    absent = Exporter(f"http://127.0.0.1:{free_port()}/metrics", 2.0, expected=False)
    refused = cpu_ms(absent.scrape, args.reads)
    verify(absent.failures == {"unreachable": args.reads}, f"refused readings: {absent.failures}")
    median, nothing = statistics.median(read), statistics.median(refused)
    figures = {
        "gpus": 8,
        "page_bytes": page_bytes,
        "reading_cpu_ms_median": round(median, 3),
        "reading_cpu_ms_p95": round(sorted(read)[int(0.95 * (len(read) - 1))], 3),
        "core_pct_at_10s_window": round(median / WINDOW_S / 10, 4),
        "no_exporter_reading_cpu_ms_median": round(nothing, 3),
        "no_exporter_core_pct_at_10s_window": round(nothing / WINDOW_S / 10, 4),
    }
    print(f"dcgm-exporter reading, 8 GPUs, every profiling field ({page_bytes} bytes), {args.reads} readings:")
    print(f"  {median:.2f} ms of CPU a reading (p95 {figures['reading_cpu_ms_p95']:.2f}): "
          f"{figures['core_pct_at_10s_window']:.4f} % of a core at one reading per 10 s window")
    print(f"  no exporter (auto on a node without DCGM): {nothing:.3f} ms a reading, "
          f"{figures['no_exporter_core_pct_at_10s_window']:.4f} % of a core")
    print(f"wrote {write_results('dcgm_scrape', figures, reads=args.reads, window_s=WINDOW_S)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
