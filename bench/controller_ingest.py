"""Controller ingest rate: results/s processed and rules evaluated.

1. In-process: ``Controller.process`` on pre-encoded batches (decode, validate,
   deduplicate, store in SQLite, evaluate the rules), no network.
2. Through a real Mosquitto: a backlog of results from ``--nodes`` simulated
   nodes, queued in the controller's persistent session while it was down,
   drained by a ``vetd controller`` process (its start included).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import paho.mqtt.client as paho

from tests.support.procs import VetdProcess, vetd_env
from tests.support.services import Mosquitto
from tests.support.wait import wait_for
from vetd.controller.config import ControllerConfig, StoreSection
from vetd.controller.service import Controller
from vetd.controller.store import Store
from vetd.core import protocol
from vetd.core.protocol import Result

RULES = Path(__file__).resolve().parents[1] / "packaging" / "rules" / "default.yaml"
CHECKS = ("host_memory", "host_disk", "host_paths", "host_env", "host_load")


def messages(cluster: str, nodes: int, count: int) -> list[tuple[str, bytes]]:
    out = []
    for i in range(count):
        node = f"nid{i % nodes:05d}"
        result = Result(cluster=cluster, node=node, session="s1", seq=i // nodes + 1, ts=time.time(),
                        check=CHECKS[i % len(CHECKS)], status="pass", metrics={"value": float(i)},
                        message="ok")
        out.append((protocol.topic_for(result), protocol.encode(result)))
    return out


def in_process(nodes: int, count: int, runs: int) -> None:
    rates = []
    for run in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            controller = Controller(ControllerConfig(rules=[str(RULES)],
                                                     store=StoreSection(path=f"{tmp}/c.db")))
            batch = messages(f"bench{run}", nodes, count)
            started = time.perf_counter()
            for i in range(0, len(batch), 1000):
                controller.process(batch[i:i + 1000])
            rates.append(count / (time.perf_counter() - started))
            rules = controller.counters["rules_evaluated"]
    print(f"in-process: median {statistics.median(rates):,.0f} results/s over {runs} runs "
          f"(min {min(rates):,.0f}, max {max(rates):,.0f}); {rules / count:.0f} rules evaluated per result")


def through_broker(nodes: int, count: int) -> None:
    """The controller draining a backlog from a real Mosquitto.

    The load generator (paho on the same 2 cores) publishes more slowly than
    the controller ingests, so the backlog is built first, while the
    controller is down and its persistent session queues everything; then the
    controller starts and the time to store it all is its ingest rate.
    """
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = Mosquitto(work / "mosquitto").start()
        config = work / "controller.toml"
        config.write_text(f'cluster = "bench"\nrules = ["{RULES}"]\n[store]\npath = "c.db"\n'
                          '[http]\nlisten = ""\n[limits]\nper_node_rate = 1e9\nper_node_burst = 1e9\n')
        env = vetd_env(VETD_BROKER=broker.url, VETD_LOG_LEVEL="warning")

        def stored() -> int:
            store = Store(work / "c.db", readonly=True)
            try:
                return store.counters().get("results", 0)
            finally:
                store.close()

        try:
            first = VetdProcess(["controller", "--config", str(config)], work / "c1.log", env).start()
            wait_for((work / "c.db").exists, 20, "controller store")
            time.sleep(1)  # subscribed: the persistent session exists
            first.stop()
            batch = messages("bench", nodes, count)
            client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-load")
            client.max_inflight_messages_set(1000)
            client.max_queued_messages_set(0)
            client.connect("127.0.0.1", broker.port)
            client.loop_start()
            started = time.perf_counter()
            infos = [client.publish(topic, payload, qos=1) for topic, payload in batch]
            for info in infos:
                info.wait_for_publish(120)
            published = time.perf_counter() - started
            client.loop_stop()
            client.disconnect()
            second = VetdProcess(["controller", "--config", str(config)], work / "c2.log", env).start()
            started = time.perf_counter()
            wait_for(lambda: stored() >= count, 300, "the backlog stored", interval=0.1)
            elapsed = time.perf_counter() - started
            second.stop()
        finally:
            broker.stop()
    print(f"through Mosquitto: generator published {count:,} results from {nodes:,} nodes in {published:.1f} s "
          f"({count / published:,.0f}/s); the controller stored the backlog in {elapsed:.1f} s: "
          f"{count / elapsed:,.0f} results/s, process start included")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    in_process(args.nodes, args.messages, args.runs)
    through_broker(args.nodes, args.messages)


if __name__ == "__main__":
    main()
