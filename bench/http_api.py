"""The controller's HTTP API: requests/s on the main read path and idle memory.

A ``vetd controller`` process (real Mosquitto, no agents) over a database of
``--nodes`` nodes with a few results each; one client on this host asks
``GET /api/v1/nodes`` (and ``GET /metrics``) ``--requests`` times in a row over
one ``http.client`` connection (it reconnects by itself when the server closes
after each answer), ``--runs`` times; prints the median rate and the
controller's RSS idle (before any request) and after the runs.
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.controller_ingest import messages
from tests.support.procs import VetdProcess, vetd_env
from tests.support.services import Mosquitto, free_port, port_open
from tests.support.wait import wait_for
from vetd.controller.config import ControllerConfig, StoreSection
from vetd.controller.service import Controller


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rate(port: int, path: str, count: int) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    started = time.perf_counter()
    for _ in range(count):
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        assert response.status == 200, response.status
        if response.will_close:
            conn.close()
    elapsed = time.perf_counter() - started
    conn.close()
    return count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        seeded = Controller(ControllerConfig(cluster="bench", store=StoreSection(path=str(work / "c.db"))))
        seeded.process(messages("bench", args.nodes, args.nodes * 5, set()))
        seeded.store.close()
        broker = Mosquitto(work / "mosquitto").start()
        port = free_port()
        config = work / "controller.toml"
        config.write_text(f'cluster = "bench"\n[store]\npath = "c.db"\n[http]\nlisten = "127.0.0.1:{port}"\n')
        controller = VetdProcess(["controller", "--config", str(config)], work / "c.log",
                                 vetd_env(VETD_BROKER=broker.url, VETD_LOG_LEVEL="warning")).start()
        try:
            wait_for(lambda: port_open(port), 20, "the API to listen")
            assert controller.process is not None
            time.sleep(3)
            idle = rss_mib(controller.process.pid)
            for path in ("/api/v1/nodes", "/metrics"):
                rates = [rate(port, path, args.requests) for _ in range(args.runs)]
                print(f"GET {path}: median {statistics.median(rates):,.0f} requests/s over {args.runs} runs of "
                      f"{args.requests} (min {min(rates):,.0f}, max {max(rates):,.0f}); {args.nodes} nodes")
            print(f"controller RSS: {idle:.1f} MiB idle after start, "
                  f"{rss_mib(controller.process.pid):.1f} MiB after the runs")
        finally:
            controller.stop()
            broker.stop()


if __name__ == "__main__":
    main()
