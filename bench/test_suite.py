"""The default test suite's wall time, serial and with xdist workers; writes bench/results/test_suite.json.

Runs ``pytest -q -n N`` (what ``scripts/test`` runs, without its install and lint steps) ``--runs``
times for each ``--workers`` value (``N:RUNS`` gives that count its own number of runs) and records
each run's wall time, pytest's own total and its summary, then the median per worker count. A run with any failure or error fails the bench (no
figures): a flaky suite has no speed worth quoting. ``-n 0`` is the serial run.

    .venv/bin/python bench/test_suite.py --workers 4,0:1 --runs 3
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import REPO, verify, write_results

SUMMARY = re.compile(r"^=*\s*(?P<summary>(?:\d+ \w+(?: \w+)?, )*\d+ \w+(?: \w+)?) in (?P<seconds>[\d.]+)s")


def run(workers: int, extra: list[str]) -> dict[str, object]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", str(workers),
                           *extra], cwd=REPO, capture_output=True, text=True, check=False)
    wall = time.monotonic() - started
    lines = [m for line in done.stdout.splitlines() if (m := SUMMARY.match(line))]
    verify(lines, f"-n {workers}: no pytest summary line (exit {done.returncode}): {done.stdout[-2000:]}")
    summary = lines[-1]
    verify(done.returncode == 0 and "failed" not in summary["summary"] and "error" not in summary["summary"],
           f"-n {workers}: {summary['summary']}\n{done.stdout[-4000:]}")
    return {"workers": workers, "wall_s": round(wall, 1), "pytest_s": float(summary["seconds"]),
            "summary": summary["summary"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="4,0:1", help="comma-separated -n values (0: serial), each "
                        "N or N:RUNS")
    parser.add_argument("--runs", type=int, default=3, help="runs per worker count without its own")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = parser.parse_args()
    plan: dict[int, int] = {}
    try:
        for item in args.workers.split(","):
            workers, _, times = item.partition(":")
            plan[int(workers)] = int(times) if times else args.runs
    except ValueError:
        parser.error(f"--workers: expected N or N:RUNS, comma-separated (4,0:1), got {args.workers!r}")
    if any(n < 0 or r < 1 for n, r in plan.items()):
        parser.error("--workers: counts must be at least 0 and runs at least 1")
    counts = list(plan)
    runs = []
    for workers, times in plan.items():
        for index in range(times):
            row = run(workers, args.pytest_args)
            print(f"-n {workers} run {index + 1}: {row['wall_s']} s wall, pytest {row['pytest_s']} s: {row['summary']}",
                  flush=True)
            runs.append(row)
    medians = {str(n): statistics.median(r["wall_s"] for r in runs if r["workers"] == n) for n in counts}
    for n, wall in medians.items():
        print(f"-n {n}: median wall {wall} s over {plan[int(n)]} run(s)")
    write_results("test_suite", {"median_wall_s": medians, "runs": runs}, workers=args.workers, runs=args.runs,
                  pytest_args=args.pytest_args)


if __name__ == "__main__":
    main()
