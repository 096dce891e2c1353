"""Controller ingest rate: results/s processed, rules evaluated and fired, actions carried out.

1. In-process: ``Controller.process`` on pre-encoded batches (decode, validate,
   deduplicate, store in SQLite, evaluate the rules) and the executor carrying
   out what they decided, no network.
2. Through a real Mosquitto: a backlog of results from ``--nodes`` simulated
   nodes, queued in the controller's persistent session while it was down,
   drained by a ``vetd controller`` process (its start included).

The shipped default rules; ``--failing`` nodes (default 50) send one failing
result among their passing ones, so ``check-failed`` fires and drains them.
Drains go to the ``none`` scheduler backend (recorded in vetd, no Slurm: this
bench measures ingest; bench/drain_latency.py and bench/rules.py time Slurm).
Checked before any figure: every result stored, each failing node's rule fired
and its drain audited done, no other node drained. Figures go to
bench/results/controller_ingest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import paho.mqtt.client as paho

from bench.record import verify, write_results
from tests.support.procs import VetdProcess, vetd_env
from tests.support.services import Mosquitto
from tests.support.wait import wait_for
from vetd.controller.config import ControllerConfig, StoreSection
from vetd.controller.service import Controller
from vetd.controller.store import Store
from vetd.core import logs, protocol
from vetd.core.protocol import Result

RULES = Path(__file__).resolve().parents[1] / "packaging" / "rules" / "default.yaml"
CHECKS = ("host_memory", "host_disk", "host_paths", "host_env", "host_load")


def failing_nodes(nodes: int, failing: int) -> set[str]:
    step = max(1, nodes // max(1, failing))
    return {f"nid{i:05d}" for i in range(0, nodes, step)[:failing]}


def messages(cluster: str, nodes: int, count: int, failing: set[str]) -> list[tuple[str, bytes]]:
    """``count`` results round-robin over ``nodes``; each failing node's second result fails."""
    out = []
    for i in range(count):
        node = f"nid{i % nodes:05d}"
        fails = node in failing and i // nodes == 1
        result = Result(cluster=cluster, node=node, session="s1", seq=i // nodes + 1, ts=time.time(),
                        check=CHECKS[i % len(CHECKS)], status="fail" if fails else "pass",
                        metrics={"value": float(i)}, message="bench fault" if fails else "ok")
        out.append((protocol.topic_for(result), protocol.encode(result)))
    return out


def check(store: Store, count: int, failing: set[str]) -> None:
    """Every result stored, check-failed fired on each failing node and its drain done, nothing else drained."""
    counters = store.counters()
    verify(counters.get("results") == count, f"{counters.get('results')} results stored of {count}")
    fired = {r[0] for r in store.db.execute("SELECT node FROM audit WHERE action='rule_fired' AND rule='check-failed'")}
    verify(fired == failing, f"check-failed fired on {len(fired)} nodes, expected {len(failing)}")
    drained = {r[0] for r in store.db.execute("SELECT node FROM audit WHERE action='drain' AND outcome='done'")}
    verify(drained == failing, f"{len(drained)} drains done, expected {len(failing)}")


def in_process(nodes: int, count: int, runs: int, failing: set[str]) -> dict[str, Any]:
    rates = []
    for run in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            cluster = f"bench{run}"  # a controller owns one cluster and drops the others' messages
            controller = Controller(ControllerConfig(cluster=cluster, rules=[str(RULES)],
                                                     store=StoreSection(path=f"{tmp}/c.db")))
            batch = messages(cluster, nodes, count, failing)
            started = time.perf_counter()
            for i in range(0, len(batch), 1000):
                controller.executor.enqueue(controller.process(batch[i:i + 1000]))
                asyncio.run(controller.executor.carry_out_queued())
            rates.append(count / (time.perf_counter() - started))
            rules = controller.counters["rules_evaluated"]
            check(controller.store, count, failing)
    print(f"in-process: median {statistics.median(rates):,.0f} results/s over {runs} runs "
          f"(min {min(rates):,.0f}, max {max(rates):,.0f}); {rules / count:.0f} rules evaluated per result; "
          f"{len(failing)} nodes drained (scheduler none)")
    return {"in_process_results_per_s": round(statistics.median(rates)), "rules_per_result": round(rules / count, 1)}


def through_broker(nodes: int, count: int, failing: set[str]) -> dict[str, Any]:
    """The controller draining a backlog from a real Mosquitto.

    The load generator (paho on the same 2 cores) publishes more slowly than
    the controller ingests, so the backlog is built first, while the
    controller is down and its persistent session queues everything; then the
    controller starts and the time to store it all is its ingest rate.
    """
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = Mosquitto(work / "mosquitto").start()
        config = controller_config(work)
        env = vetd_env(VETD_BROKER=broker.url, VETD_LOG_LEVEL="warning")

        def drains_done(db: Path) -> int:
            store = Store(db, readonly=True)
            try:
                return int(store.db.execute("SELECT count(*) FROM audit WHERE action='drain' AND outcome='done'"
                                            ).fetchone()[0])
            finally:
                store.close()

        try:
            published = queue_backlog(work, config, env, broker, messages("bench", nodes, count, failing), 120)
            second = VetdProcess(["controller", "--config", str(config)], work / "c2.log", env).start()
            started = time.perf_counter()
            wait_for(lambda: stored_results(work / "c.db") >= count, 300, "the backlog stored", interval=0.1)
            elapsed = time.perf_counter() - started
            wait_for(lambda: drains_done(work / "c.db") >= len(failing), 30, "the drains carried out")
            second.stop()
            store = Store(work / "c.db", readonly=True)
            try:
                check(store, count, failing)
            finally:
                store.close()
        finally:
            broker.stop()
    print(f"through Mosquitto: generator published {count:,} results from {nodes:,} nodes in {published:.1f} s "
          f"({count / published:,.0f}/s); the controller stored the backlog in {elapsed:.1f} s: "
          f"{count / elapsed:,.0f} results/s, process start included; {len(failing)} nodes drained")
    return {"generator_results_per_s": round(count / published),
            "broker_backlog_results_per_s": round(count / elapsed)}


def controller_config(work: Path) -> Path:
    """A controller config for a backlog bench: the default rules, no HTTP, no rate limit."""
    config = work / "controller.toml"
    config.write_text(f'cluster = "bench"\nrules = ["{RULES}"]\n[store]\npath = "c.db"\n'
                      '[http]\nlisten = ""\n[limits]\nper_node_rate = 1e9\nper_node_burst = 1e9\n')
    return config


def stored_results(db: Path) -> int:
    """The results a controller's store holds (read-only, beside the running controller)."""
    store = Store(db, readonly=True)
    try:
        return store.counters().get("results", 0)
    finally:
        store.close()


def queue_backlog(work: Path, config: Path, env: dict[str, str], broker: Mosquitto,
                  batch: list[tuple[str, bytes]], timeout: float) -> float:
    """Start the controller once (its persistent session then exists), stop it and publish ``batch``
    at QoS 1 for the broker to queue: the backlog a controller meets after an outage. Returns the
    seconds the publishing took."""
    first = VetdProcess(["controller", "--config", str(config)], work / "c1.log", env).start()
    wait_for((work / "c.db").exists, 20, "controller store")
    time.sleep(1)  # subscribed: the persistent session exists
    first.stop()
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-load")
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    started = time.perf_counter()
    infos = [client.publish(topic, payload, qos=1) for topic, payload in batch]
    for info in infos:
        info.wait_for_publish(timeout)
    published = time.perf_counter() - started
    client.loop_stop()
    client.disconnect()
    return published


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--failing", type=int, default=50, help="nodes that send a failing result")
    args = parser.parse_args()
    logs.setup("warning")
    failing = failing_nodes(args.nodes, args.failing)
    verify(args.messages >= 2 * args.nodes, "--messages must give every node two results (the second fails)")
    figures = in_process(args.nodes, args.messages, args.runs, failing)
    figures |= through_broker(args.nodes, args.messages, failing)
    print(f"written to {write_results('controller_ingest', figures, nodes=args.nodes, messages=args.messages, failing=len(failing), runs=args.runs)}")


if __name__ == "__main__":
    main()
