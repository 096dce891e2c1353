"""Campaigns run by the controller, on namespaced nodes: rounds and wall time against N.

Real networks and real parts (:class:`tests.support.campaign.Fleet`): each node a network
namespace on a bridge with a real ``vetd agent`` in it, Mosquitto on the bridge, a real
controller on the host (default rules, signed commands, scheduler backend ``none``). For each
N of ``--sizes`` (4, 8, 16): ``--trials`` campaigns on a healthy network through the operator's
command, ``vetd vet NODES --config C --test tcp_pairs --json``, then one with a node's egress
throttled (``tc tbf``, ``--rate``). Figures per N: rounds, the time of the rounds (probes
opened to the last report, the coordinator's own measure), the campaign's time in the
controller (choosing the idle nodes, the barrier, the rounds, storing the results) and the
command's wall time (a Python start-up, the request, the wait), medians over the trials.

Checked before any figure: every healthy campaign found every node good with at least two
partners in the planned rounds, stored one ``fabric_pairs`` result per node; the throttled
node, and only it, was named bad and the default rule drained it.
Figures go to bench/results/vet_campaign.json.

    .venv/bin/python bench/vet_campaign.py [--sizes 4,8,16] [--trials 3] [--seconds 2]
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import verify, write_results
from tests.support import netns
from tests.support.campaign import Fleet
from tests.support.netns import NetNodes
from tests.support.procs import REPO
from tests.support.wait import wait_for


def campaign(fleet: Fleet, campaign_id: str) -> dict[str, Any]:
    db = sqlite3.connect(f"file:{fleet.workdir / 'state' / 'controller.db'}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT summary FROM campaigns WHERE id=?", (campaign_id,)).fetchone()
        stored = db.execute("SELECT count(*) FROM latest WHERE check_name='fabric_pairs' AND message LIKE ?",
                            (f"campaign {campaign_id}:%",)).fetchone()[0]
    finally:
        db.close()
    verify(row is not None, f"campaign {campaign_id} in the controller's store")
    return {**json.loads(row[0]), "stored": int(stored)}


def run(fleet: Fleet) -> tuple[dict[str, dict[str, Any]], dict[str, Any], float]:
    began = time.monotonic()
    done, rows = fleet.vet("--test", "tcp_pairs")
    wall = time.monotonic() - began
    verify(set(rows) == set(fleet.nodes.names), f"a verdict for every node: {done.stdout[-2000:]} {done.stderr[-2000:]}")
    [campaign_id] = {row["campaign"] for row in rows.values()}
    took_part = sum(r["verdict"] != "absent" for r in rows.values())

    def stored() -> dict[str, Any] | None:
        summary = campaign(fleet, campaign_id)
        return summary if summary["stored"] >= took_part else None

    return rows, wait_for(stored, 30, "the campaign's results stored"), wall


def size(count: int, trials: int, seconds: float, rate: str, work: Path, rng: random.Random) -> dict[str, Any]:
    nodes = NetNodes(count).start()
    fleet = None
    try:
        fleet = Fleet(nodes, work / f"n{count}", campaigns=f'seconds = "{seconds}s"\ndeadline = "30s"\n').start()
        healthy = []
        for _ in range(trials):
            rows, summary, wall = run(fleet)
            verify(all(r["verdict"] == "good" and r["metrics"]["pairs"] >= 2 for r in rows.values()),
                   f"{count} healthy nodes all good: {rows}")
            verify(summary["stored"] == count, f"one result per node stored: {summary['stored']} of {count}")
            healthy.append({"rounds": summary["rounds"], "confirm_rounds": summary["confirm_rounds"],
                            "rounds_s": summary["rounds_s"], "campaign_s": summary["total_s"], "wall_s": round(wall, 2),
                            "median_gbps": summary["reference_gbps"]})
        bad = rng.choice(nodes.names)
        nodes.throttle(bad, rate)
        rows, summary, wall = run(fleet)
        nodes.unthrottle(bad)
        named = {n for n, r in rows.items() if r["verdict"] != "good"}
        verify(named == {bad} and rows[bad]["verdict"] == "bad", f"{bad} throttled: named {named}")
        wait_for(lambda: {n["node"]: n["state"] for n in fleet.node_states()}.get(bad) == "excluded", 30,
                 f"{bad} drained by fabric-slow-node")
        return {"nodes": count, "trials": trials,
                "rounds": sorted({h["rounds"] for h in healthy}),
                "confirm_rounds": sorted({h["confirm_rounds"] for h in healthy}),
                "rounds_s_median": round(statistics.median(h["rounds_s"] for h in healthy), 2),
                "campaign_s_median": round(statistics.median(h["campaign_s"] for h in healthy), 2),
                "wall_s_median": round(statistics.median(h["wall_s"] for h in healthy), 2),
                "median_gbps": round(statistics.median(h["median_gbps"] for h in healthy), 3),
                "healthy": healthy,
                "throttled": {"node": bad, "named": sorted(named), "drained": True, "rounds": summary["rounds"],
                              "confirm_rounds": summary["confirm_rounds"], "campaign_s": summary["total_s"],
                              "wall_s": round(wall, 2)}}
    finally:
        if fleet is not None:
            fleet.stop()
        nodes.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="4,8,16", help="node counts")
    parser.add_argument("--trials", type=int, default=3, help="healthy campaigns per size")
    parser.add_argument("--seconds", type=float, default=2.0, help="probe seconds per direction")
    parser.add_argument("--rate", default="16mbit", help="tc rate of the throttled node")
    parser.add_argument("--seed", type=int, default=19)
    args = parser.parse_args()
    verify(not netns.unavailable(), netns.unavailable() or "netns")
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="vetd-bench-campaign-") as tmp:
        rows = [size(int(n), args.trials, args.seconds, args.rate, Path(tmp), rng) for n in args.sizes.split(",")]
    print(f"campaigns, {args.seconds:g} s probes, medians of {args.trials}:")
    print("nodes  rounds  +confirm  rounds_s  campaign_s  wall_s  median GB/s  throttled node")
    for r in rows:
        t = r["throttled"]
        print(f"{r['nodes']:>5}  {','.join(map(str, r['rounds'])):>6}  {','.join(map(str, r['confirm_rounds'])):>8}  "
              f"{r['rounds_s_median']:>8.2f}  {r['campaign_s_median']:>10.2f}  {r['wall_s_median']:>6.2f}  "
              f"{r['median_gbps']:>11.3f}  {t['node']} bad and drained ({t['campaign_s']:.1f} s)")
    path = write_results("vet_campaign", {"sizes": rows}, trials=args.trials, seconds=args.seconds,
                         sizes=args.sizes, rate=args.rate, seed=args.seed)
    print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
