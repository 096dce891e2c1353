"""Jobs tied to their nodes: what the agents announce, what the controller keeps, what rules and
operators see (`vetd job`, `vetd jobs`, the HTTP API, `vetd rules test` with `job` lines)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.controller.test_end_to_end import start_controller
from tests.controller.test_http import call
from tests.support.procs import VetdProcess, run_vetd, vetd_env
from tests.support.services import Mosquitto, free_port
from tests.support.wait import wait_for
from vetd.agent.controlclient import ask
from vetd.controller.config import ControllerConfig, JobsSection, StoreSection
from vetd.controller.counters import Counters
from vetd.controller.decisions import Decisions
from vetd.controller.engine import Engine
from vetd.controller.model import FleetState
from vetd.controller.replay import read_events, replay
from vetd.controller.rules import RuleSet, parse_rules
from vetd.controller.service import Controller
from vetd.controller.store import Store
from vetd.core import protocol
from vetd.core.configfile import Duration
from vetd.core.jobs import end_fields, start_fields
from vetd.core.protocol import Event, Message, Result

DATA = Path(__file__).resolve().parents[1] / "data" / "jobs"
RULES = Path(__file__).resolve().parents[2] / "packaging" / "rules" / "default.yaml"

#: A rule that shows, in its alert's summary, the job as rules see it from the node.
SHOW = """\
rules:
  - name: job-seen
    when: job.failed
    actions: [alert]
    annotations:
      summary: "{{ node.name }}|{{ job.id }}|{{ job.user }}|{{ job.gpus }}|{{ job.state }}|{{ job.exit_code }}|{{ job.nodes }}|{{ job.unreported }}|{{ job.findings }}|{{ job.codes }}|{{ job.other_findings }}|{{ job.nodes_with_findings }}|{{ event.name }}"
"""


class Wire:
    """Messages as agents send them: per node one session, sequence numbers in order."""

    def __init__(self, cluster: str = "alps") -> None:
        self.cluster, self.seq = cluster, 0

    def envelope(self, node: str, ts: float) -> dict[str, Any]:
        self.seq += 1
        return {"cluster": self.cluster, "node": node, "session": "s1", "seq": self.seq, "ts": ts}

    def start(self, node: str, job: str, ts: float, user: str = "alice", gpus: str = "0-3") -> Event:
        return Event(**self.envelope(node, ts), job_id=job, **start_fields(job, user, gpus))

    def end(self, node: str, job: str, ts: float, state: str = "FAILED", code: int | None = 1) -> Event:
        return Event(**self.envelope(node, ts), job_id=job, **end_fields(job, state, code, 100.0))

    def xid(self, node: str, ts: float, xid: int = 79, severity: str = "critical") -> Event:
        return Event(**self.envelope(node, ts), name="xid", entity="gpu2", severity=severity,  # type: ignore[arg-type]
                     codes=[f"xid_{xid}"], message=f"XID {xid}")

    def result(self, node: str, ts: float, status: str = "fail") -> Result:
        return Result(**self.envelope(node, ts), check="gpu_health", entity="gpu2", status=status,  # type: ignore[arg-type]
                      message="ECC DBE")


def engine(state: FleetState, rules: str = SHOW, **jobs: Any) -> Engine:
    ruleset = RuleSet(tuple(parse_rules(rules, "rules.yaml")), ("rules.yaml",))
    return Engine(ControllerConfig(jobs=JobsSection(**jobs)), state, Counters(), rules=lambda: ruleset, steps={},
                  alerting=True, session="test")


def fields(decisions: Decisions) -> list[list[str]]:
    return [a.alerts[0]["annotations"]["summary"].split("|") for a in decisions.alerts if a.rule == "job-seen"]


def test_a_job_is_decided_once_every_node_ended_and_each_node_sees_it_all() -> None:
    state, wire = FleetState(), Wire()
    eng = engine(state)
    ids = iter(range(1, 100))
    decided = eng.process([(wire.start("nid001", "77", 10.0, gpus="0,1"), next(ids)),
                           (wire.start("nid002", "77", 11.0, gpus="2,3"), next(ids)),
                           (wire.xid("nid002", 20.0), next(ids)),
                           (wire.result("nid002", 21.0), next(ids)),
                           (wire.result("nid002", 22.0, status="pass"), next(ids)),  # not a finding
                           (wire.xid("nid003", 23.0), next(ids))], now=30.0)  # not the job's node
    job = state.jobs[("alps", "77")]
    assert (job.phase, job.user, sorted(job.nodes)) == ("running", "alice", ["nid001", "nid002"])
    assert (job.nodes["nid002"].findings, job.nodes["nid002"].codes) == (2, ["xid_79", "gpu_health"])
    assert [(f.node, f.name, f.history_id) for f in decided.changes.job_findings] == [
        ("nid002", "xid", 3), ("nid002", "gpu_health", 4)]
    assert set(decided.changes.job_nodes) == {("alps", "77", "nid001"), ("alps", "77", "nid002")}

    first = eng.process([(wire.end("nid002", "77", 40.0), next(ids))], now=41.0)
    assert fields(first) == [] and job.phase == "ending"  # nid001 has not reported yet
    assert eng.process([(wire.xid("nid002", 42.0), next(ids))], now=42.0).changes.job_findings == []  # ended there

    last = eng.process([(wire.end("nid001", "77", 43.0, state="FAILED"), next(ids))], now=44.0)
    assert ("alps", "77") not in state.jobs and last.changes.jobs[("alps", "77")].phase == "done"
    assert fields(last) == [
        ["nid001", "77", "alice", "0,1", "FAILED", "1", "nid001, nid002", "", "0", "", "2", "nid002", "job_end"],
        ["nid002", "77", "alice", "2,3", "FAILED", "1", "nid001, nid002", "", "2", "xid_79, gpu_health", "0", "nid002",
         "job_end"],
    ]
    fired = [a for a in last.changes.audit if a.action == "rule_fired"]
    assert [(a.node, a.detail, a.evidence) for a in fired] == [("nid001", "job:77", [9]), ("nid002", "job:77", [7])]


def test_a_node_that_never_reports_the_end_is_decided_after_settle() -> None:
    state, wire = FleetState(), Wire()
    eng = engine(state, settle=Duration(300.0))
    eng.process([(wire.start("nid001", "8", 0.0), 1), (wire.start("nid002", "8", 0.0), 2),
                 (wire.end("nid001", "8", 100.0, state="NODE_FAIL", code=None), 3)], now=100.0)
    assert fields(eng.job_tick(now=399.0)) == [] and state.jobs[("alps", "8")].phase == "ending"
    settled = eng.job_tick(now=400.0)
    rows = fields(settled)
    assert [row[0] for row in rows] == ["nid001", "nid002"] and rows[1][4:8] == ["NODE_FAIL", "-1", "nid001, nid002",
                                                                                 "nid002"]
    assert settled.changes.jobs[("alps", "8")].phase == "done" and not state.jobs


def test_job_states_and_exit_codes_say_what_failed() -> None:
    cases = [("COMPLETED", 0, False), ("failed", 1, True), ("CANCELLED", 15, False), ("", 3, True), ("", 0, False),
             ("TIMEOUT", None, False), ("NODE_FAIL", None, True), ("", None, False)]
    for state_name, code, failed in cases:
        state, wire = FleetState(), Wire()
        eng = engine(state)
        done = eng.process([(wire.start("nid001", "1", 0.0), 1), (wire.end("nid001", "1", 5.0, state_name, code), 2)],
                           now=6.0)
        assert done.changes.jobs[("alps", "1")].failed is failed, (state_name, code)


def test_open_jobs_are_bounded_and_lost_ones_closed() -> None:
    state, wire = FleetState(), Wire()
    eng = engine(state, max_open=3, lost_after=Duration(3600.0))
    eng.process([(wire.start("nid001", str(i), float(i)), i) for i in range(1, 6)], now=10.0)
    assert sorted(state.jobs) == [("alps", "3"), ("alps", "4"), ("alps", "5")]  # the oldest news closed as lost
    assert eng.counters["jobs_lost"] == 2
    eng.process([(wire.xid("nid001", 20.0, severity="warning"), 6)], now=3000.0)  # news of every open job
    assert eng.job_tick(now=3599.0 + 3000.0).changes.jobs == {}
    closed = eng.job_tick(now=3600.0 + 3000.0 + 60.0).changes.jobs
    assert {key: job.phase for key, job in closed.items()} == {("alps", "3"): "lost", ("alps", "4"): "lost",
                                                               ("alps", "5"): "lost"}


def controller(db: Path, rules: Path = RULES) -> Controller:
    return Controller(ControllerConfig(cluster="alps", rules=[str(rules)], store=StoreSection(path=str(db))))


def wire(message: Message) -> tuple[str, bytes]:
    return protocol.topic_for(message), protocol.encode(message)


def test_jobs_outlive_a_restart_and_vetd_job_shows_where_the_failure_points(tmp_path: Path) -> None:
    db, w = tmp_path / "state" / "c.db", Wire()
    first = controller(db)
    first.process([wire(w.start("nid001", "900", 100.0, user="bob", gpus="0-3")),
                   wire(w.start("nid002", "900", 100.0, user="bob", gpus="4-7"))], now=100.0)
    first.process([wire(w.xid("nid001", 150.0, xid=31, severity="warning"))], now=150.0)
    first.store.close()

    again = controller(db)  # the open job comes back from the store
    assert sorted(again.engine.state.jobs[("alps", "900")].nodes) == ["nid001", "nid002"]
    again.process([wire(w.xid("nid001", 160.0, xid=31, severity="warning")),
                   wire(w.end("nid001", "900", 200.0)), wire(w.end("nid002", "900", 201.0))], now=201.0)
    again.store.close()

    config = tmp_path / "controller.toml"
    config.write_text('cluster = "alps"\n[store]\npath = "state/c.db"\n')
    shown = run_vetd("job", "900", "--config", str(config), "--json")
    assert shown.returncode == 0, shown.stderr
    detail = json.loads(shown.stdout)
    assert (detail["user"], detail["state"], detail["exit_code"], detail["failed"], detail["phase"]) == (
        "bob", "FAILED", 1, True, "done")
    assert [(p["node"], p["gpus"], p["findings"], p["codes"]) for p in detail["parts"]] == [
        ("nid001", "0-3", 2, ["xid_31"]), ("nid002", "4-7", 0, [])]
    assert detail["attribution"]["kind"] == "nodes" and detail["attribution"]["nodes"] == ["nid001"]
    assert [(f["node"], f["name"], f["codes"]) for f in detail["found"]] == [("nid001", "xid", ["xid_31"])] * 2
    text = run_vetd("job", "900", "--config", str(config)).stdout
    assert "points at: failed; only nid001 showed something while it ran: nid001 xid_31" in text
    assert "never reported" not in text and "nid002  healthy  4-7" in text

    listed = json.loads(run_vetd("jobs", "--config", str(config), "--json", "--node", "nid002", "--failed").stdout)
    assert [(j["job"], j["nodes"], j["findings"]) for j in listed] == [("900", ["nid001", "nid002"], 2)]
    assert json.loads(run_vetd("jobs", "--config", str(config), "--json", "--node", "nid003").stdout) == []
    assert json.loads(run_vetd("jobs", "--config", str(config), "--json", "--since", "1h").stdout) == []  # 1970
    assert run_vetd("jobs", "--config", str(config)).stdout.splitlines()[1].split()[:2] == ["900", "bob"]
    missing = run_vetd("job", "901", "--config", str(config))
    assert missing.returncode == 1 and missing.stderr.strip().splitlines() == [
        f"vetd: no job '901' in {db} (cluster alps)"]


def test_a_job_requeued_under_its_id_keeps_each_run_apart(tmp_path: Path) -> None:
    db, w = tmp_path / "c.db", Wire()
    first = controller(db)
    first.process([wire(w.start("nid003", "42", 10.0)), wire(w.xid("nid003", 15.0)),
                   wire(w.end("nid003", "42", 20.0, state="NODE_FAIL", code=None))], now=20.0)
    first.store.close()
    again = controller(db)  # Slurm requeues the job under its id; it runs on nid004
    again.process([wire(w.start("nid004", "42", 30.0)), wire(w.end("nid004", "42", 40.0, "COMPLETED", 0))],
                  now=40.0)
    latest, earlier = again.store.job("alps", "42"), again.store.job("alps", "42", 1)
    assert latest is not None and earlier is not None and again.store.job("alps", "42", 2) is None
    assert (latest["runs"], latest["state"], latest["failed"], [p["node"] for p in latest["nodes"]]) == (
        2, "COMPLETED", False, ["nid004"])
    assert (earlier["state"], earlier["failed"], [p["node"] for p in earlier["nodes"]], len(earlier["findings"])) == (
        "NODE_FAIL", True, ["nid003"], 1)
    again.store.close()
    config = tmp_path / "controller.toml"
    config.write_text('cluster = "alps"\n[store]\npath = "c.db"\n')
    failed = run_vetd("jobs", "--config", str(config), "--failed").stdout.splitlines()
    assert len(failed) == 2 and failed[1].startswith("42 (run -1)")
    shown = run_vetd("job", "42", "--run", "1", "--config", str(config)).stdout
    assert shown.startswith("job 42 (alps): NODE_FAIL (failed), user alice, run 1 of 2")
    assert "points at: failed; nid003 showed something while it ran: nid003 xid_79" in shown


def test_closed_jobs_are_pruned_beyond_keep_with_their_nodes_and_findings(tmp_path: Path) -> None:
    w, day = Wire(), 86400.0
    ctl = controller(tmp_path / "c.db")
    ctl.process([wire(w.start("nid001", "1", 10.0)), wire(w.xid("nid001", 11.0)), wire(w.end("nid001", "1", 12.0)),
                 wire(w.start("nid001", "2", 13.0))], now=13.0)
    assert ctl.prune(now=40 * day)["jobs"] == 1  # the running one stays: it is the engine's
    assert ctl.store.job("alps", "1") is None and ctl.store.job("alps", "2") is not None
    assert ctl.store.db.execute("SELECT count(*) FROM job_findings").fetchone()[0] == 0
    assert ctl.store.db.execute("SELECT count(*) FROM job_nodes").fetchone()[0] == 1


def decisions_of(events: Path, *files: str) -> list[tuple[str, str, str]]:
    done = run_vetd("rules", "test", *(files or (str(RULES),)), "--events", str(events), "--json")
    assert done.returncode == 0, done.stderr
    return [(d["node"], d["action"], d["rule"]) for d in map(json.loads, done.stdout.splitlines())
            if d["rule"] == "job-failures-on-node"]


def test_the_default_rule_marks_the_node_repeated_failures_share_suspect() -> None:
    assert decisions_of(DATA / "repeat.jsonl") == [("nid003", "rule_fired", "job-failures-on-node"),
                                                   ("nid003", "suspect", "job-failures-on-node"),
                                                   ("nid003", "alert", "job-failures-on-node")]


@pytest.mark.parametrize("case", ["spread", "few"])
def test_the_default_rule_is_quiet_when_failures_are_spread_or_few(case: str) -> None:
    assert decisions_of(DATA / f"{case}.jsonl") == []


def test_a_replayed_incident_points_each_failed_job_at_the_node_at_fault_and_none_at_the_others(
    tmp_path: Path,
) -> None:
    from vetd.controller.views import job_detail

    store = Store(tmp_path / "c.db")
    replay([str(RULES)], read_events(DATA / "incident.jsonl"), keep=store)
    shown = {job: job_detail(store, "replay", job) for job in ("1002", "1004", "1005", "1006", "1007", "1008", "1009")}
    store.close()
    kinds = {job: (d["attribution"]["kind"], d["attribution"]["nodes"], d["attribution"]["rules"])
             for job, d in shown.items() if d is not None}
    assert kinds == {"1002": ("unexplained", [], []), "1004": ("unexplained", [], []),
                     "1005": ("unexplained", [], []), "1006": ("unexplained", [], []),
                     "1007": ("nodes", ["nid003"], []),  # XID 79 on nid003 during the job
                     "1008": ("unexplained", [], ["nid006"]),  # nid006's third failed job: suspect
                     "1009": ("spread", [], [])}  # every node saw the fabric's link flaps
    now = {job: {p["node"]: p["node_state"] for p in d["parts"]} for job, d in shown.items() if d is not None}
    assert now["1002"] == {"nid005": "healthy", "nid006": "suspect"}  # named in hindsight
    assert now["1004"] == {"nid002": "healthy"} and now["1006"] == {"nid001": "healthy"}  # dave's bug


def test_a_suspect_node_stays_in_service_until_an_operator_resumes_it(tmp_path: Path) -> None:
    store = Store(tmp_path / "c.db")
    replay([str(RULES)], read_events(DATA / "repeat.jsonl"), keep=store)
    node = next(n for n in store.node_rows() if n.name == "nid003")
    assert (node.state, node.reason) == ("suspect", "vetd: job-failures-on-node: job_end job 104 ended (FAILED)")
    assert [a["action"] for a in store.audit_log(node="nid003") if a["action"] in ("drain", "suspect")] == ["suspect"]
    store.close()
    ctl = Controller(ControllerConfig(cluster="replay", rules=[str(RULES)], store=StoreSection(path=str(tmp_path / "c.db"))))
    ctl.engine.operator_resume("replay", "nid003", "operator:ops", now=10_000.0)
    assert ctl.engine.node_state("replay", "nid003") == "healthy"


def test_a_job_line_names_its_nodes_and_a_bad_one_names_file_and_line(tmp_path: Path) -> None:
    messages = list(read_events(DATA / "repeat.jsonl"))
    starts = [m for m in messages if isinstance(m, Event) and m.name == "job_start" and m.job_id == "101"]
    assert [(m.node, m.data) for m in starts] == [("nid001", {"user": "alice", "gpus": "0-3"}),
                                                  ("nid003", {"user": "alice", "gpus": "0-3"})]
    end = next(m for m in messages if isinstance(m, Event) and m.name == "job_end" and m.job_id == "102")
    assert (end.codes, end.metrics, end.data) == (["FAILED"], {"exit_code": 134.0, "runtime_s": 1000.0},
                                                  {"state": "FAILED"})
    for bad, named in [('{"kind": "job", "ts": 1, "job_id": "1", "phase": "start"}', "`node` or `nodes`"),
                       ('{"kind": "job", "ts": 1, "job_id": "1", "phase": "begin", "node": "n1"}', "phase"),
                       ('{"kind": "job", "ts": 1, "job_id": "1", "phase": "end", "nodes": "n[1-"}', "hostlist"),
                       ('{"kind": "job", "ts": 1, "job_id": "a b", "phase": "end", "node": "n1"}', "job_id"),
                       ('{"kind": "job", "ts": 1, "job_id": "1", "phase": "end", "node": "-x"}', "$.node")]:
        events = tmp_path / "bad.jsonl"
        events.write_text('{"kind": "state", "ts": 0, "node": "n1", "online": true}\n' + bad + "\n")
        done = run_vetd("rules", "test", "--events", str(events))
        assert done.returncode == 2 and f"{events}:2:" in done.stderr and named in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


def test_export_writes_jobs_as_job_lines_and_replays_to_the_same_decisions(tmp_path: Path) -> None:
    store = Store(tmp_path / "c.db")
    live = replay([str(RULES)], read_events(DATA / "repeat.jsonl"), keep=store)
    store.close()
    config = tmp_path / "controller.toml"
    config.write_text('cluster = "replay"\n[store]\npath = "c.db"\n')
    exported = run_vetd("export", "--config", str(config))
    assert exported.returncode == 0, exported.stderr
    lines = [json.loads(line) for line in exported.stdout.splitlines()]
    jobs = [line for line in lines if line["kind"] == "job"]
    assert len(jobs) == 16 and not [line for line in lines if line.get("name", "").startswith("job_")]
    assert jobs[0] == {"kind": "job", "cluster": "replay", "job_id": "101", "node": "nid001", "ts": 1000.0,
                       "phase": "start", "user": "alice", "gpus": "0-3"}
    (tmp_path / "exported.jsonl").write_text(exported.stdout)
    again = replay([str(RULES)], read_events(tmp_path / "exported.jsonl"))
    assert [(d.ts, d.node, d.action, d.rule) for d in again] == [(d.ts, d.node, d.action, d.rule) for d in live]


def test_jobs_announced_by_real_agents_point_at_the_node_that_showed_something(
    tmp_path: Path, mosquitto: Mosquitto, cluster_name: str
) -> None:
    port = free_port()
    config = tmp_path / "controller.toml"
    config.write_text(f'cluster = "{cluster_name}"\nclient_id = "c-{cluster_name}"\nrules = ["{RULES}"]\n'
                      f'[store]\npath = "state/c.db"\n[http]\nlisten = "127.0.0.1:{port}"\n')
    controller_proc = start_controller(tmp_path, config, mosquitto, {})
    agents, sockets = [], {}
    for node, extra in (("nid001", ""), ("nid002", 'required_paths = ["/lustre/scratch"]\n')):
        sockets[node] = str(tmp_path / f"{node}.sock")
        (tmp_path / f"{node}.toml").write_text('[agent]\ninterval = "500ms"\n[plugins.host]\n'
                                               "load_warn_per_core = 0.0\n" + extra)
        agents.append(VetdProcess(["agent", "--config", str(tmp_path / f"{node}.toml")], tmp_path / f"{node}.log",
                                  vetd_env(VETD_BROKER=mosquitto.url, VETD_CLUSTER=cluster_name, VETD_NODE=node,
                                           VETD_CONTROL_SOCKET=sockets[node])).start())
    base = f"http://127.0.0.1:{port}/api/v1"

    def detail() -> dict[str, Any]:
        status, body = call(f"{base}/jobs/5001")
        return json.loads(body) if status == 200 else {}

    try:
        wait_for(lambda: all(Path(s).exists() for s in sockets.values()), 20, "both control sockets")
        wait_for(lambda: '"http_listening"' in controller_proc.output, 10, "http up")
        for node, gpus in (("nid001", "0,1"), ("nid002", "2,3")):
            assert ask(sockets[node], {"op": "job_start", "job_id": "5001", "user": "alice", "gpus": gpus}, 5)["ok"]
        # by name: until nid002's job_start is in, the job has nid001's part alone
        wait_for(lambda: next((p["findings"] for p in detail().get("parts", []) if p["node"] == "nid002"), 0) >= 2,
                 20, "nid002's failing check seen during the job")
        for node in sockets:
            assert ask(sockets[node], {"op": "job_end", "job_id": "5001", "exit_code": 1, "state": "FAILED"}, 5)["ok"]
        done = wait_for(lambda: detail().get("phase") == "done" and detail(), 20, "the job decided")
        assert (done["user"], done["state"], done["exit_code"], done["nodes"]) == (
            "alice", "FAILED", 1, ["nid001", "nid002"])
        assert [(p["node"], p["gpus"], p["state"], bool(p["findings"])) for p in done["parts"]] == [
            ("nid001", "0,1", "FAILED", False), ("nid002", "2,3", "FAILED", True)]
        assert done["attribution"]["kind"] == "nodes" and done["attribution"]["nodes"] == ["nid002"]
        assert {f["name"] for f in done["found"]} == {"host_paths"} and done["parts"][1]["codes"] == ["path_missing"]
        status, listed = call(f"{base}/jobs?failed=1&node=nid001&since=1h")
        assert status == 200 and [j["job"] for j in json.loads(listed)] == ["5001"]
        assert call(f"{base}/jobs/5002")[0] == 404 and call(f"{base}/jobs/5001?run=1")[0] == 404
        assert call(f"{base}/jobs/5001?run=last")[0] == 400
        assert call(f"{base}/jobs?since=whenever")[0] == 400 and call(f"{base}/jobs?nodes=x")[0] == 400
        cli = run_vetd("job", "5001", "--config", str(config), "--json")
        assert json.loads(cli.stdout)["attribution"] == done["attribution"]
    finally:
        for agent in agents:
            agent.stop()
        controller_proc.stop()
