"""Crash scenarios at the sizes of issue 13; prints the table and writes bench/results/crash.json.

≥ 50,000 results from ≥ 100 simulated nodes (the agent's own transport and
spool, :mod:`tests.support.simnodes`) through the shipped Mosquitto config
and ACL to a real controller: the controller SIGKILLed 3 times while it
drains the backlog; the broker SIGKILLed mid-stream and restarted, with and
without its store; the agents SIGKILLed mid-spool; the controller's disk
filled and freed (a tmpfs: needs root); a real agent and the broker
SIGTERMed together 20 times. Each row is counted from the agents' sequence
numbers to the store; the bench fails (no figures) unless every row has 0
lost, 0 stored out of order, and the one failing result drained its node
exactly once. ``tests/test_crash.py`` runs the same scenarios smaller.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import verify, write_results
from tests.support import crash


@contextlib.contextmanager
def tmpfs(where: Path, size: str = "64m") -> Iterator[Path]:
    """A small file system for the controller's store: room for the store of 50,000 results (about
    200 bytes each) and SQLite's write-ahead log (4 MiB before its first checkpoint), the rest filled."""
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--per-node", type=int, default=500)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--only", default="", help="run only scenarios whose name contains this")
    args = parser.parse_args()
    n, k = args.nodes, args.per_node
    scenarios = {
        "controller": lambda w: crash.controller_killed(w, n, k, kills=3, timeout=900),
        "broker": lambda w: crash.broker_killed(w, n, k, timeout=900),
        "broker-store-gone": lambda w: crash.broker_killed(w, n, k, lose_store=True, timeout=900),
        "agent": lambda w: crash.agent_killed(w, n, k, timeout=900),
        "disk": lambda w: crash.disk_full(w, n, k, mount=tmpfs, timeout=900),
        "sigterm": lambda w: crash.agent_and_broker_sigterm(w, args.trials)[0],
    }
    rows = []
    print(crash.HEADER, flush=True)
    for name, scenario in scenarios.items():
        if args.only and args.only not in name:
            continue
        with tempfile.TemporaryDirectory(prefix=f"vetd-crash-{name}-") as tmp:
            row = scenario(Path(tmp))
        print(row.line(), flush=True)
        rows.append(row)
    for row in rows:
        verify(row.ok, f"{row.scenario}: {row}")
    figures = {row.scenario: {"sent": row.sent, "stored": row.stored, "duplicates": row.duplicates,
                              "lost": row.lost, "out_of_order": row.out_of_order, "drains": row.drains,
                              "seconds": round(row.seconds, 1), "note": row.note} for row in rows}
    print(f"wrote {write_results('crash', figures, nodes=n, per_node=k, trials=args.trials)}")


if __name__ == "__main__":
    main()
