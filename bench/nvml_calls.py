"""Every NVML call vetd makes: what the driver answers and how long it takes.

Traces ``--snapshots`` NVML snapshots of ``gpu_health``'s source and a few
seconds of its event watcher (:mod:`vetd.plugins.gpu_health.nvmltrace`), then prints
one line per call class (function and plain arguments): calls, the return
codes seen, median and max wall time. ``--json F`` keeps the whole survey.

    python bench/nvml_calls.py --json h200.calls.json          # on a GPU node
    python bench/nvml_calls.py --simulate F.xml                # no GPU: the simulated library
    python bench/nvml_calls.py --simulate F.xml --compare h200.calls.json
        # where the simulation of a capture answers otherwise than the driver did
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vetd.plugins.gpu_health.nvml import NvmlSource
from vetd.plugins.gpu_health.nvmltrace import Survey, differences, survey


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--snapshots", type=int, default=20)
    parser.add_argument("--watch", type=float, default=2.0, help="seconds of the event watcher (0: none)")
    parser.add_argument("--simulate", type=Path, metavar="CAPTURE",
                        help="NVML answers from this nvidia-smi -q -x capture through the simulated library")
    parser.add_argument("--json", type=Path, help="write the survey here")
    parser.add_argument("--compare", type=Path, metavar="SURVEY",
                        help="list the call classes that answer otherwise than in this recorded survey")
    args = parser.parse_args()
    library = "libnvidia-ml.so.1"
    if args.simulate:
        from vetd.plugins.gpu_health.nvmlsim import SimulatedNvml, install
        from vetd.plugins.gpu_health.replay import CaptureSource

        install(SimulatedNvml.of(CaptureSource(str(args.simulate))))
        library = f"simulated({args.simulate.name})"
    result = survey(lambda: NvmlSource(process_names=not args.simulate), snapshots=args.snapshots,
                    watch_s=args.watch, library=library)
    if args.json:
        args.json.write_bytes(msgspec.json.format(msgspec.json.encode(result)) + b"\n")
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
    if args.compare:
        recorded = msgspec.json.decode(args.compare.read_bytes(), type=Survey)
        lines = differences(recorded, result)
        print(f"{len(lines)} call class(es) answer otherwise than in {args.compare.name}:")
        for line in lines:
            print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
