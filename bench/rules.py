"""Rules: evaluation cost per message with 50 rules, and fault → Slurm drain latency.

1. CPU time to evaluate 50 rules against one result (the CEL part, and the whole
   controller path: decode, store, rule state machine), per rule; target ≤ 10 µs.
2. Latency from a failing result published to the broker until ``scontrol show
   node`` reports the node DRAIN, through a real Mosquitto, controller and
   slurmctld, one fault per node; median and p99 of ``--faults`` (200); target
   p99 ≤ 1 s. Needs mosquitto, munge and Slurm (scripts/test installs them).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import paho.mqtt.client as paho

from tests.support.procs import VetdProcess, vetd_env
from tests.support.services import Mosquitto, Slurm
from tests.support.wait import wait_for
from vetd.controller.config import ControllerConfig, StoreSection
from vetd.controller.rules import evaluate_all, parse_rules
from vetd.controller.service import Controller
from vetd.core import protocol
from vetd.core.protocol import Result


def fifty_rules() -> str:
    lines = ["rules:"]
    for i in range(50):
        when = [
            f'result.check == "check_{i}" && result.status == "fail"',
            f'has(result.metrics.temp_c) && result.metrics.temp_c > {80 + i}.0',
            f'"code_{i}" in result.codes && node.labels.partition == "p{i % 5}"',
            f'result.status in ["fail", "error"] && result.entity.startsWith("gpu{i % 8}")',
            f'node.state == "healthy" && result.duration_s > {i}.5',
        ][i % 5]
        lines += [f"  - name: r{i}", f"    when: '{when}'", "    actions: [alert]"]
    return "\n".join(lines) + "\n"


def evaluation(iterations: int) -> None:
    text = fifty_rules()
    rules = parse_rules(text, "bench")
    variables = {
        "result": {"check": "gpu_health", "entity": "gpu3", "status": "pass", "codes": ["x"],
                   "metrics": {"temp_c": 45.0}, "message": "", "duration_s": 0.01, "profile": "", "job_id": ""},
        "event": {},
        "node": {"name": "nid001", "cluster": "c", "state": "healthy", "online": True, "labels": {"partition": "p1"}},
    }
    samples = []
    for _ in range(iterations):
        t0 = time.process_time()
        evaluate_all(rules, variables)
        samples.append(time.process_time() - t0)
    cel = statistics.median(samples) / len(rules)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rules.yaml"
        path.write_text(text)
        controller = Controller(ControllerConfig(rules=[str(path)], store=StoreSection(path=f"{tmp}/c.db")))
        batch = []
        for seq in range(1, iterations + 1):
            message = Result(cluster="c", node="nid001", session="s", seq=seq, ts=seq, check="gpu_health",
                             entity="gpu3", status="pass", metrics={"temp_c": 45.0})
            batch.append((protocol.topic_for(message), protocol.encode(message)))
        t0 = time.process_time()
        for i in range(0, len(batch), 500):
            controller.process(batch[i:i + 500])
        whole = (time.process_time() - t0) / iterations
    print(f"50 rules, {iterations} messages:")
    print(f"  CEL evaluation: median {1e6 * cel:.2f} us per rule ({1e6 * cel * 50:.0f} us per message)")
    print(f"  whole controller path: {1e6 * whole:.0f} us per message, {1e6 * whole / 50:.2f} us per rule "
          "(decode, dedup, SQLite, rule states; target <= 10 us per rule)")


def drain_latency(faults: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = Mosquitto(work / "mosquitto").start()
        slurm = Slurm(work / "slurm", nodes=f"nid[001-{faults:03d}]").start()
        rules = work / "rules.yaml"
        rules.write_text("rules:\n  - name: fault\n    when: result.status == 'fail'\n    actions: [drain]\n")
        config = work / "controller.toml"
        config.write_text(f'cluster = "bench"\nrules = ["{rules}"]\n[store]\npath = "c.db"\n'
                          '[scheduler]\nbackend = "slurm"\n[breaker]\nmax_fraction = 1.0\n')
        controller = VetdProcess(["controller", "--config", str(config)], work / "controller.log",
                                 vetd_env(VETD_BROKER=broker.url, SLURM_CONF=str(slurm.conf),
                                          VETD_LOG_LEVEL="warning")).start()
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-faults")
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        latencies = []
        try:
            wait_for((work / "c.db").exists, 20, "controller")
            time.sleep(1)
            for i in range(1, faults + 1):
                node = f"nid{i:03d}"
                fault = Result(cluster="bench", node=node, session="s", seq=1, ts=time.time(), check="host_paths",
                               status="fail", message="missing: /scratch")
                t0 = time.perf_counter()
                client.publish(protocol.topic_for(fault), protocol.encode(fault), qos=1)
                while True:
                    out = subprocess.run(["scontrol", "show", "node", "-o", node], env=slurm.env,
                                         capture_output=True, text=True, check=False).stdout
                    if "DRAIN" in out:
                        break
                    if time.perf_counter() - t0 > 30:
                        raise RuntimeError(f"{node} not drained after 30 s")
                latencies.append(time.perf_counter() - t0)
        finally:
            client.loop_stop()
            controller.stop()
            slurm.stop()
            broker.stop()
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    print(f"fault published -> DRAIN visible in scontrol, {len(latencies)} faults, one node each:")
    print(f"  median {1e3 * statistics.median(latencies):.0f} ms, p99 {1e3 * p99:.0f} ms, "
          f"max {1e3 * latencies[-1]:.0f} ms (target p99 <= 1000 ms; includes ~10-20 ms per scontrol poll)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=5000)
    parser.add_argument("--faults", type=int, default=200)
    args = parser.parse_args()
    evaluation(args.iterations)
    drain_latency(args.faults)


if __name__ == "__main__":
    main()
