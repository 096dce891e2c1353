"""``vetd vet`` across namespaced nodes: localisation, rounds and wall time against N, the probe against iperf3.

Real networks: each node is a network namespace on a bridge
(:class:`tests.support.netns.NetNodes`), each task a real ``vetd vet`` started
with the environment Slurm sets (:class:`tests.support.netns.VetJob`), the
probe the shipped ``tcp_pairs`` one (4 streams, ``--seconds`` per direction).

1. Localisation, on 8 and 16 nodes (``--sizes``): ``--trials`` runs with one
   node's egress throttled (``tc tbf``, ``--rate``): found when that node and
   only it is ``bad`` and no link is named; as many with one link throttled
   (``htb`` + ``u32`` on the peer's address) between two nodes the schedule
   pairs (a random pair of the three rounds: a pair never measured cannot be
   named): found when that link and only it is named and every node is good.
2. Rounds and wall time against N (2, 4, 8, 16 and every pair for 4 and 8),
   healthy network: rounds, time the rounds took (rank 0's ``vet_done``), and
   the wall time from the first task's start to the last task's exit.
3. The probe against iperf3 on one veth pair (two namespaces), ``--repeats``
   alternating runs of each, ``--seconds``: medians, with 4 streams and 1
   stream on the bare veth pair (CPU-bound here: both ends share the
   machine's cores) and with 4 streams through ``tbf`` at 1 Gbit/s and 200 Mbit/s (the
   network is the limit, as on a cluster).

Checked before any figure: every run reported a verdict for every node and
every task exited with rank 0's status; every probe and iperf3 run measured.
Figures go to bench/results/vet_pairs.json.

    .venv/bin/python bench/vet_pairs.py [--trials 5] [--seconds 2] [--sizes 8,16]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import verify, write_results
from tests.support import netns
from tests.support.netns import NetNodes, VetJob
from tests.support.procs import REPO, vetd_env
from tests.support.wait import wait_for
from vetd.core.pairs import schedule

PROTOCOL = "name: host memory only\nchecks:\n  - host_memory\n"


def run_vet(nodes: NetNodes, work: Path, seconds: float, *args: str) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    (work / "agent.toml").write_text(f'[plugins.tcp_pairs]\nseconds = "{seconds}s"\nstreams = 4\n')
    (work / "protocol.yaml").write_text(PROTOCOL)
    argv = ["--config", str(work / "agent.toml"), "--protocol", str(work / "protocol.yaml"), "--json",
            "--port", "18557", "--need", "0", *args]
    started = time.monotonic()
    job = VetJob(nodes, argv, work / "job", vetd_env(VETD_LOG_LEVEL="debug")).start()
    done = job.wait(600)
    wall = time.monotonic() - started
    rank0 = done[nodes.names[0]]
    verify({d.returncode for d in done.values()} == {0}, f"every task exits 0 with --need 0: "
           f"{ {n: d.returncode for n, d in done.items()} } {rank0.stderr[-2000:]}")
    verdicts = {row["node"]: row for row in map(json.loads, rank0.stdout.splitlines())}
    verify(list(verdicts) == nodes.names, f"a verdict for every node: {list(verdicts)}")
    summary = next(json.loads(line) for line in rank0.stderr.splitlines() if '"vet_done"' in line)
    return {"verdicts": verdicts, "summary": summary, "wall_s": wall}


def localisation(size: int, trials: int, seconds: float, rate: str, work: Path, rng: random.Random) -> dict[str, Any]:
    nodes = NetNodes(size).start()
    try:
        plan = schedule(size)
        found_node = found_link = 0
        misses: list[str] = []
        times: list[float] = []
        for trial in range(trials):
            bad = rng.choice(nodes.names)
            nodes.throttle(bad, rate)
            out = run_vet(nodes, work / f"n{size}-node{trial}", seconds)
            nodes.unthrottle(bad)
            named = {n for n, v in out["verdicts"].items() if v["verdict"] != "good"}
            links = out["summary"]["links"]
            times.append(out["summary"]["rounds_s"])
            if named == {bad} and not links:
                found_node += 1
            else:
                misses.append(f"node {bad}: named {sorted(named)}, links {links}")
            a, b = rng.choice([p for matching in plan for p in matching])
            first, second = nodes.names[a], nodes.names[b]
            nodes.throttle_link(first, second, rate)
            out = run_vet(nodes, work / f"n{size}-link{trial}", seconds)
            nodes.unthrottle(first)
            named = {n for n, v in out["verdicts"].items() if v["verdict"] != "good"}
            links = out["summary"]["links"]
            if not named and links == [f"{min(first, second)}-{max(first, second)}"]:
                found_link += 1
            else:
                misses.append(f"link {first}-{second}: named {sorted(named)}, links {links}")
        return {"nodes": size, "trials": trials, "bad_node_found": found_node, "bad_link_found": found_link,
                "rounds_s_median": round(statistics.median(times), 2) if times else None, "misses": misses}
    finally:
        nodes.stop()


def scaling(seconds: float, work: Path) -> list[dict[str, Any]]:
    rows = []
    for size, rounds in ((2, "3"), (4, "3"), (8, "3"), (16, "3"), (4, "all"), (8, "all")):
        nodes = NetNodes(size).start()
        try:
            out = run_vet(nodes, work / f"scale-{size}-{rounds}", seconds, "--rounds", rounds)
        finally:
            nodes.stop()
        summary = out["summary"]
        verify(all(v["verdict"] == "good" for v in out["verdicts"].values()),
               f"{size} nodes on a healthy network are good: {out['verdicts']}")
        rows.append({"nodes": size, "rounds_asked": rounds, "rounds": summary["rounds"],
                     "confirm_rounds": summary["confirm_rounds"], "rounds_s": summary["rounds_s"],
                     "wall_s": round(out["wall_s"], 2), "median_gbps": summary["reference_gbps"]})
    return rows


#: (label, tc rate on the sender or None, streams): the comparisons of part 3.
VERSUS = (("veth, 4 streams", None, 4), ("veth, 1 stream", None, 1), ("veth at 1 Gbit/s (tbf), 4 streams", "1gbit", 4),
          ("veth at 200 Mbit/s (tbf), 4 streams", "200mbit", 4))


def probe_vs_iperf3(seconds: float, repeats: int) -> list[dict[str, Any]]:
    nodes = NetNodes(2).start()
    server = subprocess.Popen(nodes.argv("nid002", [sys.executable, "-m", "tests.support.tcpprobe", "serve",
                                                    "18558"]), stdout=subprocess.PIPE, text=True, cwd=REPO)
    iperf_server = subprocess.Popen(nodes.argv("nid002", ["iperf3", "-s", "-p", "18559"]),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert server.stdout is not None
        verify(server.stdout.readline().strip() == "ready", "the probe server starts")

        def iperf3(streams: int, duration: float) -> float | None:
            try:
                report = json.loads(nodes.run("nid001", "iperf3", "-c", "nid002", "-p", "18559", "-P", str(streams),
                                              "-t", str(max(1, round(duration))), "-J"))  # whole seconds: -t 0 runs forever
            except RuntimeError:
                return None
            return float(report["end"]["sum_received"]["bits_per_second"]) / 8e9

        wait_for(lambda: iperf3(1, 1) is not None, 30, "iperf3 to answer")
        rows = []
        for label, rate, streams in VERSUS:
            if rate:
                nodes.throttle("nid001", rate, burst="1mb")
            ours, theirs = [], []
            for _ in range(repeats):  # alternate, so a change in the machine's load hits both
                sample = json.loads(nodes.run("nid001", sys.executable, "-m", "tests.support.tcpprobe", "measure",
                                              "nid002", "18558", f"{seconds:g}", str(streams)))
                verify(sample["gbps"], f"the probe measured: {sample}")
                ours.append(float(sample["gbps"]))
                value = iperf3(streams, seconds)
                verify(value, "iperf3 measured")
                theirs.append(float(value or 0))
            nodes.unthrottle("nid001")
            probe, reference = statistics.median(ours), statistics.median(theirs)
            rows.append({"link": label, "streams": streams, "probe_gbps_median": round(probe, 4),
                         "iperf3_gbps_median": round(reference, 4), "probe_over_iperf3": round(probe / reference, 3),
                         "probe_gbps": [round(x, 4) for x in ours], "iperf3_gbps": [round(x, 4) for x in theirs]})
        return rows
    finally:
        server.terminate()
        iperf_server.terminate()
        server.wait(10)
        iperf_server.wait(10)
        nodes.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=5, help="bad-node and bad-link trials per size")
    parser.add_argument("--seconds", type=float, default=2.0, help="probe seconds per direction")
    parser.add_argument("--sizes", default="8,16", help="node counts of the localisation trials")
    parser.add_argument("--skip-scaling", action="store_true", help="leave out part 2 (rounds against N)")
    parser.add_argument("--rate", default="16mbit", help="tc rate of a throttled node or link")
    parser.add_argument("--repeats", type=int, default=5, help="probe and iperf3 runs each")
    parser.add_argument("--seed", type=int, default=19)
    args = parser.parse_args()
    verify(not netns.unavailable(), netns.unavailable() or "netns")
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="vetd-bench-vet-") as tmp:
        work = Path(tmp)
        found = [localisation(int(size), args.trials, args.seconds, args.rate, work, rng)
                 for size in args.sizes.split(",")]
        rounds = [] if args.skip_scaling else scaling(args.seconds, work)
    versus = probe_vs_iperf3(args.seconds, args.repeats)
    for row in found:
        print(f"{row['nodes']} nodes: bad node found {row['bad_node_found']}/{row['trials']}, "
              f"bad link found {row['bad_link_found']}/{row['trials']}, rounds {row['rounds_s_median']} s (median)")
        for miss in row["misses"]:
            print(f"  missed: {miss}")
    print("nodes  rounds  +confirm  rounds_s  wall_s  median GB/s")
    for r in rounds:
        label = f"{r['rounds']} ({r['rounds_asked']})"
        print(f"{r['nodes']:>5}  {label:>6}  {r['confirm_rounds']:>8}  {r['rounds_s']:>8.2f}  {r['wall_s']:>6.2f}  "
              f"{r['median_gbps']:.3f}")
    version = subprocess.run(["iperf3", "--version"], capture_output=True, text=True, check=False).stdout.split()[1]
    print(f"probe against iperf3 {version} on one veth pair, {args.seconds:g} s, median of {args.repeats}:")
    for row in versus:
        print(f"  {row['link']}: probe {row['probe_gbps_median']} GB/s, iperf3 {row['iperf3_gbps_median']} GB/s, "
              f"ratio {row['probe_over_iperf3']}")
    path = write_results("vet_pairs", {"localisation": found, "rounds": rounds, "probe_vs_iperf3": versus},
                         trials=args.trials, seconds=args.seconds, sizes=args.sizes, rate=args.rate,
                         repeats=args.repeats, seed=args.seed)
    print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
