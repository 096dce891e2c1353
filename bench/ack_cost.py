"""What the controller's acks cost at fleet scale: a backlog from N nodes drained with and without them.

A backlog of ``--per-node`` results from each of ``--nodes`` simulated nodes
is queued in the controller's persistent session (real Mosquitto, the
controller down), then a ``vetd controller`` process drains it, once with
acks (the default) and once with ``VETD_CONTROLLER_ACKS=0``. Reported per
run: results/s stored, ack messages published (and per second), and the
controller's CPU seconds (user + system, from /proc) per 1,000 results.

The load is published by one paho client on the nodes' topics (10,000 real
connections do not fit on this machine next to the controller); the
controller's side of an ack (fold, encode, publish, PUBACK) is the same
with or without a subscriber, the broker's fan-out to 10,000 agents is not
measured here. Checks before any figure: every result stored; with acks,
every node acknowledged (an observer subscribed to ``ack/+`` counts them).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import paho.mqtt.client as paho

from bench.controller_ingest import controller_config, messages, queue_backlog, stored_results
from bench.record import verify, write_results
from tests.support.procs import VetdProcess, vetd_env
from tests.support.services import Mosquitto
from tests.support.wait import wait_for
from vetd.core import protocol


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    import os

    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(nodes: int, per_node: int, acks: bool) -> dict[str, float]:
    count = nodes * per_node
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = Mosquitto(work / "mosquitto").start()
        config = controller_config(work)
        env = vetd_env(VETD_BROKER=broker.url, VETD_LOG_LEVEL="warning", VETD_CONTROLLER_ACKS="1" if acks else "0")
        acked: set[str] = set()
        ack_messages = [0]
        lock = threading.Lock()

        def on_message(_c: object, _u: object, msg: paho.MQTTMessage) -> None:
            ack = protocol.decode_ack(msg.topic, msg.payload)
            with lock:
                ack_messages[0] += 1
                acked.add(ack.node)

        observer = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-acks")
        observer.on_message = on_message
        observer.connect("127.0.0.1", broker.port)
        observer.subscribe("vetd/v1/bench/ack/+", qos=0)
        observer.loop_start()

        def stored() -> int:
            return stored_results(work / "c.db")

        try:
            queue_backlog(work, config, env, broker, messages("bench", nodes, count, set()), 300)
            second = VetdProcess(["controller", "--config", str(config)], work / "c2.log", env).start()
            assert second.process is not None
            started = time.perf_counter()
            wait_for(lambda: stored() >= count, 600, "the backlog stored", interval=0.1)
            elapsed = time.perf_counter() - started
            if acks:
                wait_for(lambda: len(acked) >= nodes, 120, "every node acknowledged", interval=0.1)
            cpu = cpu_seconds(second.process.pid)
            acks_elapsed = time.perf_counter() - started
            second.stop()
            total_stored = stored()
        finally:
            observer.loop_stop()
            broker.stop()
    verify(total_stored == count, f"{total_stored} stored of {count}")
    verify(not acks or len(acked) == nodes, f"{len(acked)} of {nodes} nodes acknowledged")
    verify(acks or ack_messages[0] == 0, "acks published with acks off")
    return {"results_per_s": round(count / elapsed), "drain_s": round(elapsed, 2),
            "controller_cpu_s": round(cpu, 2), "cpu_ms_per_1000_results": round(1000 * cpu / count * 1000, 1),
            "ack_messages": ack_messages[0], "ack_messages_per_s": round(ack_messages[0] / acks_elapsed),
            "acks_per_node": round(ack_messages[0] / nodes, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--per-node", type=int, default=5)
    args = parser.parse_args()
    without = run(args.nodes, args.per_node, acks=False)
    with_acks = run(args.nodes, args.per_node, acks=True)
    figures = {"without_acks": without, "with_acks": with_acks,
               "cpu_overhead_pct": round(100 * (with_acks["controller_cpu_s"] / without["controller_cpu_s"] - 1), 1),
               "throughput_change_pct": round(100 * (with_acks["results_per_s"] / without["results_per_s"] - 1), 1)}
    for name, row in (("without acks", without), ("with acks", with_acks)):
        print(f"{name:>13}: {row['results_per_s']:,} results/s, controller CPU {row['controller_cpu_s']} s "
              f"({row['cpu_ms_per_1000_results']} ms per 1,000 results), {row['ack_messages']:,} acks "
              f"({row['ack_messages_per_s']:,}/s, {row['acks_per_node']} per node)")
    print(f"acks at {args.nodes:,} nodes: CPU {figures['cpu_overhead_pct']:+}%, "
          f"throughput {figures['throughput_change_pct']:+}%")
    print(f"wrote {write_results('ack_cost', figures, nodes=args.nodes, per_node=args.per_node)}")


if __name__ == "__main__":
    main()
