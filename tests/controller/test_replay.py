"""`vetd rules test --events` and `vetd export --events`: replay an incident against rules."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.procs import run_vetd
from vetd.controller.config import ControllerConfig, StoreSection
from vetd.core import protocol
from vetd.core.protocol import Result, State

RULES = """\
rules:
  - name: xid31-twice
    when: event.name == "xid" && "xid_31" in event.codes
    count: 2
    within: 24h
    per: entity
    actions: [drain, alert]
  - name: env
    when: result.check == "host_env" && result.status == "fail"
    for: 2m
    actions: [alert]
"""

EVENTS = [
    {"kind": "state", "ts": 0, "node": "nid001", "online": True, "labels": {"partition": "gpu"}},
    {"kind": "event", "ts": 100, "node": "nid001", "name": "xid", "entity": "gpu1", "severity": "warning",
     "codes": ["xid_31"]},
    {"kind": "event", "ts": "1970-01-01T02:00:00Z", "node": "nid001", "name": "xid", "entity": "gpu1",
     "severity": "warning", "codes": ["xid_31"]},
    {"kind": "result", "ts": 8000, "node": "nid002", "check": "host_env", "status": "fail", "message": "unset"},
    {"kind": "result", "ts": 8060, "node": "nid002", "check": "host_env", "status": "fail", "message": "unset"},
    {"kind": "result", "ts": 8130, "node": "nid002", "check": "host_env", "status": "fail", "message": "unset"},
    {"kind": "result", "ts": 8200, "node": "nid002", "check": "host_env", "status": "pass"},
]


def write(tmp_path: Path) -> tuple[Path, Path]:
    rules, events = tmp_path / "rules.yaml", tmp_path / "events.jsonl"
    rules.write_text(RULES)
    events.write_text("".join(json.dumps(e) + "\n" for e in EVENTS))
    return rules, events


def test_rules_test_prints_every_decision_at_message_time(tmp_path: Path) -> None:
    rules, events = write(tmp_path)
    done = run_vetd("rules", "test", str(rules), "--events", str(events), "--json")
    assert done.returncode == 0, done.stderr
    decisions = [(d["ts"], d["node"], d["action"], d["rule"], d["outcome"]) for d in map(json.loads, done.stdout.splitlines())]
    assert decisions == [
        (7200.0, "nid001", "rule_fired", "xid31-twice", ""),
        (7200.0, "nid001", "drain", "xid31-twice", "decided"),
        (7200.0, "nid001", "alert", "xid31-twice", "firing"),
        (8130.0, "nid002", "rule_fired", "env", ""),  # held 2 min: 8000 → 8130
        (8130.0, "nid002", "alert", "env", "firing"),
        (8200.0, "nid002", "rule_resolved", "env", ""),
        (8200.0, "nid002", "alert", "env", "resolved"),
    ]
    table = run_vetd("rules", "test", str(rules), "--events", str(events)).stdout.splitlines()
    assert table[0].split() == ["TIME", "NODE", "ACTION", "RULE", "OUTCOME", "DETAIL"]
    assert table[1].startswith("1970-01-01T02:00:00Z  nid001  rule_fired")


def test_a_bad_events_line_names_file_and_line(tmp_path: Path) -> None:
    rules, events = write(tmp_path)
    events.write_text(events.read_text() + '{"kind": "result", "ts": 9000, "node": "nid002", "status": "odd"}\n')
    done = run_vetd("rules", "test", str(rules), "--events", str(events))
    assert done.returncode == 2 and f"{events}:8:" in done.stderr


def test_export_then_replay_reproduces_the_controller_decisions(tmp_path: Path) -> None:
    from vetd.controller.service import Controller

    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - name: fail\n    when: result.status == 'fail'\n    count: 2\n    within: 1h\n"
                     "    actions: [drain]\n")
    db = tmp_path / "state" / "c.db"
    controller = Controller(ControllerConfig(cluster="alps", rules=[str(rules)], store=StoreSection(path=str(db))))
    birth = State(cluster="alps", node="nid007", session="s", seq=0, ts=1000, online=True, started=1000,
                  labels={"rack": "r1"})
    messages: list[protocol.Message] = [birth] + [
        Result(cluster="alps", node="nid007", session="s", seq=i, ts=1000 + 60 * i, check="host_disk",
               status="fail" if i in (2, 5) else "pass", entity="disk:/", message="1% free" if i in (2, 5) else "")
        for i in range(1, 7)
    ]
    for message in messages:
        controller.process([(protocol.topic_for(message), protocol.encode(message))], now=message.ts)
    live = [(a["ts"], a["action"]) for a in reversed(controller.store.audit_log("alps", "nid007"))]
    controller.store.close()
    config = tmp_path / "controller.toml"
    config.write_text(f'cluster = "alps"\nrules = ["{rules}"]\n[store]\npath = "{db}"\n')

    exported = run_vetd("export", "--events", "--config", str(config))
    assert exported.returncode == 0, exported.stderr
    lines = [json.loads(line) for line in exported.stdout.splitlines()]
    assert lines[0]["kind"] == "state" and lines[0]["labels"] == {"rack": "r1"}
    assert [line["seq"] for line in lines[1:]] == [1, 2, 3, 4, 5, 6]
    events = tmp_path / "incident.jsonl"
    events.write_text(exported.stdout)
    replayed = run_vetd("rules", "test", str(rules), "--events", str(events), "--json")
    decided = [(d["ts"], d["action"]) for d in map(json.loads, replayed.stdout.splitlines())]
    assert decided == live == [(1300.0, "rule_fired"), (1300.0, "drain"), (1360.0, "rule_resolved")]


def test_rules_test_replays_the_fleet_relative_rule_on_the_one_slow_gpu(tmp_path: Path) -> None:
    """Five nodes of one partition and GPU model, two GPUs each, vetted twice; nid003's gpu1
    computes at 85 % of the others and nid004's NCCL bus bandwidth is low: only they are alerted."""
    model = {"partition": "gpu", "gpu_model": "NVIDIA H100 80GB HBM3"}
    lines: list[dict[str, object]] = [{"kind": "state", "ts": 0, "node": f"nid00{n}", "online": True, "labels": model}
                                      for n in range(1, 6)]
    for start in (100, 200):
        for n in range(1, 6):
            node = f"nid00{n}"
            for gpu in range(2):
                fp16 = 600.0 if (node, gpu) == ("nid003", 1) else 700.0 + n - gpu
                lines.append({"kind": "result", "ts": start + n, "node": node, "check": "gpu_gemm",
                              "entity": f"gpu{gpu}", "status": "pass", "message": f"fp16 {fp16} TFLOP/s",
                              "metrics": {"tflops_fp16": fp16, "tflops_fp64": 50.0 + n}})
            lines.append({"kind": "result", "ts": start + 50 + n, "node": node, "check": "nccl_allreduce",
                          "status": "pass", "codes": ["no_reference"],
                          "metrics": {"busbw_gbps": 300.0 if node == "nid004" else 370.0 + n}})
    events = tmp_path / "events.jsonl"
    events.write_text("".join(json.dumps(line) + "\n" for line in lines))
    done = run_vetd("rules", "test", "--events", str(events), "--json")  # the rules vetd ships
    assert done.returncode == 0, done.stderr
    decisions = [(d["ts"], d["node"], d["action"], d["rule"], d["detail"]) for d in map(json.loads, done.stdout.splitlines())]
    # At least 4 peers: nid003's gpu1 has them in the first round (the GPUs of nid001 and nid002,
    # and its own gpu0); nid004's all-reduce, one per node, only in the second (nid001-003 and nid005).
    assert [d[:4] for d in decisions] == [
        (103.0, "nid003", "rule_fired", "gpu-slower-than-peers"),
        (103.0, "nid003", "alert", "gpu-slower-than-peers"),
        (254.0, "nid004", "rule_fired", "gpu-slower-than-peers"),
        (254.0, "nid004", "alert", "gpu-slower-than-peers"),
    ]
    assert decisions[0][4] == "result:gpu_gemm:gpu1" and decisions[2][4] == "result:nccl_allreduce:node"
    assert decisions[1][4] == ("nid003 gpu1: gpu_gemm below 90 % of the median of its peers "
                               "(NVIDIA H100 80GB HBM3 in partition gpu)")
