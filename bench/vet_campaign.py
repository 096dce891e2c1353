"""Campaigns run by the controller, on namespaced nodes: localisation, rounds and wall time against N.

Real networks and real parts (:class:`tests.support.campaign.Fleet`): each node a network
namespace on a bridge with a real ``vetd agent`` in it, Mosquitto on the bridge, a real
controller on the host (default rules, signed commands, scheduler backend ``none``). For each
N of ``--sizes`` (4, 8, 16), ``--trials`` campaigns of each kind through the operator's command,
``vetd vet NODES --config C --test tcp_pairs --json``:

1. a healthy network: rounds, the time of the rounds (probes opened to the last report, the
   coordinator's own measure), the campaign's time in the controller (choosing the idle nodes,
   the barrier, the rounds, storing the results) and the command's wall time (a Python
   start-up, the request, the wait);
2. a random node's egress throttled (``tc tbf``, ``--rate``): found when that node, and only it,
   is ``bad``, no link is named, and the default rule drained it (then ``vetd resume``);
3. a random link throttled (``htb`` + ``u32`` on the peer's address) between two nodes the rounds
   pair (a pair never measured cannot be named): found when that link, and only it, is named and
   every node is good.

Checked before any figure: every campaign gave a verdict for every node and its results were
stored; every healthy campaign found every node good with at least two partners, one
``fabric_pairs`` result stored per node; no node is left out of service at the end. Found N of N
is a figure, not a check: a miss is printed and kept with what was named instead.
Figures go to bench/results/vet_campaign.json.

    .venv/bin/python bench/vet_campaign.py [--sizes 4,8,16] [--trials 5] [--seconds 2]
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import verify, write_results
from tests.support import netns
from tests.support.campaign import Fleet
from tests.support.netns import NetNodes
from tests.support.procs import REPO
from tests.support.wait import wait_for
from vetd.core.pairs import schedule


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


def healthy_again(fleet: Fleet, node: str) -> None:
    """``node`` back in service (``vetd resume``) after a trial had it drained, as an operator would."""
    if {n["node"]: n["state"] for n in fleet.node_states()}.get(node) != "healthy":
        verify(fleet.vetd("resume", node).returncode == 0, f"vetd resume {node}")
    wait_for(lambda: {n["node"]: n["state"] for n in fleet.node_states()}.get(node) == "healthy", 30,
             f"{node} back in service")


def timing(summary: dict[str, Any], wall: float) -> dict[str, Any]:
    return {"rounds": summary["rounds"], "confirm_rounds": summary["confirm_rounds"], "rounds_s": summary["rounds_s"],
            "campaign_s": summary["total_s"], "wall_s": round(wall, 2), "median_gbps": summary["reference_gbps"]}


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"rounds": sorted({r["rounds"] for r in runs}), "confirm_rounds": sorted({r["confirm_rounds"] for r in runs}),
            **{f"{key}_median": round(statistics.median(r[key] for r in runs), 2)
               for key in ("rounds_s", "campaign_s", "wall_s")}}


def throttled(fleet: Fleet, throttle: Callable[[], None], node: str,
              runs: list[dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], set[str], list[str]]:
    """One campaign with ``throttle`` applied (on ``node``, lifted after): the verdicts, the nodes named
    (not good) and the links named; its timing appended to ``runs``."""
    throttle()
    try:
        rows, summary, wall = run(fleet)
    finally:
        fleet.nodes.unthrottle(node)
    runs.append(timing(summary, wall))
    named = {n for n, r in rows.items() if r["verdict"] != "good"}
    return rows, named, [f"{k['a']}-{k['b']}" for k in summary["links"]]


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
            healthy.append(timing(summary, wall))
        misses: list[str] = []
        node_runs, node_found = [], 0
        for _ in range(trials):
            bad = rng.choice(nodes.names)
            rows, named, links = throttled(fleet, lambda bad=bad: nodes.throttle(bad, rate), bad, node_runs)
            if named == {bad} and rows[bad]["verdict"] == "bad" and not links:
                wait_for(lambda bad=bad: {n["node"]: n["state"] for n in fleet.node_states()}.get(bad) == "excluded",
                         30, f"{bad} drained by fabric-slow-node")
                node_found += 1
            else:
                misses.append(f"node {bad}: named {sorted(named)}, links {links}")
            for name in named | {bad}:
                healthy_again(fleet, name)
        # a pair the campaign's rounds measure (the nodes in hostlist order around the ring): one never paired
        # cannot be named
        pairs = [pair for matching in schedule(count) for pair in matching]
        link_runs, link_found = [], 0
        for _ in range(trials):
            a, b = rng.choice(pairs)
            first, second = nodes.names[a], nodes.names[b]
            rows, named, links = throttled(fleet, lambda first=first, second=second: nodes.throttle_link(
                first, second, rate), first, link_runs)
            if not named and links == [f"{min(first, second)}-{max(first, second)}"]:
                link_found += 1
            else:
                misses.append(f"link {first}-{second}: named {sorted(named)}, links {links}")
            for name in named:
                healthy_again(fleet, name)
        verify(all(n["state"] == "healthy" for n in fleet.node_states()), "no node left out of service")
        return {"nodes": count, "trials": trials, **medians(healthy),
                "median_gbps": round(statistics.median(h["median_gbps"] for h in healthy), 3),
                "bad_node_found": node_found, "bad_link_found": link_found, "misses": misses,
                "bad_node": medians(node_runs), "bad_link": medians(link_runs),
                "healthy": healthy, "bad_node_runs": node_runs, "bad_link_runs": link_runs}
    finally:
        if fleet is not None:
            fleet.stop()
        nodes.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="4,8,16", help="node counts")
    parser.add_argument("--trials", type=int, default=5,
                        help="campaigns of each kind per size: healthy, a node throttled, a link throttled")
    parser.add_argument("--seconds", type=float, default=2.0, help="probe seconds per direction")
    parser.add_argument("--rate", default="16mbit", help="tc rate of a throttled node or link")
    parser.add_argument("--seed", type=int, default=19)
    args = parser.parse_args()
    verify(not netns.unavailable(), netns.unavailable() or "netns")
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="vetd-bench-campaign-") as tmp:
        rows = [size(int(n), args.trials, args.seconds, args.rate, Path(tmp), rng) for n in args.sizes.split(",")]
    print(f"campaigns, {args.seconds:g} s probes, {args.trials} trials of each kind, medians:")
    print("nodes  bad node  bad link  rounds  +confirm  rounds_s  campaign_s  wall_s  | bad node: wall_s  "
          "| bad link: +confirm  wall_s")
    for r in rows:
        node, link = r["bad_node"], r["bad_link"]
        print(f"{r['nodes']:>5}  {r['bad_node_found']:>4} of {r['trials']}  {r['bad_link_found']:>4} of {r['trials']}  "
              f"{','.join(map(str, r['rounds'])):>6}  {','.join(map(str, r['confirm_rounds'])):>8}  "
              f"{r['rounds_s_median']:>8.2f}  {r['campaign_s_median']:>10.2f}  {r['wall_s_median']:>6.2f}  "
              f"| {node['wall_s_median']:>14.2f}  | {','.join(map(str, link['confirm_rounds'])):>16}  "
              f"{link['wall_s_median']:>6.2f}")
        for miss in r["misses"]:
            print(f"  missed: {miss}")
    path = write_results("vet_campaign", {"sizes": rows}, trials=args.trials, seconds=args.seconds,
                         sizes=args.sizes, rate=args.rate, seed=args.seed)
    print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
