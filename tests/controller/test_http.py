"""The controller's HTTP endpoints: metrics and reads for anyone on the host, changes only with the token."""

from __future__ import annotations

import contextlib
import http.client
import json
import select
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.controller.test_end_to_end import start_agent, start_controller
from tests.support.procs import VetdProcess, run_vetd, vetd_env
from tests.support.services import Mosquitto, Slurm, free_port
from tests.support.wait import wait_for

MiB = 1024 * 1024


def call(url: str, body: dict[str, object] | None = None, token: str = "") -> tuple[int, str]:
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                     method="GET" if body is None else "POST")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_metrics_reads_and_token_guarded_drain(tmp_path: Path, mosquitto: Mosquitto, cluster_name: str) -> None:
    port = free_port()
    token = "t" * 40
    (tmp_path / "token").write_text(token + "\n")
    (tmp_path / "token").chmod(0o600)
    config = tmp_path / "controller.toml"
    config.write_text(f'cluster = "{cluster_name}"\nclient_id = "c-{cluster_name}"\n[store]\npath = "state/c.db"\n'
                      f'[http]\nlisten = "127.0.0.1:{port}"\ntoken_file = "{tmp_path / "token"}"\n')
    controller = start_controller(tmp_path, config, mosquitto, {})
    agent = start_agent(tmp_path, mosquitto, cluster_name, "nid001", '[agent]\ninterval = "1s"\n')
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: '"http_listening"' in controller.output, 10, "http up")
        wait_for(lambda: 'vetd_controller_events_total{event="results"}' in call(f"{base}/metrics")[1], 20,
                 "results counted in metrics")
        status, text = call(f"{base}/metrics")
        assert status == 200 and 'vetd_nodes{state="healthy"} 1' in text
        assert "vetd_nodes_online 1" in text
        status, nodes = call(f"{base}/api/v1/nodes")
        assert status == 200 and json.loads(nodes)[0]["node"] == "nid001"

        assert call(f"{base}/api/v1/drain", {"nodes": "nid001", "reason": "x"})[0] == 401
        assert call(f"{base}/api/v1/drain", {"nodes": "nid001", "reason": "x"}, "wrong" * 8)[0] == 401
        assert call(f"{base}/api/v1/drain", {"nodes": "nid[001", "reason": "x"}, token)[0] == 400
        status, body = call(f"{base}/api/v1/drain", {"nodes": "nid001", "reason": "fan"}, token)
        assert status == 202 and json.loads(body)["nodes"] == ["nid001"]
        wait_for(lambda: run_vetd("excluded", "--config", str(config)).stdout.strip() == "nid001", 10, "drained")
        assert call(f"{base}/nope")[0] == 404
    finally:
        agent.stop(), controller.stop()


def test_without_a_token_file_http_changes_nothing(tmp_path: Path, mosquitto: Mosquitto, cluster_name: str) -> None:
    port = free_port()
    config = tmp_path / "controller.toml"
    config.write_text(f'cluster = "{cluster_name}"\nclient_id = "c-{cluster_name}"\n[store]\npath = "state/c.db"\n'
                      f'[http]\nlisten = "127.0.0.1:{port}"\n')
    controller = start_controller(tmp_path, config, mosquitto, {})
    try:
        wait_for(lambda: '"http_listening"' in controller.output, 10, "http up")
        status, body = call(f"http://127.0.0.1:{port}/api/v1/resume", {"nodes": "nid001"}, "anything")
        assert status == 403 and "token_file" in body
    finally:
        controller.stop()


# -- limits: one client cannot take the controller down (issue 12, finding 8) --


def http_controller(tmp_path: Path, broker: Mosquitto, cluster: str, extra: str = "", more_http: str = "",
                    env: dict[str, str] | None = None, nofile: int = 0) -> tuple[int, VetdProcess]:
    """A ``vetd controller`` process with its API on a free port and a token ``"t" * 40``;
    ``extra``: top of its config, ``more_http``: more of ``[http]``, ``nofile``: its ``ulimit -n``."""
    port = free_port()
    (tmp_path / "token").write_text("t" * 40 + "\n")
    (tmp_path / "token").chmod(0o600)  # a token file others can read is refused
    config = tmp_path / "controller.toml"
    config.write_text(f'cluster = "{cluster}"\nclient_id = "c-{cluster}"\n{extra}[store]\npath = "state/c.db"\n'
                      f'[http]\nlisten = "127.0.0.1:{port}"\ntoken_file = "{tmp_path / "token"}"\n{more_http}')
    proc = VetdProcess(["controller", "--config", str(config)], tmp_path / "controller.log",
                       vetd_env(VETD_BROKER=broker.url, **(env or {})), nofile=nofile).start()
    wait_for(lambda: "broker_connected" in proc.output and '"http_listening"' in proc.output, 20, "controller up")
    return port, proc


def memory_kib(proc: VetdProcess, field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (the peak) of the process, in KiB."""
    assert proc.process is not None
    for line in Path(f"/proc/{proc.process.pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field}")


def open_fds(proc: VetdProcess) -> int:
    assert proc.process is not None
    return sum(1 for _ in Path(f"/proc/{proc.process.pid}/fd").iterdir())


def resource_limit(pid: int) -> int:
    """The soft ``Max open files`` of a process."""
    line = next(x for x in Path(f"/proc/{pid}/limits").read_text().splitlines() if x.startswith("Max open files"))
    return int(line.split()[3])


def answers(url: str, body: dict[str, object] | None = None, token: str = "") -> int:
    """The status, or 0 when the server refused or dropped the connection."""
    try:
        return call(url, body, token)[0]
    except (OSError, http.client.HTTPException):
        return 0


def test_an_endless_header_is_cut_off_and_memory_stays_bounded(
    tmp_path: Path, mosquitto: Mosquitto, cluster_name: str
) -> None:
    port, controller = http_controller(tmp_path, mosquitto, cluster_name)
    try:
        peak_before = memory_kib(controller, "VmHWM")
        sent, line = 0, 0
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"GET /api/v1/nodes HTTP/1.1\r\nHost: vetd\r\n")
            try:
                while sent < 50 * MiB:  # header lines with names of their own, 1 MiB at a time
                    chunk = b"".join(b"X-Filler-%08d: %s\r\n" % (line + i, b"a" * 100) for i in range(8000))
                    line += 8000
                    sock.sendall(chunk)
                    sent += len(chunk)
                cut_off = False
            except (BrokenPipeError, ConnectionResetError):
                cut_off = True
        assert cut_off and sent < 16 * MiB, f"the server read {sent / MiB:.0f} MiB of one request's header"
        growth = (memory_kib(controller, "VmHWM") - peak_before) / 1024
        assert growth < 10, f"the controller's peak RSS grew {growth:.0f} MiB"
        assert answers(f"http://127.0.0.1:{port}/api/v1/nodes") == 200
    finally:
        controller.stop()


@pytest.mark.xdist_group("timing")  # bounds a duration: beside no other such test (tests/conftest.py)
def test_a_trickled_header_is_timed_out(tmp_path: Path, mosquitto: Mosquitto, cluster_name: str) -> None:
    port, controller = http_controller(tmp_path, mosquitto, cluster_name, more_http='header_timeout = "1s"\n')
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            opened = time.monotonic()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                for byte in b"GET /api/v1/nodes HTTP/1.1\r\nHost: vetd\r\nX-Slow: " + b"a" * 100:
                    sock.sendall(bytes([byte]))  # one byte every 50 ms: never a whole head
                    if select.select([sock], [], [], 0.05)[0]:
                        break
            closed = wait_for(lambda: select.select([sock], [], [], 0.1)[0] and time.monotonic(), 5, "closed")
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(100) == b""
        assert 0.9 < closed - opened < 3
    finally:
        controller.stop()


@pytest.mark.xdist_group("timing")  # bounds a duration: beside no other such test (tests/conftest.py)
def test_answers_on_a_kept_alive_connection_do_not_wait_for_acks(
    tmp_path: Path, mosquitto: Mosquitto, cluster_name: str
) -> None:
    """Prometheus keeps its connection: an answer must not sit out a 40 ms delayed ACK (TCP_NODELAY)."""
    port, controller = http_controller(tmp_path, mosquitto, cluster_name)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        started = time.monotonic()
        for _ in range(20):
            conn.request("GET", "/metrics")
            response = conn.getresponse()
            assert response.status == 200 and b"vetd_nodes_online" in response.read()
            assert not response.will_close
        assert time.monotonic() - started < 0.6
        conn.close()
    finally:
        controller.stop()


def test_a_client_that_stops_reading_is_dropped(tmp_path: Path, mosquitto: Mosquitto, cluster_name: str) -> None:
    port, controller = http_controller(tmp_path, mosquitto, cluster_name, more_http='request_timeout = "1s"\n')
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            # pipelined requests whose answers (MiBs) it never reads
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: vetd\r\n\r\n" * 2500)
            wait_for(lambda: "http_client_not_reading" in controller.output, 15, "the reader dropped")
        assert answers(f"http://127.0.0.1:{port}/healthz") == 200
    finally:
        controller.stop()


def _body_answer(port: int, head: bytes, body: bytes, total: int) -> tuple[bytes, int]:
    """Send ``head`` then ``body`` again and again up to ``total`` bytes, stopping as soon
    as the server answers; returns the answer's first line and the body bytes sent."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while sent < total and not select.select([sock], [], [], 0)[0]:
                sock.sendall(body)
                sent += len(body)
        select.select([sock], [], [], 10)
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while (data := sock.recv(65536)) and b"\r\n" not in answer:
                answer += data
    return answer.split(b"\r\n", 1)[0], sent


def test_an_oversized_body_gets_413_before_it_is_read(tmp_path: Path, mosquitto: Mosquitto, cluster_name: str) -> None:
    port, controller = http_controller(tmp_path, mosquitto, cluster_name)
    auth = b"Authorization: Bearer " + b"t" * 40 + b"\r\n"
    try:
        # announced: answered from the header, without waiting for the body
        status, sent = _body_answer(port, b"POST /api/v1/drain HTTP/1.1\r\nHost: vetd\r\n" + auth
                                    + b"Content-Length: 104857600\r\n\r\n", b"", 0)
        assert status.startswith(b"HTTP/1.1 413"), status
        # not announced (chunked): counted as it comes and refused at the limit
        chunk = b"10000\r\n" + b"a" * 0x10000 + b"\r\n"
        status, sent = _body_answer(port, b"POST /api/v1/drain HTTP/1.1\r\nHost: vetd\r\n" + auth
                                    + b"Transfer-Encoding: chunked\r\n\r\n", chunk, 100 * MiB)
        assert status.startswith(b"HTTP/1.1 413"), status
        assert sent < 32 * MiB
        assert answers(f"http://127.0.0.1:{port}/api/v1/nodes") == 200
    finally:
        controller.stop()


@pytest.mark.slurm
def test_idle_connections_beyond_the_limit_do_not_stop_a_drain(
    tmp_path: Path, mosquitto: Mosquitto, slurm: Slurm, cluster_name: str
) -> None:
    """Under ``ulimit -n 256``, 400 connections that never send a byte: the
    controller still drains through scontrol (pipes, a subprocess) while they
    are open, and its API answers again once they are timed out."""
    port, controller = http_controller(tmp_path, mosquitto, cluster_name, '[scheduler]\nbackend = "slurm"\n',
                                       env={"SLURM_CONF": str(slurm.conf)}, nofile=256)
    config = tmp_path / "controller.toml"
    base = f"http://127.0.0.1:{port}"
    idle: list[socket.socket] = []
    try:
        assert controller.process is not None
        assert resource_limit(controller.process.pid) == 256
        fds = open_fds(controller)
        for _ in range(400):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            idle.append(sock)
        samples: list[int] = []

        def settled() -> bool:  # the controller took in all it will: its descriptor count holds for 1 s
            samples.append(open_fds(controller))
            return samples[-1] >= fds + 90 and len(samples) >= 10 and len(set(samples[-10:])) == 1

        wait_for(settled, 15, "the idle connections accepted", interval=0.1)

        done = run_vetd("drain", "nid002", "--reason", "held connections", "--config", str(config))
        assert done.returncode == 0, done.stderr
        wait_for(lambda: "drain" in slurm.states()["nid002"], 20, "nid002 drained while the connections are held")
        assert open_fds(controller) < 256 - 16, "the controller let connections take nearly every descriptor"

        wait_for(lambda: answers(f"{base}/healthz") == 200, 30, "the API answers again")
        assert answers(f"{base}/api/v1/drain", {"nodes": "nid003", "reason": "fan"}, "t" * 40) == 202
        wait_for(lambda: "drain" in slurm.states()["nid003"], 20, "nid003 drained through the API")
        assert controller.process is not None and controller.process.poll() is None
    finally:
        for sock in idle:
            sock.close()
        controller.stop()
        for node in ("nid002", "nid003"):
            slurm.resume(node)
