"""The controller's HTTP API: requests/s on the main read path and idle memory.

A ``vetd controller`` process (real Mosquitto, no agents) over a database of
``--nodes`` nodes with a few results each; one client on this host asks
``GET /api/v1/nodes`` (and ``GET /metrics``) ``--requests`` times in a row over
one ``http.client`` connection (it reconnects by itself when the server closes
after each answer), ``--runs`` times; prints the median rate and the
controller's RSS idle (before any request) and after the runs.

Checked before any figure: every request answered 200; the nodes list holds
every seeded node (first and last answer of each run), and ``/metrics``
counts them as healthy. Writes ``bench/results/http_api.json``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.controller_ingest import messages
from bench.record import verify, write_results
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


def rate(port: int, path: str, count: int, check: Callable[[bytes], None]) -> float:
    """Requests per second of ``count`` GETs of ``path``; the first and the last body are ``check``ed."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    statuses: dict[int, int] = {}
    started = time.perf_counter()
    for i in range(count):
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        statuses[response.status] = statuses.get(response.status, 0) + 1
        if i in (0, count - 1):
            check(body)
        if response.will_close:
            conn.close()
    elapsed = time.perf_counter() - started
    conn.close()
    verify(statuses == {200: count}, f"GET {path}: answers {statuses}, not {count} × 200")
    return count / elapsed


def nodes_listed(expected: int) -> Callable[[bytes], None]:
    def check(body: bytes) -> None:
        listed = json.loads(body)
        verify(len(listed) == expected, f"GET /api/v1/nodes listed {len(listed)} nodes of {expected}")
    return check


def metrics_count(expected: int) -> Callable[[bytes], None]:
    def check(body: bytes) -> None:
        line = f'vetd_nodes{{state="healthy"}} {float(expected)}'
        verify(line in body.decode(), f"/metrics has no `{line}`")
    return check


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
        figures: dict[str, float] = {}
        try:
            wait_for(lambda: port_open(port), 20, "the API to listen")
            assert controller.process is not None
            time.sleep(3)
            idle = rss_mib(controller.process.pid)
            for path, check in (("/api/v1/nodes", nodes_listed(args.nodes)), ("/metrics", metrics_count(args.nodes))):
                rates = [rate(port, path, args.requests, check) for _ in range(args.runs)]
                print(f"GET {path}: median {statistics.median(rates):,.0f} requests/s over {args.runs} runs of "
                      f"{args.requests} (min {min(rates):,.0f}, max {max(rates):,.0f}); {args.nodes} nodes")
                name = path.rsplit("/", 1)[-1]
                figures |= {f"{name}_rps_median": round(statistics.median(rates)),
                            f"{name}_rps_min": round(min(rates)), f"{name}_rps_max": round(max(rates))}
            after = rss_mib(controller.process.pid)
            print(f"controller RSS: {idle:.1f} MiB idle after start, {after:.1f} MiB after the runs")
            figures |= {"rss_mib_idle": round(idle, 1), "rss_mib_after": round(after, 1)}
        finally:
            controller.stop()
            broker.stop()
        print(f"written to {write_results('http_api', figures, nodes=args.nodes, requests=args.requests, runs=args.runs)}")


if __name__ == "__main__":
    main()
