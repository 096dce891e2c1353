"""Fault → Slurm drain latency through the real chain, under the load of N nodes.

Each fault is a real ``vetd agent`` replaying a GPU scenario (an XID 79, "GPU
has fallen off the bus", 2 s after it starts: see packaging/scenarios/) →
real Mosquitto → real ``vetd controller`` (default rules) → real slurmctld.
Meanwhile ``--nodes`` simulated agents publish a passing result each per
second. The latency of one fault is from the XID event's own time stamp (the
agent's clock when it saw the XID) to ``scontrol`` showing the node DRAIN.

Checked before any figure: every fault drained with vetd's critical-event
reason, the XID event and the load's results stored by the controller, no
other node drained. Figures go to bench/results/drain_latency.json; the last
line printed is ``p50_ms=… p99_ms=…``.

    .venv/bin/python bench/drain_latency.py --nodes 1000 [--faults 8]
"""

from __future__ import annotations

import argparse
import contextlib
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import paho.mqtt.client as paho

from bench.record import verify, write_results
from tests.support.procs import VetdProcess, Watcher, vetd_env
from tests.support.services import Mosquitto, Slurm
from tests.support.wait import wait_for
from vetd.core import protocol
from vetd.core.protocol import Event, Result

CLUSTER = "bench"
SCENARIO = "gpus: 8\ntimeline:\n  - {at: 2s, gpu: 7, xid: 79, message: GPU has fallen off the bus.}\n"
RULES = Path(__file__).resolve().parents[1] / "packaging" / "rules" / "default.yaml"


class Load(threading.Thread):
    """``nodes`` simulated agents, one passing result each per second, at QoS 1."""

    def __init__(self, port: int, nodes: int) -> None:
        super().__init__(name="load", daemon=True)
        self.nodes, self.sent, self.stop = nodes, 0, threading.Event()
        self.last: paho.MQTTMessageInfo | None = None
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-load")
        self.client.max_queued_messages_set(0)
        self.client.max_inflight_messages_set(1000)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def run(self) -> None:
        seq = 0
        while not self.stop.is_set():
            seq += 1
            started = time.monotonic()
            for i in range(self.nodes):
                if self.stop.is_set():
                    break
                message = Result(cluster=CLUSTER, node=f"load{i:05d}", session="load", seq=seq, ts=time.time(),
                                 check="host_memory", status="pass", metrics={"used_fraction": 0.3})
                self.last = self.client.publish(protocol.topic_for(message), protocol.encode(message), qos=1)
                self.sent += 1
                # spread the round over the second rather than in one burst
                ahead = started + (i + 1) / self.nodes - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)

    def close(self) -> None:
        """Stop publishing; return once the broker has acknowledged all that was sent."""
        self.stop.set()
        self.join(10)
        if self.last is not None:
            self.last.wait_for_publish(60)  # QoS 1 acknowledgements come in order
        self.client.loop_stop()
        self.client.disconnect()


def stored(db: Path, sql: str) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
            return int(conn.execute(sql).fetchone()[0])
    except sqlite3.OperationalError:  # the controller has not made its tables yet
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1000, help="simulated nodes publishing in the background")
    parser.add_argument("--faults", type=int, default=8, help="faults, one real agent and Slurm node each")
    args = parser.parse_args()
    faults = [f"nid{i:03d}" for i in range(1, args.faults + 1)]
    latencies: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = Mosquitto(work / "mosquitto").start()
        slurm = Slurm(work / "slurm", nodes=f"nid[001-{args.faults:03d}]").start()
        config = work / "controller.toml"
        config.write_text(f'cluster = "{CLUSTER}"\nrules = ["{RULES}"]\n[store]\npath = "c.db"\n'
                          '[scheduler]\nbackend = "slurm"\n[breaker]\nmax_fraction = 1.0\n')
        controller = VetdProcess(["controller", "--config", str(config)], work / "controller.log",
                                 vetd_env(VETD_BROKER=broker.url, SLURM_CONF=str(slurm.conf),
                                          VETD_LOG_LEVEL="warning")).start()
        watcher = Watcher(broker.port, f"vetd/v1/{CLUSTER}/node/+/event")
        load = Load(broker.port, args.nodes)
        db = work / "c.db"
        try:
            wait_for(db.exists, 20, "controller store")
            # the controller subscribed: a probe result is stored (what came before would be lost)
            probe = Result(cluster=CLUSTER, node="probe", session="p", seq=1, ts=time.time(), check="c",
                           status="pass")
            wait_for(lambda: load.client.publish(protocol.topic_for(probe), protocol.encode(probe), qos=1) and
                     stored(db, "SELECT count(*) FROM history WHERE node='probe'"), 20, "the controller subscribed")
            load.start()
            wait_for(lambda: stored(db, "SELECT count(*) FROM history") >= args.nodes, 60,
                     "one round of the load stored")
            (work / "scenario.yaml").write_text(SCENARIO)
            agent_config = work / "agent.toml"
            agent_config.write_text(f'[agent]\ninterval = "1h"\ndisable_plugins = ["host"]\n'
                                    f'[plugins.gpu_health]\nsource = "scenario"\n'
                                    f'scenario = "{work / "scenario.yaml"}"\n')
            for node in faults:
                agent = VetdProcess(["agent", "--config", str(agent_config)], work / f"{node}.log",
                                    vetd_env(VETD_BROKER=broker.url, VETD_CLUSTER=CLUSTER, VETD_NODE=node,
                                             VETD_LOG_LEVEL="warning", VETD_STATE_DIR=str(work / node))).start()
                try:
                    xid = wait_for(lambda n=node: [m for m in watcher.select(lambda m: isinstance(m, Event))
                                                   if m.node == n and "xid_79" in m.codes], 30, f"{node}'s XID")[0]
                    while "DRAIN" not in slurm.run("scontrol", "show", "node", "-o", node):
                        verify(time.time() - xid.ts < 30, f"{node} drained within 30 s of its XID")
                        time.sleep(0.005)
                    latencies.append(time.time() - xid.ts)
                finally:
                    agent.stop()
            sent = load.sent
            load.close()
            # the checks: every fault drained for the XID, nothing else drained, all of it stored
            for node in faults:
                reason = slurm.show(node)["Reason"]
                verify(reason.startswith("vetd: critical-event: xid[gpu7] Xid 79"), f"{node} reason {reason!r}")
            drained = [n for n, s in slurm.states().items() if "drain" in s]
            verify(sorted(drained) == faults, f"drained {drained}, expected {faults}")
            load_sql = "SELECT count(*) FROM history WHERE node LIKE 'load%'"
            with contextlib.suppress(AssertionError):
                wait_for(lambda: stored(db, load_sql) >= sent, 60, "the load stored")
            verify(stored(db, load_sql) == sent, f"{stored(db, load_sql)} load results stored of {sent} sent")
            events = stored(db, "SELECT count(*) FROM history WHERE kind='event' AND codes LIKE '%xid_79%'")
            verify(events == len(faults), f"{events} XID events stored of {len(faults)}")
            drains = stored(db, "SELECT count(*) FROM audit WHERE action='drain' AND outcome='done'")
            verify(drains == len(faults), f"{drains} drains audited done of {len(faults)}")
        finally:
            load.stop.set()
            watcher.close()
            controller.stop()
            slurm.stop()
            broker.stop()
    latencies.sort()
    p50 = statistics.median(latencies)
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    figures = {"faults": len(latencies), "load_nodes": args.nodes, "load_results_stored": sent,
               "p50_ms": round(1e3 * p50, 1), "p99_ms": round(1e3 * p99, 1), "max_ms": round(1e3 * latencies[-1], 1),
               "latencies_ms": [round(1e3 * x, 1) for x in latencies]}
    path = write_results("drain_latency", figures, nodes=args.nodes, faults=args.faults)
    print(f"XID seen by the agent -> DRAIN in scontrol, {len(latencies)} faults, {args.nodes} nodes of load "
          f"({sent} results stored): max {figures['max_ms']:.0f} ms; {path.relative_to(Path.cwd())}")
    print(f"p50_ms={figures['p50_ms']:.0f} p99_ms={figures['p99_ms']:.0f}")


if __name__ == "__main__":
    main()
