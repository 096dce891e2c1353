"""The cost of fleet-relative rules (``fleet.median``/``fleet.peers``) in the engine.

``--nodes`` nodes of one partition and GPU model (the worst case: one peer group)
with ``--gpus`` GPUs each report ``gpu_gemm`` (three TFLOP/s metrics and three
the rule does not name) once to fill the peer values, then again while timed:
the engine alone (no store, no broker), with the shipped rules and with the same
rules less ``gpu-slower-than-peers``. Also the memory the peer values take.
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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


def results(nodes: int, gpus: int, seq: int) -> list[Result]:
    return [Result(cluster="b", node=f"nid{n:05d}", session="s", seq=seq * gpus + g, ts=float(seq), check="gpu_gemm",
                   entity=f"gpu{g}", status="pass",
                   metrics={"tflops_fp16": 700.0 + (n * 7 + g) % 50, "tflops_fp32": 50.0 + (n + g) % 5,
                            "tflops_fp64": 50.0 + (n * 3 + g) % 7, "checksum_error_fp16": 1e-3,
                            "checksum_error_fp32": 1e-6, "checksum_error_fp64": 1e-12})
            for n in range(nodes) for g in range(gpus)]


def run(nodes: int, gpus: int, with_peers: bool) -> tuple[float, float, int]:
    eng = engine(with_peers)
    births = [State(cluster="b", node=f"nid{n:05d}", session="s", seq=0, ts=0.0, online=True, started=0.0,
                    labels={"partition": "gpu", "gpu_model": "NVIDIA H100 80GB HBM3"}) for n in range(nodes)]
    eng.process([(b, None) for b in births], now=0.0)
    history = 0
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    started = time.perf_counter()
    for message in results(nodes, gpus, 1):
        history += 1
        eng.process([(message, history)], now=1.0)
    fill = (time.perf_counter() - started) / (nodes * gpus)
    peer_bytes = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename")
                     if s.traceback[0].filename.endswith("model.py"))
    tracemalloc.stop()
    again = results(nodes, gpus, 2)
    started = time.perf_counter()
    for message in again:
        history += 1
        eng.process([(message, history)], now=2.0)
    per_result = (time.perf_counter() - started) / len(again)
    return fill, per_result, peer_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--gpus", type=int, default=8)
    args = parser.parse_args()
    _, base, _ = run(args.nodes, args.gpus, with_peers=False)
    fill, peers, size = run(args.nodes, args.gpus, with_peers=True)
    values = args.nodes * args.gpus * 3
    print(f"{args.nodes} nodes × {args.gpus} GPUs, one peer group, {values:,} peer values "
          f"({size / 2**20:.1f} MiB in model.py, {size / values:.0f} B each)")
    print(f"per result, engine only: {base * 1e6:.0f} µs without the fleet rule, {peers * 1e6:.0f} µs with it "
          f"(+{(peers - base) * 1e6:.0f} µs); the first fill, under tracemalloc, {fill * 1e6:.0f} µs")


if __name__ == "__main__":
    main()
