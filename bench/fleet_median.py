"""The cost of fleet-relative rules (``fleet.median``/``fleet.peers``) in the engine.

``--nodes`` nodes of one partition and GPU model (the worst case: one peer group)
with ``--gpus`` GPUs each report ``gpu_gemm`` (three TFLOP/s metrics and three
the rule does not name) once to fill the peer values, then again while timed:
the engine alone (no store, no broker), with the shipped rules and with the same
rules less ``gpu-slower-than-peers``. Also the memory the peer values take.

A few GPUs (one in every thousand nodes, from the middle on) measure 600
TFLOP/s fp16 against their peers' ~725: checked before any figure, every
result was decided on and ``gpu-slower-than-peers`` alerted on exactly those
GPUs, once each (and never without the rule). Writes
``bench/results/fleet_median.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import verify, write_results
from vetd.controller.config import ControllerConfig
from vetd.controller.counters import Counters
from vetd.controller.engine import Engine
from vetd.controller.model import FleetState
from vetd.controller.rules import RuleSet, parse_rules
from vetd.core.protocol import Result, State

RULES = Path(__file__).resolve().parents[1] / "controller" / "default_rules.yaml"


def engine(with_peers: bool) -> Engine:
    rules = [r for r in parse_rules(RULES.read_text(), str(RULES))
             if with_peers or r.name != "gpu-slower-than-peers"]
    ruleset = RuleSet(tuple(rules), (str(RULES),))
    return Engine(ControllerConfig(), FleetState(), Counters(), rules=lambda: ruleset, steps={},
                  alerting=True, session="bench")


RULE = "gpu-slower-than-peers"
#: The GPU of a slow node that measures below its peers.
SLOW_GPU = 3


def slow_nodes(nodes: int) -> set[int]:
    """One node in every thousand from the middle on (at least one): its GPU 3 is slow."""
    return set(range(nodes // 2, nodes, 1000))


def results(nodes: int, gpus: int, seq: int) -> list[Result]:
    slow = slow_nodes(nodes)
    return [Result(cluster="b", node=f"nid{n:05d}", session="s", seq=seq * gpus + g, ts=float(seq), check="gpu_gemm",
                   entity=f"gpu{g}", status="pass",
                   metrics={"tflops_fp16": 600.0 if n in slow and g == SLOW_GPU else 700.0 + (n * 7 + g) % 50,
                            "tflops_fp32": 50.0 + (n + g) % 5,
                            "tflops_fp64": 50.0 + (n * 3 + g) % 7, "checksum_error_fp16": 1e-3,
                            "checksum_error_fp32": 1e-6, "checksum_error_fp64": 1e-12})
            for n in range(nodes) for g in range(gpus)]


def run(nodes: int, gpus: int, with_peers: bool) -> tuple[float, float, int]:
    eng = engine(with_peers)
    births = [State(cluster="b", node=f"nid{n:05d}", session="s", seq=0, ts=0.0, online=True, started=0.0,
                    labels={"partition": "gpu", "gpu_model": "NVIDIA H100 80GB HBM3"}) for n in range(nodes)]
    eng.process([(b, None) for b in births], now=0.0)
    history = 0
    alerted: list[tuple[str, str]] = []

    def decide(message: Result, now: float) -> None:
        decisions = eng.process([(message, history)], now=now)
        alerted.extend((a.node, message.entity) for a in decisions.alerts if a.rule == RULE)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    started = time.perf_counter()
    for message in results(nodes, gpus, 1):
        history += 1
        decide(message, 1.0)
    fill = (time.perf_counter() - started) / (nodes * gpus)
    peer_bytes = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename")
                     if s.traceback[0].filename.endswith("model.py"))
    tracemalloc.stop()
    again = results(nodes, gpus, 2)
    started = time.perf_counter()
    for message in again:
        history += 1
        decide(message, 2.0)
    per_result = (time.perf_counter() - started) / len(again)
    verify(eng.counters["results"] == 2 * nodes * gpus,
           f"{eng.counters['results']} results decided on, not {2 * nodes * gpus}")
    expected = sorted((f"nid{n:05d}", f"gpu{SLOW_GPU}") for n in slow_nodes(nodes)) if with_peers else []
    verify(sorted(alerted) == expected, f"{RULE} alerted on {sorted(alerted)[:10]}, not on {expected[:10]}")
    verify(not eng.counters["rule_errors"], f"{eng.counters['rule_errors']} rule errors")
    return fill, per_result, peer_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--gpus", type=int, default=8)
    args = parser.parse_args()
    verify(args.nodes >= 5 and args.gpus > SLOW_GPU, "need at least 5 nodes and 4 GPUs (peers for the rule)")
    _, base, _ = run(args.nodes, args.gpus, with_peers=False)
    fill, peers, size = run(args.nodes, args.gpus, with_peers=True)
    values = args.nodes * args.gpus * 3
    print(f"{args.nodes} nodes × {args.gpus} GPUs, one peer group, {values:,} peer values "
          f"({size / 2**20:.1f} MiB in model.py, {size / values:.0f} B each)")
    print(f"per result, engine only: {base * 1e6:.0f} µs without the fleet rule, {peers * 1e6:.0f} µs with it "
          f"(+{(peers - base) * 1e6:.0f} µs); the first fill, under tracemalloc, {fill * 1e6:.0f} µs")
    print(f"{RULE} alerted on the {len(slow_nodes(args.nodes))} slow GPU(s) planted, and on no other")
    figures = {"peer_values": values, "peer_mib": round(size / 2**20, 1), "bytes_per_value": round(size / values),
               "us_per_result_without_rule": round(base * 1e6, 1), "us_per_result_with_rule": round(peers * 1e6, 1),
               "us_added_by_rule": round((peers - base) * 1e6, 1), "us_per_result_first_fill_traced": round(fill * 1e6, 1),
               "slow_gpus_alerted": len(slow_nodes(args.nodes))}
    print(f"written to {write_results('fleet_median', figures, nodes=args.nodes, gpus=args.gpus)}")


if __name__ == "__main__":
    main()
