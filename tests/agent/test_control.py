"""The agent's local control socket, against a real agent process and a real Mosquitto."""

from __future__ import annotations

import contextlib
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.procs import VetdProcess, Watcher, vetd_env
from tests.support.services import Mosquitto
from tests.support.wait import wait_for
from vetd.agent.controlclient import ControlError, ask
from vetd.core.protocol import Event, Result

TESTPLUGIN = '[agent]\nshutdown_grace = "1s"\nload_plugins = ["vetd_testplugin"]\ndisable_plugins = ["host", "gpu_health"]\n'


def start_agent(tmp_path: Path, broker: Mosquitto, cluster: str, config: str) -> tuple[VetdProcess, str]:
    sock = str(tmp_path / "agent.sock")
    path = tmp_path / "agent.toml"
    path.write_text(config)
    proc = VetdProcess(["agent", "--config", str(path)], tmp_path / "agent.log",
                       vetd_env(VETD_BROKER=broker.url, VETD_CLUSTER=cluster, VETD_NODE="nid001",
                                VETD_CONTROL_SOCKET=sock)).start()
    wait_for(lambda: Path(sock).exists(), 20, "the control socket")
    return proc, sock


@pytest.fixture
def steady_agent(tmp_path: Path, mosquitto: Mosquitto, cluster_name: str) -> Iterator[tuple[str, Watcher]]:
    watcher = Watcher(mosquitto.port, f"vetd/v1/{cluster_name}/#")
    proc, sock = start_agent(tmp_path, mosquitto, cluster_name, TESTPLUGIN
                             + '[plugins.testplugin]\ninterval = "200ms"\nhang_timeout = "2s"\n'
                             + 'only = ["steady", "hangs"]\n[checks.hangs]\nenabled = false\n')
    try:
        yield sock, watcher
    finally:
        assert proc.stop() == 0
        watcher.close()
    assert not Path(sock).exists(), "the agent removes its socket when it stops"


def raw(sock: str, payload: bytes) -> dict[str, Any]:
    import json

    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(5)
        client.connect(sock)
        with contextlib.suppress(BrokenPipeError):  # it answered an oversized request and hung up
            client.sendall(payload)
        return dict(json.loads(client.makefile("rb").readline()))


def test_status_verdicts_and_run_now(steady_agent: tuple[str, Watcher]) -> None:
    sock, watcher = steady_agent
    assert stat.S_IMODE(Path(sock).stat().st_mode) == 0o600
    status = ask(sock, {"op": "status"}, 5)
    assert status["ok"] and status["node"] == "nid001" and status["service"]["state"] == "in_service"
    verdicts = wait_for(lambda: ask(sock, {"op": "verdicts"}, 5)["verdicts"], 10, "a verdict")
    assert [(v["check"], v["entity"], v["status"]) for v in verdicts] == [("steady", "node", "pass")]
    ran = ask(sock, {"op": "run", "checks": ["steady"]}, 10)
    assert ran["ok"] and [v["status"] for v in ran["verdicts"]] == ["pass"]
    assert ran["verdicts"][0]["metrics"] == {"x": 1.0}
    # what a run finds is published like any result
    wait_for(lambda: [m for m in watcher.select(lambda m: isinstance(m, Result)) if m.profile == ""], 10,
             "the run's result on the wire")


def test_bad_requests_get_a_clear_error_and_the_connection_lives_on(steady_agent: tuple[str, Watcher]) -> None:
    sock, _ = steady_agent
    assert "bad request" in raw(sock, b"{not json\n")["error"]
    assert "`$.op`" in raw(sock, b'{"op": "reboot"}\n')["error"]
    assert "unknown check(s): nope" in ask(sock, {"op": "run", "checks": ["nope"]}, 5)["error"]
    assert ask(sock, {"op": "run"}, 5)["error"] == "run needs a profile or checks"
    assert "job_id" in ask(sock, {"op": "job_start", "job_id": "a b"}, 5)["error"]
    too_long = raw(sock, b'{"op": "status", "x": "' + b"a" * (2 * 1024 * 1024) + b'"}\n')
    assert (too_long["ok"], too_long["error"]) == (False, "request longer than 1048576 bytes")
    with socket.socket(socket.AF_UNIX) as client:  # two requests, one connection
        client.settimeout(5)
        client.connect(sock)
        client.sendall(b'{"op": "nope"}\n{"op": "status"}\n')
        lines = client.makefile("rb")
        assert b'"ok":false' in lines.readline() and b'"ok":true' in lines.readline()


@pytest.mark.xdist_group("timing")  # bounds a duration: beside no other such test (tests/conftest.py)
def test_a_slow_check_does_not_hold_up_other_clients(steady_agent: tuple[str, Watcher]) -> None:
    sock, _ = steady_agent
    slow: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: slow.update(ask(sock, {"op": "run", "checks": ["hangs"]}, 10)))
    thread.start()
    time.sleep(0.3)  # the slow run has started (nothing to wait on from outside)
    started = time.monotonic()
    for _ in range(5):
        assert ask(sock, {"op": "status"}, 5)["ok"]
    assert time.monotonic() - started < 1.0
    thread.join(10)
    assert slow["verdicts"][0]["status"] == "timeout" and slow["verdicts"][0]["codes"] == ["timeout"]


def test_results_and_events_carry_the_running_job(steady_agent: tuple[str, Watcher]) -> None:
    sock, watcher = steady_agent
    started = ask(sock, {"op": "job_start", "job_id": "4242", "user": "alice", "gpus": "0,1"}, 5)
    assert [j["id"] for j in started["jobs"]] == ["4242"]
    assert [j["user"] for j in ask(sock, {"op": "status"}, 5)["jobs"]] == ["alice"]
    wait_for(lambda: [m for m in watcher.select(lambda m: isinstance(m, Result)) if m.job_id == "4242"], 10,
             "a periodic result with the job id")
    assert ask(sock, {"op": "job_end", "job_id": "4242", "exit_code": 1, "state": "failed"}, 5)["jobs"] == []
    events = wait_for(lambda: [m for m in watcher.select(lambda m: isinstance(m, Event))
                               if m.name == "job_end"], 10, "the job_end event")
    assert events[0].job_id == "4242" and events[0].metrics["exit_code"] == 1.0
    assert (events[0].codes, events[0].data) == (["failed"], {"state": "failed"})  # the state, both ways
    starts = watcher.select(lambda m: isinstance(m, Event) and m.name == "job_start")
    assert [(e.job_id, e.data) for e in starts] == [("4242", {"user": "alice", "gpus": "0,1"})]
    # after the job, results carry no job id
    count = len(watcher.select(lambda m: isinstance(m, Result)))
    wait_for(lambda: len(watcher.select(lambda m: isinstance(m, Result))) > count + 2, 10, "later results")
    assert watcher.select(lambda m: isinstance(m, Result))[-1].job_id is None


def test_a_failing_check_makes_the_node_unfit(tmp_path: Path, mosquitto: Mosquitto, cluster_name: str) -> None:
    proc, sock = start_agent(tmp_path, mosquitto, cluster_name,
                             TESTPLUGIN + '[plugins.testplugin]\ninterval = "200ms"\nonly = ["raises"]\n')
    try:
        service = wait_for(lambda: ask(sock, {"op": "status"}, 5)["service"]["state"] == "unfit"
                           and ask(sock, {"op": "status"}, 5)["service"], 10, "the node unfit")
        assert service["failing"] == ["raises[node]"]
        assert "raises[node] error: RuntimeError: sensor exploded" in service["reason"]
    finally:
        assert proc.stop() == 0


@pytest.mark.xdist_group("timing")  # bounds a duration: beside no other such test (tests/conftest.py)
def test_the_client_says_when_no_agent_answers(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="is `vetd agent` running"):
        ask(str(tmp_path / "none.sock"), {"op": "status"}, 1)
    silent = socket.socket(socket.AF_UNIX)
    silent.bind(str(tmp_path / "silent.sock"))
    silent.listen()
    started = time.monotonic()
    with pytest.raises(ControlError, match="no answer from the agent .* within 0.3s"):
        ask(str(tmp_path / "silent.sock"), {"op": "status"}, 0.3)
    assert time.monotonic() - started < 1.0
    silent.close()
