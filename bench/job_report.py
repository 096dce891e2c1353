"""`vetd job report` time for a 24 h job on 64 GPUs (8 nodes × 8), from a packed telemetry database.

The job's windows (10 s, 8,640 per GPU, 552,960 in all, plus the hosts') are made
from a scenario workload (training, one straggling GPU, one idle GPU, each window
jittered), stored through the controller's telemetry store and packed as the
controller packs them once the job's buckets close. Then the report is made as
``vetd job report`` makes it, three ways: the JSON, the figures (``--png``) and
the HTML page (``--html``), each timed (wall, this process) and checked: 64 GPUs,
the idle and straggling GPUs flagged, at most 1,500 points a line.

    .venv/bin/python bench/job_report.py [--hours 24] [--nodes 8]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import verify, write_results
from bench.telemetry_store import GPU_KEYS
from vetd.controller.config import ControllerConfig, StoreSection, TelemetrySection
from vetd.controller.jobreport import run_report
from vetd.controller.store import Store
from vetd.controller.telemetry import TelemetryStore
from vetd.core.protocol import Telemetry
from vetd.plugins.gpu_health.workload import Workload, apply_workloads

WINDOW = 10.0


def fill(telemetry: TelemetryStore, nodes: int, hours: float, start: float) -> int:
    """Store the job's windows in batches of 1,000, as ingest would; returns how many."""
    straggler = [Workload(profile="training"), Workload(gpus=[3], profile="training", scale=0.55),
                 Workload(gpus=[6], profile="idle")]
    plain = [Workload(profile="training")]
    batch: list[Telemetry] = []
    count = 0
    energy: dict[tuple[int, int], float] = {}
    for step in range(int(hours * 3600 / WINDOW)):
        ts = start + step * WINDOW
        for n in range(nodes):
            for gpu in range(8):
                values = apply_workloads(straggler if n == 0 else plain, gpu, ts - start)
                mean = {name: float(values[key]) for key, name in GPU_KEYS.items() if key in values}
                mean["memory_used_mib"] = float(values.get("memory_used_mib", 0.0))
                mean["memory_used_pct"] = 100 * mean["memory_used_mib"] / 81559.0
                mean |= {"temp_c": float(values.get("temp_c", 30.0)), "clock_memory_mhz": 2619.0,
                         "throttle_power_pct": 0.0, "throttle_thermal_pct": 0.0, "throttle_hw_pct": 0.0}
                before = energy.get((n, gpu), 0.0)
                energy[(n, gpu)] = before + mean["power_w"] * WINDOW
                low = {k: v * 0.97 for k, v in mean.items()} | {"energy_j": before}
                high = {k: v * 1.03 for k, v in mean.items()} | {"energy_j": energy[(n, gpu)]}
                mean["energy_j"] = (before + energy[(n, gpu)]) / 2
                batch.append(Telemetry(cluster="bench", node=f"nid{n:03d}", session="s", seq=0, ts=ts,
                                       source="telemetry_gpu", entity=f"gpu{gpu}", metrics=mean, window_s=WINDOW,
                                       samples=10, min=low, max=high, job_id="24h"))
            batch.append(Telemetry(cluster="bench", node=f"nid{n:03d}", session="s", seq=0, ts=ts,
                                   source="telemetry_host", entity="node", metrics={"cpu_pct": 35.0, "load1": 14.0},
                                   window_s=WINDOW, samples=10, job_id="24h"))
            if len(batch) >= 1000:
                count += telemetry.add(batch, now=ts)
                batch = []
    count += telemetry.add(batch, now=start + hours * 3600)
    return count


def timed(store: Store, telemetry: TelemetryStore, config: ControllerConfig, **options: Any) -> tuple[float, str]:
    args = SimpleNamespace(**{"job_id": "24h", "json": False, "png": None, "html": None, **options})
    out = io.StringIO()
    started = time.perf_counter()
    status = run_report(store, telemetry, config, args, out)  # type: ignore[arg-type]
    elapsed = time.perf_counter() - started
    verify(status == 0, f"vetd job report exited {status}")
    return elapsed, out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--nodes", type=int, default=8)
    args = parser.parse_args()
    start = 1_800_000_000.0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        store = Store(folder / "c.db")
        config = ControllerConfig(cluster="bench", store=StoreSection(path=str(folder / "c.db")),
                                  telemetry=TelemetrySection(path=str(folder / "t.db")))
        telemetry = TelemetryStore(folder / "t.db")
        began = time.perf_counter()
        stored = fill(telemetry, args.nodes, args.hours, start)
        fill_s = time.perf_counter() - began
        end = start + args.hours * 3600
        while any(telemetry.tick(end + 120, keep_nodes=7 * 86400, keep_jobs=90 * 86400, resolution=300.0,
                                 late=60.0).values()):
            pass
        verify(telemetry.size()["windows"] == 0, "every window of the job packed")
        gpus = args.nodes * 8
        json_s, printed = timed(store, telemetry, config, json=True)
        document = json.loads(printed)
        verify(document["job"]["gpus"] == gpus, f"{document['job']['gpus']} GPUs in the report, not {gpus}")
        verify(document["job"]["duration_s"] == args.hours * 3600, "the job's span is its windows'")
        kinds = {(f["kind"], f["node"], f["gpu"]) for f in document["flags"]}
        verify({("idle_gpu", "nid000", 6), ("straggler", "nid000", 3)} <= kinds, f"flags: {sorted(kinds)[:6]}")
        verify(0.5 < document["job"]["score"] < 0.8, f"job score {document['job']['score']}")
        figures = folder / "figures"
        png_s, _ = timed(store, telemetry, config, png=str(figures))
        activity = json.loads((figures / "activity.json").read_text())
        longest = max(len(s["y"]) for p in activity["panels"] for s in p["series"])
        verify(longest <= 1500 and len(activity["panels"][0]["series"]) == gpus, "plotted series")
        html_s, _ = timed(store, telemetry, config, html=str(folder / "r.html"))
        html_bytes = (folder / "r.html").stat().st_size
        db_bytes = telemetry.size()["bytes"]
    figures_out = {"gpus": gpus, "hours": args.hours, "windows": stored, "telemetry_db_mib": round(db_bytes / 2**20, 1),
                   "report_json_s": round(json_s, 1), "report_png_s": round(png_s, 1),
                   "report_html_s": round(html_s, 1), "html_kib": round(html_bytes / 1024),
                   "points_per_line": longest, "store_and_pack_s": round(fill_s, 1)}
    print(f"a {args.hours:g} h job on {gpus} GPUs: {stored} windows ({figures_out['telemetry_db_mib']} MiB packed)")
    print(f"  vetd job report --json: {json_s:.1f} s; --png: {png_s:.1f} s; --html: {html_s:.1f} s "
          f"({figures_out['html_kib']} KiB page, {longest} points a line)")
    print(f"wrote {write_results('job_report', figures_out, hours=args.hours, nodes=args.nodes, window_s=WINDOW)}")


if __name__ == "__main__":
    main()
