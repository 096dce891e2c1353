"""A node speaks only for itself in its own cluster, and cannot grow the controller's state
without bound (issue 12, findings 2, 3, 5, 7, 9, 11)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

import pytest

from tests.controller.test_isolation import DEAD_RECEIVER, DEFAULT_RULES, result, wire
from tests.support.procs import run_vetd
from vetd.controller.config import (
    AlertsSection,
    ControllerConfig,
    LimitsSection,
    StoreSection,
    load_controller_config,
)
from vetd.controller.counters import Counters
from vetd.controller.ingest import Admission
from vetd.controller.model import Healing
from vetd.controller.replay import replay
from vetd.controller.service import Controller
from vetd.controller.store import SCHEMA_VERSION, SchemaError, Store
from vetd.core.configfile import ConfigError
from vetd.core.protocol import Event, Reply, Result, State

REPO = Path(__file__).resolve().parents[2]


def make(tmp_path: Path, **config: object) -> Controller:
    return Controller(ControllerConfig(cluster="alps", rules=[str(DEFAULT_RULES)],  # type: ignore[arg-type]
                                       store=StoreSection(path=str(tmp_path / "c.db")),
                                       alerts=AlertsSection(urls=[DEAD_RECEIVER]), **config))


def test_messages_of_another_cluster_make_no_state(tmp_path: Path) -> None:
    controller = make(tmp_path)
    foreign = [wire(Result(cluster=f"c{i}", node="nid001", session="s", seq=1, ts=1.0, check="x", status="fail"))
               for i in range(100)]
    controller.process([*foreign, wire(result("nid001", 1))])
    assert controller.counters["foreign_cluster"] == 100
    assert [(n.cluster, n.name) for n in controller.store.node_rows()] == [("alps", "nid001")]
    admission = Admission(LimitsSection(), controller.counters, "alps")
    assert not any(admission.admit(topic, 1.0) for topic, _ in foreign) and len(admission) == 0


def test_rate_limit_buckets_are_forgotten_once_full_again() -> None:
    admission = Admission(LimitsSection(per_node_rate=10, per_node_burst=10), Counters(), "alps")
    for i in range(30_000):
        admission.admit(f"vetd/v1/alps/node/n{i}/result", 0.0)
    assert len(admission) == 30_000
    admission.admit("vetd/v1/alps/node/n0/result", 11.0)  # 10 s on: all of them refilled
    assert len(admission) == 1


def test_the_cluster_is_one_cluster_never_all(tmp_path: Path) -> None:
    assert ControllerConfig().cluster == "default"
    path = tmp_path / "controller.toml"
    path.write_text('cluster = ""\n')
    with pytest.raises(ConfigError, match="cluster"):
        load_controller_config(path, environ={})


def test_a_reply_counts_only_from_the_commanded_node(tmp_path: Path) -> None:
    controller = make(tmp_path)
    controller.process([wire(State(cluster="alps", node=n, session="s", seq=0, ts=1.0, online=True, started=1.0))
                        for n in ("a", "b")])
    state = controller.engine.state
    state.save_healing(Healing("alps", "a", "r", ["gpu_reset"], 0, "step", 1.0, command_id="cmd-a", deadline=1e12))
    state.take_changes()
    forged = Reply(cluster="alps", node="b", session="s", seq=1, ts=2.0, id="cmd-a", ok=True)
    controller.process([wire(forged)])
    assert state.healings[("alps", "a")].phase == "step"  # not moved to probation
    assert controller.counters["replies_wrong_node"] == 1
    own = Reply(cluster="alps", node="a", session="s", seq=1, ts=2.0, id="cmd-a", ok=True)
    controller.process([wire(own)])
    assert state.healings[("alps", "a")].phase == "probation"


def test_node_labels_never_override_alert_identity(tmp_path: Path) -> None:
    controller = make(tmp_path)
    birth = State(cluster="alps", node="evil", session="s", seq=0, ts=1.0, online=True, started=1.0,
                  labels={"node": "victim", "alertname": "x", "cluster": "other", "severity": "info",
                          "rule": "y", "entity": "gpu9", "partition": "gpu"})
    decided = controller.process([wire(birth), wire(result("evil", 1, "warn"))])
    labels = decided.alerts[0].alerts[0]["labels"]
    assert labels == {"alertname": "check-warning", "cluster": "alps", "node": "evil", "severity": "warning",
                      "partition": "gpu"}


def test_distinct_entities_and_checks_beyond_the_bound_grow_nothing(tmp_path: Path) -> None:
    controller = make(tmp_path)
    warns = [wire(result("evil", i, "warn", entity=f"e{i}")) for i in range(1, 20_001)]
    for at in range(0, len(warns), 1000):
        controller.process(warns[at:at + 1000])
    bound = LimitsSection().entities_per_node + 1  # and `overflow`
    assert len(controller.engine.firing_alerts) <= bound
    assert len(controller.engine.state.rule_states) <= bound
    assert len(controller.store.latest("alps", "evil")) <= bound
    assert controller.counters["entity_limit"] == 20_000 - LimitsSection().entities_per_node
    checks = [wire(Result(cluster="alps", node="evil", session="t", seq=i, ts=1.0, check=f"c{i}", status="warn"))
              for i in range(1, 1001)]
    controller.process(checks)
    assert len({r["check_name"] for r in controller.store.latest("alps", "evil")}) <= LimitsSection().checks_per_node
    assert controller.counters["check_limit"] > 0


def test_history_audit_and_requests_are_pruned_beyond_keep(tmp_path: Path) -> None:
    controller = make(tmp_path)
    day = 86400.0
    controller.process([wire(result("n1", 1, "fail"))], now=1000.0)  # a drain: pending stays
    controller.process([wire(result("n1", 2, "warn"))], now=2000.0)
    controller.store.finish_request(controller.store.submit("me", "drain", [["alps", "n1"]]), "done", {})
    controller.process([wire(result("n1", 3))], now=40 * day)
    controller.store.db.execute("UPDATE requests SET ts=1")
    pruned = controller.prune(now=40 * day + 1)
    assert pruned["history"] == 2 and pruned["requests"] == 1 and pruned["audit"] >= 2
    assert [h["seq"] for h in controller.store.history("alps", "n1")] == [3]
    assert [a["outcome"] for a in controller.store.audit_log("alps", "n1") if a["ts"] < day] == ["pending"]


def test_keep_shorter_than_the_repeat_window_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "controller.toml"
    path.write_text('[store]\nkeep = "1d"\n')
    with pytest.raises(ConfigError, match="keep"):
        load_controller_config(path, environ={})


def test_an_agent_offline_too_long_alerts_and_resolves_when_back() -> None:
    def state(ts: float, online: bool, session: str = "s1") -> State:
        return State(cluster="alps", node="nid001", session=session, seq=0, ts=ts, online=online, started=ts)

    other = Result(cluster="alps", node="nid002", session="x", seq=1, ts=800.0, check="x", status="pass")
    events = [state(0, True), state(100, False), other, state(2000, True, "s2")]
    decisions = [(d.action, d.rule, d.outcome) for d in replay([str(DEFAULT_RULES)], events)
                 if d.rule == "agent-offline"]
    assert decisions == [("rule_fired", "agent-offline", ""), ("alert", "agent-offline", "firing"),
                         ("rule_resolved", "agent-offline", ""), ("alert", "agent-offline", "resolved")]


def test_vetd_rules_test_replays_state_lines_into_agent_offline(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join(json.dumps(e) for e in [
        {"kind": "state", "ts": 0, "node": "nid001", "online": True},
        {"kind": "state", "ts": 60, "node": "nid001", "online": False},
        {"kind": "state", "ts": 900, "node": "nid002", "online": True},
    ]) + "\n")
    shown = run_vetd("rules", "test", "--events", str(events))
    assert shown.returncode == 0, shown.stderr
    assert "agent-offline" in shown.stdout and "nid001" in shown.stdout


def test_the_agents_spool_warning_is_alerted_by_the_shipped_rules() -> None:
    unwritable = Event(cluster="alps", node="nid001", session="s", seq=1, ts=1.0, name="spool_unwritable",
                       severity="warning", entity="spool", codes=["spool_write_failed"])
    assert [d.rule for d in replay([str(DEFAULT_RULES)], [unwritable]) if d.action == "alert"] == ["warning-event"]


OLD_STORE = "d7e66f1"


def old_database(tmp_path: Path) -> Path:
    """A database made by the store before schema versions (its SCHEMA, one node, one result)."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{OLD_STORE}:controller/store.py"],
                            capture_output=True, text=True, check=True).stdout
    schema = source.split('SCHEMA = """', 1)[1].split('"""', 1)[0]
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(schema)
    db.execute("INSERT INTO nodes (cluster, name, state_since, first_seen, last_seen) VALUES ('alps','n1',1,1,1)")
    db.execute("INSERT INTO history (cluster, node, session, seq, ts, received_at, kind, name, entity, status, "
               "codes, metrics, message) VALUES ('alps','n1','s',1,1,1,'result','x','node','pass','[]','{}','')")
    db.commit()
    db.close()
    return path


def test_an_old_database_is_migrated_and_keeps_its_rows(tmp_path: Path) -> None:
    path = old_database(tmp_path)
    store = Store(path)
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert [n.name for n in store.node_rows()] == ["n1"] and len(store.history("alps", "n1")) == 1
    indexes = {r[0] for r in store.db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert "history_received" in indexes
    store.close()


def test_a_newer_database_is_refused_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(SchemaError, match="newer than this vetd knows"):
        Store(path)
    with pytest.raises(SchemaError):
        Store(path, readonly=True)
    config = tmp_path / "controller.toml"
    config.write_text(f'cluster = "alps"\n[store]\npath = "{path}"\n')
    shown = run_vetd("nodes", "--config", str(config))
    assert shown.returncode == 2 and len(shown.stderr.strip().splitlines()) == 1, shown.stderr
