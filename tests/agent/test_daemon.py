"""`vetd agent` as a real process against a real Mosquitto."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
import uuid
from pathlib import Path

from tests.support.procs import VetdProcess, Watcher, publish_raw, vetd_env
from tests.support.services import Mosquitto
from tests.support.wait import wait_for
from vetd.core import protocol
from vetd.core.protocol import Command, Reply, Result, State


def agent(tmp_path: Path, broker: Mosquitto, cluster: str, config: str, node: str = "nid001",
          **env: str) -> VetdProcess:
    path = tmp_path / f"agent-{node}.toml"
    path.write_text(config)
    return VetdProcess(["agent", "--config", str(path)], tmp_path / f"agent-{node}.log",
                       vetd_env(VETD_BROKER=broker.url, VETD_CLUSTER=cluster, VETD_NODE=node, **env))


def results(watcher: Watcher, check: str | None = None) -> list[Result]:
    return [m for m in watcher.select(lambda m: isinstance(m, Result)) if check in (None, m.check)]  # type: ignore[misc]


def states(watcher: Watcher) -> list[State]:
    return watcher.select(lambda m: isinstance(m, State))  # type: ignore[return-value]


def test_birth_results_and_offline_state_on_sigterm(tmp_path: Path, mosquitto: Mosquitto, cluster_name: str) -> None:
    watcher = Watcher(mosquitto.port, f"vetd/v1/{cluster_name}/#")
    proc = agent(tmp_path, mosquitto, cluster_name, '[agent]\ninterval = "300ms"\n').start()
    try:
        birth = wait_for(lambda: [s for s in states(watcher) if s.online], 15, "birth", )[0]
        assert birth.node == "nid001" and "host_memory" in birth.checks and birth.labels["cpus"]
        wait_for(lambda: {r.check for r in results(watcher)} >= {"host_memory", "host_disk", "host_env",
                                                                  "host_paths", "host_load"}, 15, "host results")
        seqs = [r.seq for r in results(watcher)]
        assert seqs == list(range(1, len(seqs) + 1))
        assert all(r.session == birth.session for r in results(watcher))
        started = time.monotonic()
        assert proc.stop(timeout=10) == 0
        assert time.monotonic() - started < 8
    finally:
        proc.kill()
    offline = wait_for(lambda: [s for s in states(watcher) if not s.online], 5, "offline state")[0]
    assert (offline.session, offline.reason) == (birth.session, "agent stopped")
    watcher.close()
    # retained: a late subscriber learns the node is offline
    late = Watcher(mosquitto.port, f"vetd/v1/{cluster_name}/node/+/state")
    assert wait_for(lambda: states(late), 5, "retained state")[-1].online is False
    late.close()


def test_last_will_marks_a_killed_agent_offline(tmp_path: Path, mosquitto: Mosquitto, cluster_name: str) -> None:
    watcher = Watcher(mosquitto.port, f"vetd/v1/{cluster_name}/node/+/state")
    proc = agent(tmp_path, mosquitto, cluster_name, '[agent]\ninterval = "1s"\n').start()
    wait_for(lambda: any(s.online for s in states(watcher)), 15, "birth")
    proc.kill()
    will = wait_for(lambda: [s for s in states(watcher) if not s.online], 10, "Last Will")[0]
    assert will.reason == "connection lost"
    watcher.close()


def test_raising_and_hanging_checks_are_results_and_others_keep_their_schedule(
    tmp_path: Path, mosquitto: Mosquitto, cluster_name: str
) -> None:
    watcher = Watcher(mosquitto.port, f"vetd/v1/{cluster_name}/#")
    proc = agent(tmp_path, mosquitto, cluster_name,
                 '[agent]\nshutdown_grace = "1s"\nload_plugins = ["vetd_testplugin"]\ndisable_plugins = ["host"]\njitter = 0.0\n'
                 '[plugins.testplugin]\ninterval = "200ms"\nhang_timeout = "300ms"\n').start()
    try:
        wait_for(lambda: len(results(watcher, "hangs")) >= 3 and len(results(watcher, "steady")) >= 8, 20,
                 "three runs of the hanging check and eight of the steady one")
        hangs = results(watcher, "hangs")
        assert (hangs[0].status, hangs[0].codes) == ("timeout", ["timeout"])
        assert all((r.status, r.codes) == ("timeout", ["still_running"]) for r in hangs[1:3])
        raises = results(watcher, "raises")
        assert raises and all(r.status == "error" and "RuntimeError: sensor exploded" in r.message for r in raises)
        steady = results(watcher, "steady")
        assert all(r.status == "pass" for r in steady)
        # 200 ms interval, no jitter: the steady check ran on schedule the whole time
        span = steady[-1].ts - steady[0].ts
        assert len(steady) >= 8 and span / (len(steady) - 1) < 0.3
    finally:
        assert proc.stop() == 0
    watcher.close()


def test_agent_reconnects_after_a_broker_restart_and_loses_nothing(
    tmp_path: Path, own_mosquitto: Mosquitto, cluster_name: str
) -> None:
    # One watcher with a session the broker keeps across its restart: every result
    # the agent made, before, during and after the outage, must reach it.
    watcher = Watcher(own_mosquitto.port, f"vetd/v1/{cluster_name}/node/+/result", session=f"w-{cluster_name}")
    proc = agent(tmp_path, own_mosquitto, cluster_name, '[agent]\nshutdown_grace = "1s"\ninterval = "200ms"\n').start()
    try:
        wait_for(lambda: len(results(watcher)) >= 5, 15, "results before the restart")
        own_mosquitto.stop()
        outage = (time.time(), None)
        time.sleep(1.5)  # the outage itself: the agent keeps checking meanwhile
        outage = (outage[0], time.time())
        own_mosquitto.start()
        made_during = lambda: [r for r in results(watcher) if outage[0] < r.ts < outage[1]]  # noqa: E731
        wait_for(lambda: len(made_during()) >= 3 and len(results(watcher)) >= 30, 30,
                 "results made during the outage, and more after it")
        assert "broker_unavailable" in proc.output and proc.output.count("broker_connected") >= 2
    finally:
        proc.stop()
    sessions = {r.session for r in results(watcher)}
    assert len(sessions) == 1  # one agent run throughout: a restart of the agent would hide a loss
    seqs = sorted({r.seq for r in results(watcher)})  # QoS 1 may deliver one twice: that is not a loss
    # every sequence number from the first result on arrived: nothing of the outage was lost
    assert seqs == list(range(1, seqs[-1] + 1)), [s for s in range(1, seqs[-1] + 1) if s not in seqs][:10]
    watcher.close()


def test_sighup_reloads_the_config(tmp_path: Path, mosquitto: Mosquitto, cluster_name: str) -> None:
    watcher = Watcher(mosquitto.port, f"vetd/v1/{cluster_name}/#")
    proc = agent(tmp_path, mosquitto, cluster_name, '[agent]\nshutdown_grace = "1s"\ninterval = "200ms"\n').start()
    try:
        wait_for(lambda: results(watcher, "host_paths"), 15, "host_paths result")
        assert all(r.status == "pass" for r in results(watcher, "host_paths"))
        config = tmp_path / "agent-nid001.toml"
        config.write_text('[agent]\nshutdown_grace = "1s"\ninterval = "200ms"\n[plugins.host]\nrequired_paths = ["/no/such/lustre"]\n')
        proc.signal(signal.SIGHUP)
        wait_for(lambda: any(r.status == "fail" for r in results(watcher, "host_paths")), 15, "reloaded check")
        config.write_text("[agent]\nnot_a_key = 1\n")
        proc.signal(signal.SIGHUP)
        wait_for(lambda: "reload_failed" in proc.output, 10, "reload failure logged")
        count = len(results(watcher, "host_paths"))
        wait_for(lambda: len(results(watcher, "host_paths")) > count + 2, 10, "checks still running")
    finally:
        assert proc.stop() == 0
    watcher.close()


def test_systemd_ready_and_watchdog(tmp_path: Path, mosquitto: Mosquitto, cluster_name: str) -> None:
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(0.2)
        proc = agent(tmp_path, mosquitto, cluster_name, '[agent]\nshutdown_grace = "1s"\n', NOTIFY_SOCKET=address, WATCHDOG_USEC="400000").start()
        seen: list[str] = []

        def receive() -> list[str]:
            with contextlib.suppress(TimeoutError):
                seen.append(sock.recv(256).decode())
            return seen

        try:
            wait_for(lambda: "READY=1" in receive() and receive().count("WATCHDOG=1") >= 3, 15, "READY and pings")
        finally:
            proc.signal(signal.SIGTERM)
            wait_for(lambda: "STOPPING=1" in receive(), 10, "STOPPING=1")
            assert proc.stop() == 0


def test_the_watchdog_goes_quiet_while_the_event_loop_is_blocked(
    tmp_path: Path, mosquitto: Mosquitto, cluster_name: str
) -> None:
    """systemd restarts a unit whose pings stop: they must stop when the loop is stuck, and only then
    (a hung check in a thread keeps them going: tests/plugins/gpu_health/test_gpu_agent.py)."""
    address = str(tmp_path / "notify.sock")
    pings: list[float] = []  # arrival times of WATCHDOG=1
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(0.1)
        stop = threading.Event()

        def listen() -> None:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    if b"WATCHDOG=1" in sock.recv(256):
                        pings.append(time.monotonic())

        listener = threading.Thread(target=listen, name="notify-listener")
        listener.start()
        watcher = Watcher(mosquitto.port, f"vetd/v1/{cluster_name}/#")
        proc = agent(tmp_path, mosquitto, cluster_name,
                     '[agent]\nshutdown_grace = "1s"\nload_plugins = ["vetd_testplugin"]\ndisable_plugins = ["host", "gpu_health"]\n'
                     '[plugins.testplugin]\nonly = ["steady"]\n[commands]\nallow = ["block_loop"]\n',
                     NOTIFY_SOCKET=address, WATCHDOG_USEC="400000")  # a ping every 0.2 s
        try:
            proc.start()
            wait_for(lambda: len(pings) >= 5 and "broker_connected" in proc.output, 15, "steady pings")
            command = Command(cluster=cluster_name, node="nid001", session="t", seq=0, ts=time.time(),
                              id=uuid.uuid4().hex, action="block_loop", args={"seconds": "2"},
                              expires=time.time() + 60)
            sent = time.monotonic()
            publish_raw(mosquitto.port, protocol.topic_for(command), protocol.encode(command))
            reply = wait_for(lambda: [m for m in watcher.select(lambda m: isinstance(m, Reply))
                                      if m.id == command.id], 15, "the block_loop reply")[0]
            assert reply.ok, reply.message
            wait_for(lambda: len([t for t in pings if t > time.monotonic() - 1]) >= 3, 5, "pings again")
        finally:
            proc.stop()
            stop.set()
            listener.join(5)
            watcher.close()
    gaps = [(b - a, a) for a, b in zip(pings, pings[1:], strict=False) if a >= sent - 0.5]
    longest, began = max(gaps)
    # the 2 s block is one silence of about 2 s (systemd, at WatchdogSec=0.4 s, would have
    # restarted the agent); every other gap stays near the 0.2 s interval
    assert 1.7 < longest < 3.5, gaps
    assert began >= sent - 0.3 and all(gap < 0.6 for gap, at in gaps if at != began), gaps
