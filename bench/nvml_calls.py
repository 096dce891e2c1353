"""Every NVML call vetd makes: what the driver answers and how long it takes.

Traces ``--snapshots`` NVML snapshots of ``gpu_health``'s source and a few
seconds of its event watcher (:mod:`vetd.plugins.gpu_health.nvmltrace`), then prints
one line per call class (function and plain arguments): calls, the return
codes seen, median and max wall time. ``--json F`` keeps the whole survey.

Two parts, each checked before its figures: the real driver (``skip``, with
why, on a machine without one), then the simulated library over a capture
(``--capture``, default the H200's in tests/data), held to the survey
recorded on that GPU (``--compare``): every call class must answer as the
driver did. Checked for both: GPUs seen, the same number of NVML calls in
every snapshot after the first, ``nvmlInit`` and the snapshot calls answered.
Writes ``bench/results/nvml_calls.json``.

    python bench/nvml_calls.py --json h200.calls.json          # on a GPU node: both parts
    python bench/nvml_calls.py                                 # no GPU: driver skip, simulation
    python bench/nvml_calls.py --simulate F.xml [--compare S.json]   # the simulated library alone
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import no_gpu_driver, verify, write_results
from vetd.plugins.gpu_health.nvml import NvmlSource
from vetd.plugins.gpu_health.nvmltrace import Survey, differences, survey

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
CAPTURE = DATA / "nvidia-smi" / "h200.xml"
RECORDED = DATA / "nvml" / "h200.calls.json"


def report(result: Survey) -> None:
    print(f"{result.library}: driver {result.driver_version}, NVML {result.nvml_version}, "
          f"nvidia-ml-py {result.pynvml_version}, {result.gpus} GPU(s) {sorted(set(result.gpu_names))}")
    print(f"snapshot: first {result.first_snapshot_ms:.2f} ms (probes every NVLink), then median "
          f"{result.snapshot_ms_median:.2f} ms, max {result.snapshot_ms_max:.2f} ms over {result.snapshots - 1}; "
          f"{result.calls_per_snapshot} NVML calls each")
    print(f"{'call':58} {'calls':>6} {'median us':>10} {'max us':>10}  outcomes")
    for call in result.calls:
        outcomes = ", ".join(f"{name} x{count}" for name, count in sorted(call.outcomes.items()))
        print(f"{call.key:58} {call.calls:6} {call.wall_us_median:10.1f} {call.wall_us_max:10.1f}  {outcomes}")
    if result.events is not None:
        events = result.events
        print(f"events: supported {events.supported}; watched {events.watched_s:g} s, "
              f"stopped in {events.stop_s} s; received {events.received or 'none'}"
              + (f"; failed: {events.error}" if events.error else ""))
    for name, value in result.probes.items():
        print(f"probe {name}: {value}")


def checked(result: Survey, what: str) -> dict[str, Any]:
    """Verify a survey worked; its figures."""
    verify(result.gpus >= 1, f"{what}: no GPU in the snapshots")
    by_key = result.by_key()
    verify("nvmlInit_v2()" in by_key or any(k.startswith("nvmlInit") for k in by_key), f"{what}: nvmlInit not traced")
    failed_init = {k: c.outcomes for k, c in by_key.items() if k.startswith("nvmlInit") and set(c.outcomes) != {"SUCCESS"}}
    verify(not failed_init, f"{what}: {failed_init}")
    verify(result.calls_per_snapshot > 0, f"{what}: snapshots made no NVML call")
    every = [c for c in result.calls if c.calls >= result.snapshots - 1]
    verify(every, f"{what}: no call class answered in every snapshot")
    return {"library": result.library, "driver_version": result.driver_version, "gpus": result.gpus,
            "gpu_names": sorted(set(result.gpu_names)), "snapshots": result.snapshots,
            "calls_per_snapshot": result.calls_per_snapshot, "call_classes": len(result.calls),
            "first_snapshot_ms": result.first_snapshot_ms, "snapshot_ms_median": result.snapshot_ms_median,
            "snapshot_ms_max": result.snapshot_ms_max,
            "event_types_supported": (len(next(iter(result.events.supported.values()), []))
                                      if result.events else None),
            "event_watcher_stop_s": result.events.stop_s if result.events else None}


def compared(recorded_path: Path, result: Survey, what: str, *, required: bool) -> list[str]:
    recorded = msgspec.json.decode(recorded_path.read_bytes(), type=Survey)
    lines = differences(recorded, result)
    print(f"{len(lines)} call class(es) of the {what} answer otherwise than in {recorded_path.name}:")
    for line in lines:
        print(f"  {line}")
    if required:
        verify(not lines, f"the {what} answers {len(lines)} call class(es) otherwise than {recorded_path.name}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--snapshots", type=int, default=20)
    parser.add_argument("--watch", type=float, default=2.0, help="seconds of the event watcher (0: none)")
    parser.add_argument("--simulate", type=Path, metavar="CAPTURE",
                        help="only the simulated library, answering from this nvidia-smi -q -x capture")
    parser.add_argument("--capture", type=Path, default=CAPTURE,
                        help="the capture the simulated part answers from (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="write the survey here (the driver's; with --simulate, that one)")
    parser.add_argument("--compare", type=Path, metavar="SURVEY",
                        help="the recorded survey the simulation is held to (default: the H200's, when the "
                        "capture is the H200's)")
    args = parser.parse_args()
    figures: dict[str, Any] = {}
    if args.simulate:
        figures["driver"] = {"status": "skip", "why": "--simulate: the simulated library alone"}
    elif why := no_gpu_driver():
        figures["driver"] = {"status": "skip", "why": why}
        print(f"driver: skip ({why})")
    else:
        real = survey(lambda: NvmlSource(process_names=True), snapshots=args.snapshots, watch_s=args.watch)
        report(real)
        figures["driver"] = checked(real, "driver")
        if args.json:
            args.json.write_bytes(msgspec.json.format(msgspec.json.encode(real)) + b"\n")
        figures["driver"]["differs_from_recorded_h200"] = compared(RECORDED, real, "driver", required=False)

    from vetd.plugins.gpu_health.nvmlsim import SimulatedNvml, install
    from vetd.plugins.gpu_health.replay import CaptureSource

    capture = args.simulate or args.capture
    install(SimulatedNvml.of(CaptureSource(str(capture))))
    simulated = survey(lambda: NvmlSource(process_names=False), snapshots=args.snapshots, watch_s=args.watch,
                       library=f"simulated({capture.name})")
    report(simulated)
    figures["simulated"] = checked(simulated, "simulation")
    if args.simulate and args.json:
        args.json.write_bytes(msgspec.json.format(msgspec.json.encode(simulated)) + b"\n")
    compare = args.compare or (RECORDED if capture.resolve() == CAPTURE.resolve() else None)
    if compare is not None:
        figures["simulated"]["differs_from_recorded"] = compared(compare, simulated, "simulation", required=True)
        figures["simulated"]["recorded"] = compare.name
    print(f"written to {write_results('nvml_calls', figures, snapshots=args.snapshots, watch_s=args.watch)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
