"""The controller's ingest path, driven with encoded wire messages."""

from __future__ import annotations

import time
from pathlib import Path

import msgspec
import pytest

from vetd.controller.config import BreakerSection, ControllerConfig, SchedulerSection, StoreSection
from vetd.controller.service import Controller
from vetd.core import protocol
from vetd.core.protocol import Event, Result, State

RULES = """\
rules:
  - name: host-failed
    when: result.status == "fail"
    severity: critical
    actions: [drain, alert]
  - name: fatal-xid
    when: event.name == "xid" && event.severity == "critical"
    actions: [drain]
"""


@pytest.fixture
def controller(tmp_path: Path) -> Controller:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    config = ControllerConfig(cluster="alps", rules=[str(rules)], store=StoreSection(path=str(tmp_path / "c.db")),
                              scheduler=SchedulerSection(backend="none"))
    return Controller(config)


def wire(message: protocol.Message) -> tuple[str, bytes]:
    return protocol.topic_for(message), protocol.encode(message)


def result(seq: int, status: str = "pass", node: str = "nid001", session: str = "s1", **kw: object) -> Result:
    return Result(cluster="alps", node=node, session=session, seq=seq, ts=1000.0 + seq,
                  check="host_env", status=status, **kw)  # type: ignore[arg-type]


def test_duplicates_are_counted_and_change_nothing(controller: Controller) -> None:
    batch = [wire(result(1)), wire(result(2)), wire(result(1)), wire(result(4))]
    controller.process(batch)
    controller.process([wire(result(2))])
    delivery = controller.store.delivery("alps", "nid001")
    assert delivery == {"received": 3, "duplicates": 2, "gaps": 1, "agent_dropped": {}}
    assert controller.counters["duplicates"] == 2


def test_a_failing_result_excludes_once_and_records_evidence(controller: Controller) -> None:
    first = controller.process([wire(result(1, "fail", message="unset: NCCL_NET"))])
    again = controller.process([wire(result(2, "fail", message="unset: NCCL_NET"))])
    assert [d.node for d in first.drains] == ["nid001"]
    assert again.drains == []
    node = controller.store.nodes[("alps", "nid001")]
    assert node.state == "excluded"
    assert node.reason == "vetd: host-failed: host_env unset: NCCL_NET"
    audit = controller.store.audit_log("alps", "nid001")
    drain = next(a for a in audit if a["action"] == "drain")
    assert drain["rule"] == "host-failed" and drain["outcome"] == "pending" and len(drain["evidence"]) == 1


def test_every_matching_event_is_evaluated(controller: Controller) -> None:
    xid = Event(cluster="alps", node="nid002", session="s", seq=1, ts=1.0, name="xid",
                severity="critical", entity="gpu3", codes=["xid_79"], message="GPU fell off the bus")
    decided = controller.process([wire(xid)])
    assert decided.drains[0].reason == "vetd: fatal-xid: xid[gpu3] GPU fell off the bus"


def test_malformed_messages_are_counted_and_the_batch_goes_on(controller: Controller) -> None:
    good = wire(result(1))
    wrong_type = msgspec.msgpack.encode({"kind": "result", "cluster": "alps", "node": "nid001",
                                         "session": "s1", "seq": 2, "ts": 1.0, "check": 7, "status": "pass"})
    batch = [
        ("vetd/v1/alps/node/nid001/result", b"\x00\xff garbage"),
        ("vetd/v1/alps/node/nid001/result", wrong_type),
        ("vetd/v1/alps/node/nid001/result", b"\xd9" + b"A" * 10_000_000),
        ("vetd/v1/alps/node/nid009/result", good[1]),
        good,
    ]
    controller.process(batch)
    assert controller.counters["malformed"] == 4
    assert controller.store.delivery("alps", "nid001")["received"] == 1
    assert controller.store.counters()["malformed"] == 4


def test_a_stale_death_never_overrides_a_newer_birth(controller: Controller) -> None:
    old_birth = State(cluster="alps", node="n1", session="old", seq=0, ts=10, online=True, started=10)
    new_birth = State(cluster="alps", node="n1", session="new", seq=0, ts=20, online=True, started=20)
    old_death = State(cluster="alps", node="n1", session="old", seq=0, ts=30, online=False, started=10)
    controller.process([wire(old_birth), wire(new_birth), wire(old_death)])
    node = controller.store.nodes[("alps", "n1")]
    assert (node.online, node.session) == (True, "new")
    assert controller.counters["stale_state"] == 1
    new_death = State(cluster="alps", node="n1", session="new", seq=0, ts=40, online=False, started=20)
    controller.process([wire(new_death)])
    assert controller.store.nodes[("alps", "n1")].online is False


def test_a_birth_records_what_the_agent_dropped_and_its_labels(controller: Controller) -> None:
    birth = State(cluster="alps", node="n1", session="s", seq=0, ts=10, online=True, started=10,
                  labels={"gpu_driver": "550.54.15"}, dropped={"periodic_result": 7})
    controller.process([wire(birth)])
    assert controller.store.delivery("alps", "n1")["agent_dropped"] == {"periodic_result": 7}
    assert controller.fleet_of(controller.store.nodes[("alps", "n1")])["labels"]["gpu_driver"] == "550.54.15"


def test_state_survives_a_restart(controller: Controller) -> None:
    controller.process([wire(result(1, "fail"))])
    controller.store.close()
    reopened = Controller(controller.config)
    assert reopened.store.nodes[("alps", "nid001")].state == "excluded"
    assert [(p.node, p.action) for p in reopened.executor.restore()] == [("nid001", "drain")]
    # the rule is still firing: a repeat does not decide a second drain
    assert reopened.process([wire(result(2, "fail"))]).drains == []


def test_the_circuit_breaker_stops_exclusions_until_reset(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    config = ControllerConfig(cluster="alps", rules=[str(rules)], store=StoreSection(path=str(tmp_path / "c.db")),
                              breaker=BreakerSection(max_fraction=0.1, always_allow=1))
    controller = Controller(config)
    births = [State(cluster="alps", node=f"nid{i:03d}", session=f"s{i}", seq=0, ts=1.0, online=True, started=1.0,
                    labels={"partition": "gpu"}) for i in range(10)]
    controller.process([wire(b) for b in births])

    def fail(node: int, seq: int) -> tuple[str, bytes]:
        return wire(result(seq, "fail", node=f"nid{node:03d}", session=f"s{node}"))

    assert [d.node for d in controller.process([fail(0, 1)]).drains] == ["nid000"]
    assert controller.process([fail(1, 1), fail(2, 1)]).drains == []  # 2 of 10 > 10 %
    nodes = controller.store.nodes
    assert [nodes[("alps", f"nid{i:03d}")].state for i in range(3)] == ["excluded", "suspect", "suspect"]
    breaker = controller.store.breaker_open("gpu")
    assert breaker is not None and "would have 2 of 10 nodes excluded (allowed 1)" in breaker["reason"]
    would = [a for a in controller.store.audit_log("alps") if a["outcome"] == "would_have"]
    assert sorted(a["node"] for a in would) == ["nid001", "nid002"]

    controller.store.submit("ops", "breaker_reset", ["gpu"])
    controller.handle_requests()
    assert controller.store.breaker_open("gpu") is None
    assert nodes[("alps", "nid001")].state == "healthy"
    # nid001 still fails: the rule fires again, and the breaker, with one node out, holds again
    assert controller.process([fail(1, 2)]).drains == []
    assert controller.store.breaker_open("gpu") is not None


def test_operator_requests_expire_when_the_controller_is_not_there(controller: Controller) -> None:
    request = controller.store.submit("ops", "drain", [("alps", "nid001")], "fan")
    controller.handle_requests(now=time.time() + 120)
    assert controller.store.request(request)["status"] == "expired"  # type: ignore[index]
    assert controller.store.nodes.get(("alps", "nid001")) is None


def test_a_repeat_offender_ends_failed(controller: Controller) -> None:
    states = []
    for round_ in range(3):
        controller.process([wire(result(10 * round_ + 1, "fail"))])
        node = controller.store.nodes[("alps", "nid001")]
        states.append(node.state)
        if node.state == "excluded":
            controller.store.submit("ops", "resume", [("alps", "nid001")])
            controller.handle_requests()
            controller.process([wire(result(10 * round_ + 2, "pass"))])
    assert states == ["excluded", "excluded", "failed"]
    node = controller.store.nodes[("alps", "nid001")]
    assert node.reason.startswith("vetd: repeat offender (3 exclusions in 7d): host-failed")
    assert [a["action"] for a in controller.store.audit_log("alps", "nid001")].count("mark_failed") == 1


def test_failed_nodes_are_in_the_exclusion_hostlist(controller: Controller) -> None:
    import io

    from vetd.controller.cli import show_excluded

    controller.process([wire(result(1, "fail")), wire(result(1, "fail", node="nid002", session="b"))])
    controller.store.nodes[("alps", "nid002")].state = "failed"
    controller.store.save_node(controller.store.nodes[("alps", "nid002")])
    out = io.StringIO()
    show_excluded(controller.store, "hostlist", out)
    assert out.getvalue() == "nid[001-002]\n"


def test_a_full_database_keeps_nothing_of_a_batch_and_takes_it_whole_once_it_has_room(
        controller: Controller) -> None:
    """Before: SQLITE_FULL inside a message's savepoint made SQLite roll the whole transaction back,
    the batch fell back to one message at a time, each committed on its own outside it or counted
    malformed, and the controller died on COMMIT. Now: nothing kept, nothing acknowledged, nothing
    counted, the model as before; the same batch taken whole once the database has room."""
    from vetd.controller.store import StoreUnavailable

    controller.process([wire(result(1))])
    controller.acks.take()
    db = controller.store.db
    db.execute(f"PRAGMA max_page_count={db.execute('PRAGMA page_count').fetchone()[0]}")  # as a full disk
    batch = [wire(result(seq, "fail" if seq == 300 else "pass", node=f"nid{seq % 20:03d}")) for seq in range(2, 400)]
    counts = dict(controller.counters)
    for _ in range(3):
        with pytest.raises(StoreUnavailable, match="full"):
            controller.process(batch)
    assert controller.acks.take() == [] and dict(controller.counters) == counts
    assert db.execute("SELECT count(*) FROM history").fetchone()[0] == 1
    assert controller.store.nodes.keys() == {("alps", "nid001")} == controller.engine.state.nodes.keys()
    db.execute("PRAGMA max_page_count=1073741823")  # room again
    decisions = controller.process(batch)
    assert [d.node for d in decisions.drains] == ["nid000"]  # decided once, when it was kept
    assert db.execute("SELECT count(*) FROM history").fetchone()[0] == 399
    assert controller.counters["received"] == counts["received"] + 398 and not controller.counters["malformed"]
    assert sum(r.last - r.first + 1 for ack in controller.acks.take() for r in ack.ranges) == 398
