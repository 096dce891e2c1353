"""Nothing lost, nothing twice: fault injection against a real Mosquitto.

An agent produces 10 results per second (the test plugin's ``steady`` check
at 100 ms); a controller stores them. Each test breaks something in the
middle and then checks, by sequence number, that every result the agent
made was stored exactly once, in order. The counts are printed (run with -s).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from tests.support.procs import VetdProcess, vetd_env
from tests.support.services import Mosquitto
from tests.support.wait import wait_for
from vetd.controller.store import Store

pytestmark = pytest.mark.slow  # a 60 s outage, broker stalls and restarts

OUTAGE_S = 60.0
AGENT = ('[agent]\nload_plugins = ["vetd_testplugin"]\ndisable_plugins = ["host", "gpu_health"]\n'
         'keepalive = {keepalive}\n[plugins.testplugin]\ninterval = "100ms"\nonly = ["steady"]\n')


def controller(tmp_path: Path, broker: Mosquitto, cluster: str, name: str = "controller") -> VetdProcess:
    config = tmp_path / "controller.toml"
    if not config.exists():
        config.write_text(f'cluster = "{cluster}"\nclient_id = "vetd-controller-{cluster}"\n'
                          '[store]\npath = "state/controller.db"\n')
    proc = VetdProcess(["controller", "--config", str(config)], tmp_path / f"{name}.log",
                       vetd_env(VETD_BROKER=broker.url)).start()
    wait_for(lambda: "broker_connected" in proc.output, 20, "controller connected")
    return proc


def agent(tmp_path: Path, broker: Mosquitto, cluster: str, name: str = "agent", keepalive: int = 30) -> VetdProcess:
    config = tmp_path / "agent.toml"
    config.write_text(AGENT.format(keepalive=keepalive))
    return VetdProcess(["agent", "--config", str(config)], tmp_path / f"{name}.log",
                       vetd_env(VETD_BROKER=broker.url, VETD_CLUSTER=cluster, VETD_NODE="nid001",
                                VETD_STATE_DIR=str(tmp_path / "agent-state"))).start()


def stored(tmp_path: Path) -> dict[str, list[int]]:
    """Sequence numbers stored per session, in the order they were stored."""
    path = tmp_path / "state" / "controller.db"
    if not path.exists():
        return {}
    store = Store(path, readonly=True)
    try:
        rows = store.db.execute("SELECT session, seq FROM history WHERE kind='result' ORDER BY id").fetchall()
        duplicates = store.db.execute("SELECT coalesce(sum(duplicates), 0) FROM sessions").fetchone()[0]
    finally:
        store.close()
    sessions: dict[str, list[int]] = {"_duplicates": [duplicates]}
    for session, seq in rows:
        sessions.setdefault(session, []).append(seq)
    return sessions


def last_seq(proc: VetdProcess) -> tuple[str, int]:
    line = next(line for line in proc.output.splitlines() if '"agent_stopped"' in line)
    record = json.loads(line)
    return record["session"], record["last_seq"]


def stop_and_collect(proc: VetdProcess, tmp_path: Path, timeout: float = 30) -> tuple[str, int]:
    """Stop the agent cleanly; wait until the controller has stored all it produced.
    Returns (session, results produced)."""
    assert proc.stop() == 0
    session, produced = last_seq(proc)
    wait_for(lambda: len(stored(tmp_path).get(session, [])) >= produced, timeout, "every result stored")
    return session, produced


def count(tmp_path: Path) -> int:
    return sum(len(v) for k, v in stored(tmp_path).items() if not k.startswith("_"))


def assert_exactly_once_in_order(seqs: list[int], produced: int) -> None:
    assert seqs == list(range(1, produced + 1)), (
        f"{len(seqs)} stored of {produced}; first differences: "
        f"{[(i + 1, s) for i, s in enumerate(seqs) if s != i + 1][:5]}")


def test_a_60s_broker_outage_loses_nothing(tmp_path: Path, own_mosquitto: Mosquitto, cluster_name: str) -> None:
    ctl = controller(tmp_path, own_mosquitto, cluster_name)
    node = agent(tmp_path, own_mosquitto, cluster_name)
    try:
        wait_for(lambda: count(tmp_path) >= 20, 20, "results before the outage")
        own_mosquitto.stop()
        outage_start = time.monotonic()
        time.sleep(OUTAGE_S)  # the outage itself: the agent keeps checking, 10 results a second
        own_mosquitto.start()
        outage = time.monotonic() - outage_start
        wait_for(lambda: count(tmp_path) >= 20 + 8 * outage, 60, "the spooled results delivered")
        session, produced = stop_and_collect(node, tmp_path)
        result = stored(tmp_path)
        assert_exactly_once_in_order(result[session], produced)
        print(f"\n60 s outage: produced {produced}, stored {len(result[session])} exactly once in order, "
              f"duplicates dropped {result['_duplicates'][0]}, outage {outage:.1f} s")
    finally:
        node.kill()
        ctl.stop()


def test_an_agent_killed_while_the_broker_is_down_delivers_its_spool_after_restart(
    tmp_path: Path, own_mosquitto: Mosquitto, cluster_name: str
) -> None:
    ctl = controller(tmp_path, own_mosquitto, cluster_name)
    first = agent(tmp_path, own_mosquitto, cluster_name, "agent1")
    try:
        wait_for(lambda: count(tmp_path) >= 10, 20, "results before the outage")
        own_mosquitto.stop()
        time.sleep(3)  # ~30 results spooled on disk
        first.signal(signal.SIGKILL)
        first.process.wait(10)  # type: ignore[union-attr]
        own_mosquitto.start()
        second = agent(tmp_path, own_mosquitto, cluster_name, "agent2")
        wait_for(lambda: len(stored(tmp_path)) >= 3, 30, "the new session's results")  # _duplicates + 2 sessions
        time.sleep(1)
        new_session, produced = stop_and_collect(second, tmp_path)
        result = stored(tmp_path)
        old_session = next(s for s in result if s not in ("_duplicates", new_session))
        old = result[old_session]
        assert old == list(range(1, len(old) + 1))  # contiguous: nothing of the killed agent's spool lost
        assert len(old) >= 10 + 20  # it includes what was made during the outage
        assert_exactly_once_in_order(result[new_session], produced)
        print(f"\nSIGKILL during outage: old session {len(old)} stored (1..{old[-1]}, no gaps), "
              f"new session {produced} produced, {len(result[new_session])} stored")
    finally:
        first.kill()
        ctl.stop()


def test_a_controller_killed_mid_stream_misses_nothing_and_decides_nothing_twice(
    tmp_path: Path, own_mosquitto: Mosquitto, cluster_name: str
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - name: steady-seen\n    when: result.check == 'steady'\n    actions: [drain]\n")
    (tmp_path / "controller.toml").write_text(
        f'cluster = "{cluster_name}"\nclient_id = "vetd-controller-{cluster_name}"\nrules = ["{rules}"]\n'
        '[store]\npath = "state/controller.db"\n')
    first = controller(tmp_path, own_mosquitto, cluster_name, "controller1")
    node = agent(tmp_path, own_mosquitto, cluster_name)
    try:
        wait_for(lambda: count(tmp_path) >= 20, 20, "results and the drain")
        first.signal(signal.SIGKILL)
        first.process.wait(10)  # type: ignore[union-attr]
        before = count(tmp_path)
        time.sleep(3)  # ~30 results reach the broker while no controller is there
        second = controller(tmp_path, own_mosquitto, cluster_name, "controller2")
        time.sleep(1)
        session, produced = stop_and_collect(node, tmp_path)
        result = stored(tmp_path)
        assert_exactly_once_in_order(result[session], produced)
        store = Store(tmp_path / "state" / "controller.db", readonly=True)
        drains = [a for a in store.audit_log() if a["action"] == "drain"]
        store.close()
        assert len(drains) == 1  # decided once, before the kill; the restart did not decide again
        # the broker kept the controller's session and queued everything: nobody was asked to resend
        assert '"resend_requested"' not in node.output
        second.stop()
        print(f"\ncontroller SIGKILL: {before} stored before, produced {produced}, stored {len(result[session])} "
              f"exactly once in order; drains decided: {len(drains)}")
    finally:
        node.kill()
        first.kill()


def test_what_an_agent_sent_before_the_controller_first_subscribed_arrives_at_once(
    tmp_path: Path, own_mosquitto: Mosquitto, cluster_name: str
) -> None:
    """The broker drops what nobody subscribes to. The agent had its PUBACKs and waits for the
    controller's acks; before: it waited 30 s (its ack timeout) for a quiet agent, and for ever
    for the first results of a steady one (the acks of later results reset the timer). Now the
    controller, finding the node's retained birth as it subscribes, asks it to send again."""
    node = agent(tmp_path, own_mosquitto, cluster_name)
    try:
        wait_for(lambda: '"broker_connected"' in node.output, 20, "the agent connected")
        time.sleep(2)  # ~20 results published into a broker with no subscriber for them
        ctl = controller(tmp_path, own_mosquitto, cluster_name)
        connected = time.monotonic()
        try:
            wait_for(lambda: 1 in next((v for k, v in stored(tmp_path).items() if not k.startswith("_")), []),
                     10, "the first result stored (ack timeout: 30 s)")
            first_stored = time.monotonic() - connected
            assert '"resend_requested"' in node.output
            session, produced = stop_and_collect(node, tmp_path)
            seqs = stored(tmp_path)[session]
            assert sorted(seqs) == list(range(1, produced + 1))  # all of them, once
            print(f"\nagent before controller: seq 1 stored {first_stored:.1f} s after the "
                  f"controller subscribed; {produced} produced, all stored once")
        finally:
            ctl.stop()
    finally:
        node.kill()


def test_a_stalled_broker_is_noticed_and_the_agent_catches_up(
    tmp_path: Path, own_mosquitto: Mosquitto, cluster_name: str
) -> None:
    ctl = controller(tmp_path, own_mosquitto, cluster_name)
    node = agent(tmp_path, own_mosquitto, cluster_name, keepalive=2)
    try:
        wait_for(lambda: count(tmp_path) >= 10, 20, "results before the stall")
        own_mosquitto.pause()
        try:
            wait_for(lambda: "broker_unavailable" in node.output, 15, "the agent to notice the stall")
        finally:
            own_mosquitto.resume()
        wait_for(lambda: node.output.count('"broker_connected"') >= 2, 30, "the agent to reconnect")
        time.sleep(1)
        session, produced = stop_and_collect(node, tmp_path, 60)
        assert_exactly_once_in_order(stored(tmp_path)[session], produced)
        print(f"\nSIGSTOP stall: produced {produced}, stored exactly once in order")
    finally:
        node.kill()
        ctl.stop()


def test_a_flooding_node_is_rate_limited_and_cannot_starve_the_others(
    tmp_path: Path, own_mosquitto: Mosquitto, cluster_name: str
) -> None:
    import paho.mqtt.client as paho

    from vetd.core import protocol
    from vetd.core.protocol import Result

    (tmp_path / "controller.toml").write_text(
        f'cluster = "{cluster_name}"\nclient_id = "vetd-controller-{cluster_name}"\n'
        '[store]\npath = "state/controller.db"\n[limits]\nper_node_rate = 200\nper_node_burst = 500\n')
    ctl = controller(tmp_path, own_mosquitto, cluster_name)
    node = agent(tmp_path, own_mosquitto, cluster_name)
    flood = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="flood")
    flood.connect("127.0.0.1", own_mosquitto.port)
    flood.loop_start()
    try:
        wait_for(lambda: count(tmp_path) >= 10, 20, "the good node's first results")
        started = time.monotonic()
        infos = []
        for seq in range(1, 10_001):
            message = Result(cluster=cluster_name, node="nid666", session="flood", seq=seq, ts=time.time(),
                             check="x", status="pass")
            infos.append(flood.publish(protocol.topic_for(message), protocol.encode(message), qos=0))
        for info in infos:
            info.wait_for_publish(30)
        elapsed = time.monotonic() - started
        time.sleep(2)
        session, produced = stop_and_collect(node, tmp_path)
        result = stored(tmp_path)
        assert_exactly_once_in_order(result[session], produced)
        flooded = len(result.get("flood", []))
        store = Store(tmp_path / "state" / "controller.db", readonly=True)
        limited = store.counters().get("rate_limited", 0)
        store.close()
        allowed = 500 + 200 * (elapsed + 3)
        assert flooded <= allowed and limited >= 10_000 - allowed - 100  # qos 0: a few may never arrive
        print(f"\nflood: 10,000 sent in {elapsed:.2f} s, {flooded} stored, {limited} rate-limited; "
              f"good node {produced} produced, all stored in order")
    finally:
        flood.loop_stop()
        node.kill()
        ctl.stop()
