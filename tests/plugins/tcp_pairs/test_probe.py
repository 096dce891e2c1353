"""The TCP stream probe measures the network: what ``tc`` lets through, and what iperf3 measures on it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import netns
from tests.support.netns import NetNodes
from tests.support.procs import REPO
from tests.support.services import missing
from tests.support.wait import wait_for
from vetd.agent.api import Peer
from vetd.plugins.tcp_pairs.config import TcpPairsConfig
from vetd.plugins.tcp_pairs.probe import MAGIC, TcpEndpoint

PORT = 18556
# the throughput figures are measured on this machine: one netns test at a time (tests/conftest.py)
pytestmark = pytest.mark.xdist_group("netns")


@pytest.fixture(scope="module")
def pair() -> Iterator[NetNodes]:
    if why := netns.unavailable():
        pytest.skip(why)
    nodes = NetNodes(2).start()
    nodes.throttle("nid001", "200mbit")  # 25 MB/s of IP packets: the figure to find
    server = subprocess.Popen(nodes.argv("nid002", [sys.executable, "-m", "tests.support.tcpprobe", "serve",
                                                    str(PORT)]), stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    yield nodes
    server.terminate()
    server.wait(10)
    nodes.stop()


def _probe(nodes: NetNodes, seconds: float = 2.0, streams: int = 2) -> dict[str, object]:
    out = nodes.run("nid001", sys.executable, "-m", "tests.support.tcpprobe", "measure", "nid002", str(PORT),
                    str(seconds), str(streams))
    result: dict[str, object] = json.loads(out)
    return result


def test_the_probe_measures_what_the_link_lets_through(pair: NetNodes) -> None:
    result = _probe(pair)
    assert result["error"] == ""
    gbps = float(result["gbps"])  # type: ignore[arg-type]
    # tbf counts whole packets; TCP payload is ~95 % of them
    assert 0.025 * 0.85 < gbps < 0.025 * 1.05, gbps
    detail = result["detail"]
    assert isinstance(detail, dict) and detail["streams"] == 2 and 1.5 < detail["seconds"] < 2.5


def test_the_probe_agrees_with_iperf3_on_the_same_link(pair: NetNodes) -> None:
    if absent := missing("iperf3"):
        pytest.skip(f"{', '.join(absent)} not installed (scripts/test installs them as root)")
    # not one-off (-1): a client that connects too early, or fails under load, must leave it serving
    server = subprocess.Popen(pair.argv("nid002", ["iperf3", "-s", "-p", str(PORT + 1)]),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    def iperf3() -> dict[str, Any] | None:
        try:  # refused until the server listens
            report: dict[str, Any] = json.loads(pair.run("nid001", "iperf3", "-c", "nid002", "-p", str(PORT + 1),
                                                         "-P", "2", "-t", "2", "-J"))
        except RuntimeError:
            return None
        # a run that failed midway (its report has "error", no totals) is tried again
        return report if "sum_received" in report.get("end", {}) else None

    try:
        iperf = wait_for(iperf3, 30, "iperf3 to measure")["end"]["sum_received"]["bits_per_second"] / 8e9
    finally:
        server.kill()
        server.wait()
    ours = float(_probe(pair)["gbps"])  # type: ignore[arg-type]
    assert abs(ours - iperf) / iperf < 0.10, (ours, iperf)


def test_a_peer_that_is_not_there_is_a_failed_sample() -> None:
    endpoint = TcpEndpoint(TcpPairsConfig(connect_timeout=1.0))
    try:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            closed = sock.getsockname()[1]
        sample = endpoint.measure(Peer("nid009", "127.0.0.1", {"port": closed}), 0.2, True, "k")
        assert sample.gbps is None and "refused" in sample.error.lower()
        assert endpoint.measure(Peer("nid009", "127.0.0.1", {}), 0.2, True, "k").error == \
            "nid009 announced no probe port"
    finally:
        endpoint.close()


def test_garbage_on_the_port_is_dropped_and_the_probe_still_serves() -> None:
    server, client = TcpEndpoint(TcpPairsConfig()), TcpEndpoint(TcpPairsConfig(streams=1))
    try:
        for junk in (b"GET / HTTP/1.0\r\n\r\n", b"", MAGIC[:4]):
            with socket.create_connection(("127.0.0.1", server.port)) as sock:
                sock.sendall(junk)
        sample = client.measure(Peer("self", "127.0.0.1", server.announce()), 0.3, True, "k")
        assert sample.gbps is not None and sample.gbps > 0.01
    finally:
        server.close()
        client.close()
