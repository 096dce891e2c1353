"""``history`` in rules: what the engine records of each node, how conditions count it, and how
the store keeps it (bounded, across restarts, undone with a message that failed)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from vetd.controller import history
from vetd.controller.config import ControllerConfig, HistorySection, StoreSection
from vetd.controller.counters import Counters
from vetd.controller.decisions import Send
from vetd.controller.engine import Engine
from vetd.controller.model import FleetState, HistoryRecord, NodeHistory
from vetd.controller.rules import RuleError, RuleSet, parse_rules
from vetd.controller.service import Controller
from vetd.controller.store import MIGRATIONS, Store
from vetd.core import protocol
from vetd.core.configfile import Duration
from vetd.core.protocol import Event, Reply, Result, State, node_key, verify_command

DAY = 86400.0
NODE = ("alps", "nid001")


def engine(rules: str, state: FleetState | None = None, **config: object) -> Engine:
    ruleset = RuleSet(tuple(parse_rules(rules, "rules.yaml")), ("rules.yaml",))
    return Engine(ControllerConfig(cluster="alps", **config), state or FleetState(), Counters(),  # type: ignore[arg-type]
                  rules=lambda: ruleset, steps={}, alerting=True, session="ctl", command_key=b"k" * 32)


def birth(ts: float, session: str, boot: str = "", node: str = "nid001") -> State:
    return State(cluster="alps", node=node, session=session, seq=0, ts=ts, online=True, started=ts, boot_id=boot)


def xid(ts: float, seq: int, code: int, gpu: str = "gpu1", severity: str = "warning") -> Event:
    return Event(cluster="alps", node="nid001", session="s1", seq=seq, ts=ts, name="xid", entity=gpu,
                 severity=severity, codes=[f"xid_{code}"], message=f"Xid {code} on {gpu}")  # type: ignore[arg-type]


def counted(state: FleetState, function: str, scope: str, window: str, tag: str | None = None, *,
            entity: str = "gpu1", at: float) -> int:
    with history.viewing(state.history, NODE, entity, at):
        return history.count(function, scope, window, tag)


XID31 = """\
rules:
  - name: warn
    when: event.severity == "warning"
    actions: [alert]
  - name: xid31
    when: event.name == "xid" && "xid_31" in event.codes
    actions: [alert]
  - name: again
    when: event.name == "xid" && "xid_31" in event.codes && history.gpu.incidents("24h", "xid_31") >= 1
    actions: [diagnose]
"""


def test_a_rule_counts_the_incidents_of_its_gpu_before_the_message_within_its_window() -> None:
    state = FleetState()
    eng = engine(XID31, state)
    eng.process([(birth(0, "s1"), None)], now=0)

    def sent(message: Event, history_id: int) -> list[str]:
        decided = eng.process([(message, history_id)], now=message.ts)
        return [a.command.action for a in decided.other if isinstance(a, Send)]

    assert sent(xid(100, 1, 31), 1) == []  # the first: nothing before it
    assert sent(xid(200, 2, 31, gpu="gpu0"), 2) == []  # another GPU's first
    assert sent(xid(100 + DAY + 1, 3, 31), 3) == []  # gpu1's first was more than 24 h before
    assert sent(xid(100 + DAY + 60, 4, 31), 4) == ["diagnose"]
    # Two rules fired on each message, and each message is one incident, tagged with both.
    [record] = [r for r in state.history.of(NODE) if r.ts == 100]
    assert (record.kind, record.entity) == ("incident", "gpu1") and record.tags == ("warn", "xid", "xid_31", "xid31")
    at = 100 + DAY + 61
    assert counted(state, "incidents", "node", "2d", at=at) == 4
    assert counted(state, "incidents", "gpu", "2d", at=at) == 3
    assert counted(state, "incidents", "gpu", "2d", "xid31", at=at) == 3  # by rule, too
    assert counted(state, "incidents", "gpu", "2d", "xid_79", at=at) == 0
    assert counted(state, "incidents", "gpu", "2d", entity="node", at=at) == 0  # a message about the node
    assert counted(state, "diagnoses", "gpu", "1h", at=at) == 1


def test_births_are_sessions_and_a_new_boot_id_is_a_reboot() -> None:
    state = FleetState()
    eng = engine(XID31, state)
    for message in (birth(10, "s1", "b1"),   # first sight: a session, no reboot to tell
                    birth(20, "s2", "b1"),   # the agent restarted
                    birth(30, "s3", "b2"),   # the node rebooted
                    birth(30, "s3", "b2"),   # the retained birth again: nothing
                    State(cluster="alps", node="nid001", session="s3", seq=0, ts=40, online=False, started=30),
                    birth(25, "s0", "b9"),   # an older session's birth, stale: nothing
                    birth(50, "s4")):        # an older agent: no boot id, no reboot
        eng.process([(message, None)], now=message.ts)
    assert [(r.kind, r.ts) for r in state.history.of(NODE)] == [
        ("session", 10), ("session", 20), ("session", 30), ("reboot", 30), ("session", 50)]
    assert state.nodes[NODE].boot_id == "b2"
    assert counted(state, "sessions", "node", "1h", at=60) == 4
    assert counted(state, "reboots", "node", "1h", at=60) == 1
    assert counted(state, "reboots", "gpu", "1h", at=60) == 1  # a reboot resets every GPU
    assert counted(state, "sessions", "gpu", "1h", at=60) == 0


def test_remediated_counts_an_incident_followed_by_a_reboot_or_a_step_carried_out() -> None:
    records = NodeHistory()

    def add(ts: float, kind: str, entity: str = "", *tags: str) -> None:
        records.add(HistoryRecord("alps", "nid001", ts, kind, entity, tags))

    def remediated(at: float, entity: str = "gpu2") -> int:
        with history.viewing(records, NODE, entity, at):
            return history.count("remediated", "gpu", "30d", "xid_79")

    add(1, "reboot")  # before any XID: nothing to have remediated
    for ts in (10, 11, 12):  # a burst
        add(ts, "incident", "gpu2", "critical-event", "xid", "xid_79")
    assert remediated(13) == 0
    add(20, "reboot")
    assert remediated(21) == 1
    add(30, "incident", "gpu2", "xid_79")
    add(31, "remediation", "gpu2", "gpu_reset", "failed", "heal")  # not carried out
    assert remediated(32) == 1
    add(33, "remediation", "gpu2", "gpu_reset", "revet_failed", "heal")  # carried out, did not heal
    assert remediated(34) == 2
    add(40, "incident", "gpu2", "xid_79")
    add(41, "remediation", "gpu3", "gpu_reset", "healed", "heal")  # another GPU's reset
    assert remediated(42) == 2
    add(43, "remediation", "", "restart_service", "healed", "heal")  # a node-wide step
    assert remediated(44) == 3
    assert remediated(30 * DAY + 35) == 1  # only what is within 30 days: the last one
    assert remediated(44, entity="gpu5") == 0


LADDER = """\
rules:
  - name: heal
    when: result.check == "gpu_health" && result.status == "fail"
    actions: [drain, heal]
    heal: [gpu_reset, reboot]
"""


def test_ladder_steps_drains_and_resumes_are_remembered_with_their_outcomes() -> None:
    from vetd.controller.rules import healing_steps

    state = FleetState()
    ruleset = RuleSet(tuple(parse_rules(LADDER, "rules.yaml")), ("rules.yaml",))
    eng = Engine(ControllerConfig(cluster="alps"), state, Counters(), rules=lambda: ruleset, steps=healing_steps(),
                 alerting=False, session="ctl")
    fail = Result(cluster="alps", node="nid001", session="s1", seq=1, ts=100, check="gpu_health", entity="gpu3",
                  status="fail", codes=["reset_required"])

    def reply(ts: float, ok: bool) -> None:
        healing = state.healings[NODE]
        eng.process([(Reply(cluster="alps", node="nid001", session="s1", seq=0, ts=ts, id=healing.command_id,
                            ok=ok), None)], now=ts)
        eng.heal_tick(ts)

    eng.process([(birth(0, "s1", "b1"), None), (fail, 1)], now=100)
    eng.heal_tick(100)
    reply(110, True)   # the reset is done
    reply(120, False)  # re-vetting fails: on to the reboot
    eng.heal_tick(121)
    eng.process([(birth(200, "s2", "b2"), None)], now=200)
    eng.heal_tick(200)  # back with a new session: re-vetting
    reply(210, True)   # healed
    eng.operator_drain("alps", "nid001", "vetd: operator ops: fan", "operator:ops", now=300)
    eng.operator_resume("alps", "nid001", "operator:ops", now=310)
    assert [(r.kind, r.entity, r.tags) for r in state.history.of(NODE) if r.kind != "session"] == [
        ("incident", "gpu3", ("heal", "gpu_health", "reset_required")),
        ("drain", "gpu3", ("heal",)),
        ("remediation", "gpu3", ("gpu_reset", "revet_failed", "heal")),
        ("reboot", "", ()),
        ("remediation", "", ("reboot", "healed", "heal")),
        ("resume", "", ("vetd",)),
        ("drain", "", ("operator",)),
        ("resume", "", ("operator",)),
    ]
    at, gpu3 = 320, {"entity": "gpu3"}
    assert counted(state, "remediations", "node", "1h", at=at) == 2
    assert counted(state, "remediations", "node", "1h", "healed", at=at) == 1
    assert counted(state, "resets", "gpu", "1h", at=at, **gpu3) == 1  # carried out, if it did not heal
    assert counted(state, "remediations", "gpu", "1h", at=at) == 1  # gpu1: the reboot only
    assert counted(state, "drains", "node", "1h", at=at) == 2 and counted(state, "drains", "gpu", "1h", at=at, **gpu3) == 1
    assert counted(state, "resumes", "node", "1h", "operator", at=at) == 1


def test_a_window_over_keep_is_a_rule_error_and_a_bad_one_is_refused_when_rules_load() -> None:
    bad = {
        'history.gpu.incidents("1x") >= 1': "rules.yaml:3: rule 'a': when: history window '1x': expected a duration",
        'history.gpu.incidents("0s") >= 1': "history window '0s' must be longer than 0",
        'history.gpu.incidentz("1d") >= 1': "unknown history function `incidentz` (history.node and history.gpu "
                                           "have: incidents, remediations, resets",
        'history.gpus.incidents("1d") >= 1': "unknown field `history.gpus` at column 8 (history has: gpu, node)",
        'history.node.remediated("1d") >= 1': 'remediated needs a tag besides the window, e.g. '
                                              'history.gpu.remediated("30d", "xid_79")',
        'history.node.incidents(1) >= 1': "found no matching overload for 'incidents'",
        'history.node.drains("1d") >= "x"': "found no matching overload for '_>=_' applied to '(int, string)'",
    }
    for when, message in bad.items():
        with pytest.raises(RuleError) as raised:
            parse_rules(f"rules:\n  - name: a\n    when: '{when}'\n", "rules.yaml")
        assert message in str(raised.value), str(raised.value)
    eng = engine("rules:\n  - name: long\n    when: event.name == 'xid' && history.node.incidents('7d') >= 1\n",
                 history=HistorySection(keep=Duration(DAY)))
    decided = eng.process([(birth(0, "s1"), None), (xid(10, 1, 31), 1)], now=10)
    assert eng.counters["rule_errors"] == 1
    [audit] = [a for a in decided.changes.audit if a.action == "rule_error"]
    assert "history window '7d' is longer than [history] keep (1d)" in audit.detail


def test_history_outlives_a_restart_within_its_bounds_and_is_pruned(tmp_path: Path) -> None:
    def controller() -> Controller:
        return Controller(ControllerConfig(cluster="alps", rules=[], store=StoreSection(path=str(tmp_path / "c.db")),
                                           history=HistorySection(keep=Duration(30 * DAY), per_kind=2)))

    first = controller()
    messages: list[protocol.Message] = [birth(float(n * 100), f"s{n}", f"b{n}") for n in range(1, 6)]
    for message in messages:
        first.process([(protocol.topic_for(message), protocol.encode(message))], now=message.ts)
    kept = [(r.kind, r.ts) for r in first.engine.state.history.of(NODE)]
    assert kept == [("session", 400.0), ("reboot", 400.0), ("session", 500.0), ("reboot", 500.0)]  # 2 of each kind
    assert len(first.store.node_history(*NODE)) == 9  # 5 sessions, 4 reboots: the table is pruned by age
    first.store.close()
    second = controller()
    assert [(r.kind, r.ts) for r in second.engine.state.history.of(NODE)] == kept
    assert second.engine.state.nodes[NODE].boot_id == "b5"
    assert second.prune(now=30 * DAY + 450)["node_history"] == 7  # older than 30 days
    assert [r["ts"] for r in second.store.node_history(*NODE)] == [500.0, 500.0]
    second.store.close()


def test_a_message_that_fails_in_processing_leaves_no_history(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vetd.controller.diagnose import Diagnoses

    rules = tmp_path / "rules.yaml"
    rules.write_text(XID31)
    controller = Controller(ControllerConfig(cluster="alps", rules=[str(rules)], allow_unsigned_commands=True,
                                             store=StoreSection(path=str(tmp_path / "c.db"))))
    original = Diagnoses.request

    def fail_after_asking(self: Diagnoses, rule: str, node: object, message: Event, now: float,
                          decisions: object) -> None:
        original(self, rule, node, message, now, decisions)  # type: ignore[arg-type]
        if message.seq == 2:
            raise RuntimeError("disk on fire")

    monkeypatch.setattr(Diagnoses, "request", fail_after_asking)

    def process(message: protocol.Message, now: float) -> list[str]:
        decided = controller.process([(protocol.topic_for(message), protocol.encode(message))], now=now)
        return [a.command.action for a in decided.other if isinstance(a, Send)]

    process(birth(0, "s1"), 0)
    assert process(xid(100, 1, 31), 100) == []
    assert process(xid(200, 2, 31), 200) == []  # the diagnose was decided, then the message failed
    assert controller.counters["failed_in_processing"] == 1
    assert [(r.kind, r.ts) for r in controller.engine.state.history.of(NODE) if r.kind != "session"] == [
        ("incident", 100.0)]
    assert [(r["kind"], r["ts"]) for r in controller.store.node_history(*NODE) if r["kind"] != "session"] == [
        ("incident", 100.0)]
    assert process(xid(300, 3, 31), 300) == ["diagnose"]  # the failed one is not "already running"
    controller.store.close()


def test_a_database_of_the_version_before_gains_history_and_boot_ids(tmp_path: Path) -> None:
    path = tmp_path / "v3.db"
    db = sqlite3.connect(path)
    for step in MIGRATIONS[:3]:
        db.executescript(step)
    db.execute("PRAGMA user_version = 3")
    db.execute("INSERT INTO nodes (cluster, name, state_since, first_seen, last_seen) VALUES ('alps','nid001',1,1,1)")
    db.commit()
    db.close()
    early = Store(path, readonly=True)  # `vetd node` before the controller migrated it
    assert early.node_rows()[0].boot_id == "" and early.node_history("alps", "nid001") == []
    early.close()
    store = Store(path)
    assert store.node_rows()[0].boot_id == "" and store.node_history("alps", "nid001") == []
    store.close()


DIAGNOSE = """\
rules:
  - name: look
    when: event.name == "xid"
    actions: [diagnose]
"""


def test_diagnose_sends_a_signed_command_once_at_a_time_to_a_node_in_service() -> None:
    state = FleetState()
    eng = engine(DIAGNOSE, state)
    eng.process([(birth(0, "s1"), None)], now=0)
    audited: list[tuple[str, str]] = []

    def decide(message: protocol.Message, history_id: int | None, ts: float) -> list[protocol.Command]:
        decided = eng.process([(message, history_id)], now=ts)
        audited.extend((a.outcome, a.detail) for a in decided.changes.audit if a.action == "diagnose")
        return [a.command for a in decided.other if isinstance(a, Send)]

    def fire(seq: int, ts: float) -> list[protocol.Command]:
        return decide(xid(ts, seq, 31), seq, ts)

    [command] = fire(1, 10)
    assert (command.action, command.args, command.node) == ("diagnose", {"profile": "full"}, "nid001")
    assert verify_command(command, node_key(b"k" * 32, "alps", "nid001"), now=11) is None  # the agent runs it
    assert fire(2, 20) == []  # one is running
    assert audited[-1] == ("skipped", "a diagnosis is already running (asked by look at 1970-01-01T00:00:10Z)")
    decide(Reply(cluster="alps", node="nid002", session="x", seq=0, ts=30, id=command.id, ok=True), None, 30)
    assert eng.counters["replies_unmatched"] == 1  # another node cannot answer it
    decide(Reply(cluster="alps", node="nid001", session="s1", seq=0, ts=40, id=command.id, ok=False,
                 message="1 failed: gpu_memtest[gpu1]"), None, 40)
    assert audited[-1] == ("failed", "1 failed: gpu_memtest[gpu1]")
    assert len(fire(3, 50)) == 1  # answered: the next may go
    assert len(fire(4, 50 + 601)) == 1  # the last one unanswered beyond reply_timeout (10 min): another
    assert [outcome for outcome, _ in audited[-3:]] == ["sent", "failed", "sent"]
    eng.operator_drain("alps", "nid001", "vetd: operator ops: swap", "operator:ops", now=700)
    assert fire(5, 1300) == []
    assert audited[-1] == ("skipped", "node excluded: its re-vetting is the ladder's or a person's")
    decide(birth(0, "t", node="nid002"), None, 0)
    decide(State(cluster="alps", node="nid002", session="t", seq=0, ts=5, online=False, started=0), None, 5)
    gone = Event(cluster="alps", node="nid002", session="old", seq=1, ts=1400, name="xid", entity="gpu0")
    assert decide(gone, 6, 1400) == [] and audited[-1] == ("skipped", "node offline")


def test_a_flood_of_incidents_keeps_the_nodes_reboots() -> None:
    records = NodeHistory(keep=30 * DAY, per_kind=100)
    records.add(HistoryRecord("alps", "nid001", 1.0, "reboot"))
    for n in range(1000):
        records.add(HistoryRecord("alps", "nid001", 10.0 + n, "incident", "gpu0", ("warning-event", "xid", "xid_13")))
    kinds = [r.kind for r in records.of(NODE)]
    assert kinds.count("incident") == 100 and kinds.count("reboot") == 1
    assert records.of(NODE)[1].ts == 910.0  # the newest 100 incidents
    shared = {id(r.tags) for r in records.of(NODE) if r.kind == "incident"}
    assert len(shared) == 1  # one tag tuple for all of them
    records.add(HistoryRecord("alps", "nid001", 40 * DAY, "session"))
    assert [r.kind for r in records.of(NODE)] == ["session"]  # everything else older than keep
