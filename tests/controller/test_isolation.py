"""One message cannot stop the controller: whatever fails is dropped on its own (issue 12, finding 1)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.fuzz import examples
from tests.support.procs import VetdProcess, publish_raw, vetd_env
from tests.support.services import Mosquitto
from tests.support.wait import wait_for
from vetd.controller.config import AlertsSection, ControllerConfig, StoreSection
from vetd.controller.service import Controller
from vetd.controller.store import Store
from vetd.core import protocol
from vetd.core.protocol import Event, Reply, Result, State

DEFAULT_RULES = Path(__file__).resolve().parents[2] / "packaging" / "rules" / "default.yaml"
DEAD_RECEIVER = "http://127.0.0.1:9/api/v2/alerts"  # alerting on: firing alerts are kept, resolved


def make(tmp_path: Path) -> Controller:
    return Controller(ControllerConfig(cluster="alps", rules=[str(DEFAULT_RULES)],
                                       store=StoreSection(path=str(tmp_path / "c.db")),
                                       alerts=AlertsSection(urls=[DEAD_RECEIVER])))


def wire(message: protocol.Message) -> tuple[str, bytes]:
    return protocol.topic_for(message), protocol.encode(message)


def result(node: str, seq: int, status: str = "pass", ts: float = 100.0, **kw: Any) -> Result:
    return Result(cluster="alps", node=node, session="s", seq=seq, ts=ts, check="x", status=status,  # type: ignore[arg-type]
                  **kw)


def test_a_node_clock_at_the_end_of_time_breaks_nothing(tmp_path: Path) -> None:
    """Within the protocol's bounds (ts up to 1.8e308), a warn stamped at the end of time then a
    pass made the alert's start unprintable: the whole batch raised, every node's results lost."""
    controller = make(tmp_path)
    controller.process([wire(result("evil", 1, "warn", ts=1e308))])
    controller.process([wire(result("evil", 2)), wire(result("good", 1))])
    assert [r["node"] for r in controller.store.latest()] == ["evil", "good"]


def test_sequence_numbers_near_2_63_in_two_sessions_still_show_delivery(tmp_path: Path) -> None:
    controller = make(tmp_path)
    top = 2**63 - 1
    controller.process([wire(Result(cluster="alps", node="n1", session=s, seq=top, ts=1.0, check="x",
                                    status="pass")) for s in ("a", "b")])
    assert controller.store.delivery("alps", "n1")["received"] == 2


def test_a_message_that_fails_is_dropped_alone_and_leaves_no_trace(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    controller = make(tmp_path)
    controller.process([wire(result("n1", 1, "warn")), wire(result("n2", 1, "warn"))])
    engine = controller.engine
    real = engine.on_result

    def breaks_on_n2(message: Any, *args: Any) -> None:
        real(message, *args)  # the model and the store are changed first…
        if message.node == "n2":
            raise RuntimeError("boom")  # …then it fails

    monkeypatch.setattr(engine, "on_result", breaks_on_n2)
    decided = controller.process([wire(result("n1", 2)), wire(result("n2", 2)),
                                  wire(result("n3", 1, "fail"))])
    assert {d.node for d in decided.drains} == {"n3"}
    assert controller.counters["malformed"] == 1 and controller.counters["failed_in_processing"] == 1
    # n2's pass left no trace: in memory and in the store, its warn still fires
    key = "check-warning|alps|n2|result:x:node"
    assert key in engine.firing_alerts and key in controller.store.firing_alerts()
    assert [h["seq"] for h in controller.store.history("alps", "n2")] == [1]
    assert "check-warning|alps|n1|result:x:node" not in engine.firing_alerts  # n1's pass counted
    assert controller.store.nodes[("alps", "n3")].state == "excluded"
    monkeypatch.undo()
    # the model is what the store holds: a restarted controller decides the same
    assert controller.process([wire(result("n2", 2))]).alerts[0].alerts[0]["endsAt"]
    reopened = Controller(controller.config)
    assert reopened.engine.firing_alerts == engine.firing_alerts


names = st.text(alphabet="abz09_.-", min_size=1, max_size=8).filter(protocol.valid_name)
idents = st.text(min_size=1, max_size=12).filter(lambda s: all(c >= " " and not "\x7f" <= c <= "\x9f" for c in s))
stamps = st.one_of(st.floats(min_value=0, max_value=1.7e308), st.sampled_from([0.0, 1e308, 1.7e308, 253402300800.0]))
seqs = st.one_of(st.integers(min_value=0, max_value=2**63 - 1), st.sampled_from([0, 2**63 - 1]))
common = {"cluster": st.just("alps"), "node": st.sampled_from(["n1", "n2"]), "session": st.sampled_from(["s", "t"]),
          "seq": seqs, "ts": stamps}
metrics = st.dictionaries(idents, st.floats(allow_nan=False, allow_infinity=False), max_size=4)
wire_messages = st.one_of(
    st.builds(Result, **common, check=st.sampled_from(["x", "vetd_agent", "gpu_health"]) | idents,
              status=st.sampled_from(protocol.STATUSES), entity=st.sampled_from(["node", "gpu0"]) | idents,
              metrics=metrics, message=st.text(max_size=20)),
    st.builds(Event, **common, name=st.sampled_from(["xid"]) | idents,
              severity=st.sampled_from(["info", "warning", "critical"]), entity=idents, metrics=metrics),
    st.builds(State, **common, online=st.booleans(), started=stamps,
              labels=st.dictionaries(st.sampled_from(["node", "alertname", "partition", "gpu_driver"]) | idents,
                                     st.text(max_size=10), max_size=3)),
    st.builds(Reply, **common, id=st.sampled_from(["", "x"]), ok=st.booleans()),
)


@settings(max_examples=examples(60), suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(wire_messages, min_size=1, max_size=6))
def test_any_message_that_decodes_is_processed_without_raising(batch: list[Any]) -> None:
    """Engine and store take whatever the protocol's bounds let through (none is left out as failed)."""
    controller = Controller(ControllerConfig(cluster="alps", rules=[str(DEFAULT_RULES)],
                                             store=StoreSection(path=":memory:"),
                                             alerts=AlertsSection(urls=[DEAD_RECEIVER])))
    for message in batch:
        assert protocol.decode(protocol.encode(message)) == message
    controller.process([wire(m) for m in batch], now=1000.0)
    controller.process([wire(m) for m in batch], now=2000.0)  # duplicates, and later
    controller.agent_tick(now=1e6)
    assert controller.counters["failed_in_processing"] == 0
    controller.store.close()


def test_a_retained_hostile_message_cannot_keep_the_controller_down(tmp_path: Path, own_mosquitto: Mosquitto) -> None:
    config = tmp_path / "controller.toml"
    config.write_text(f'cluster = "alps"\nclient_id = "c-isolation"\nrules = ["{DEFAULT_RULES}"]\n'
                      f'[alerts]\nurls = ["{DEAD_RECEIVER}"]\n[store]\npath = "c.db"\n[http]\nlisten = ""\n')
    env = vetd_env(VETD_BROKER=own_mosquitto.url)
    # Retained on the node's own topics: a warn from the end of time, and the pass that resolves it.
    publish_raw(own_mosquitto.port, "vetd/v1/alps/node/evil/result",
                protocol.encode(result("evil", 1, "warn", ts=1e308)), retain=True)
    ctl = VetdProcess(["controller", "--config", str(config)], tmp_path / "c.log", env).start()
    try:
        wait_for(lambda: "broker_connected" in ctl.output, 20, "controller connected")
        wait_for(lambda: stored(tmp_path, "evil"), 20, "the warn stored")
        publish_raw(own_mosquitto.port, "vetd/v1/alps/node/evil/state",
                    protocol.encode(State(cluster="alps", node="evil", session="s", seq=0, ts=1.0, online=True,
                                          started=1.7e308, labels={"node": "victim", "alertname": "x"})),
                    retain=True)
        publish_raw(own_mosquitto.port, "vetd/v1/alps/node/evil/result", protocol.encode(result("evil", 2)),
                    retain=True)
        for n in range(5):
            publish_raw(own_mosquitto.port, f"vetd/v1/alps/node/good{n}/result", protocol.encode(result(f"good{n}", 1)))
        wait_for(lambda: stored(tmp_path, "good4"), 20, "good results stored")
        assert ctl.process is not None and ctl.process.poll() is None, ctl.output[-3000:]
    finally:
        assert ctl.stop() == 0, ctl.output[-3000:]
    # restarted into the same retained messages: up, and nothing stored twice
    again = VetdProcess(["controller", "--config", str(config)], tmp_path / "c2.log", env).start()
    try:
        wait_for(lambda: "broker_connected" in again.output, 20, "controller connected again")
        assert again.process is not None and again.process.poll() is None
    finally:
        assert again.stop() == 0, again.output[-3000:]


def stored(tmp_path: Path, node: str) -> bool:
    if not (tmp_path / "c.db").exists():
        return False
    store = Store(tmp_path / "c.db", readonly=True)
    try:
        return bool(store.latest("alps", node))
    finally:
        store.close()
