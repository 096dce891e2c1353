from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from tests.support.procs import run_vetd
from vetd.controller.rules import SCHEMAS, RuleError, RuleSet, evaluate_all, load_rules, parse_rules
from vetd.core.protocol import Result

GOOD = """\
rules:
  - name: host-failed
    when: result.status == "fail" && result.check.startsWith("host_")
    severity: critical
    actions: [drain, alert]
  - name: hot
    when: has(result.metrics.temp_c) && result.metrics.temp_c > 85.0
  - name: xid
    when: event.name == "xid" && "xid_79" in event.codes && node.labels.gpu == "GH200"
    actions: [drain]
"""


def test_rules_know_whether_they_look_at_results_or_events() -> None:
    rules = parse_rules(GOOD, "good.yaml")
    assert [(r.name, r.input, r.line) for r in rules] == [
        ("host-failed", "result", 2), ("hot", "result", 6), ("xid", "event", 8)]
    assert rules[1].spec.actions == ["alert"] and rules[1].spec.severity == "warning"


def test_conditions_evaluate_against_result_and_node() -> None:
    rules = parse_rules(GOOD, "good.yaml")
    node = {"name": "nid001", "state": "healthy", "labels": {"gpu": "GH200"}}
    result = {"check": "host_env", "status": "fail", "metrics": {}, "codes": []}
    decided = evaluate_all([r for r in rules if r.input == "result"], {"result": result, "event": {}, "node": node})
    assert [(r.name, v) for r, v in decided] == [("host-failed", True), ("hot", False)]
    event = {"name": "xid", "codes": ["xid_79"]}
    decided = evaluate_all([rules[2]], {"result": {}, "event": event, "node": node})
    assert decided[0][1] is True


def test_a_condition_that_errors_at_runtime_is_neither_true_nor_false() -> None:
    rule = parse_rules("rules:\n  - name: r\n    when: result.metrics.temp_c > 1.0\n", "f")[0]
    assert evaluate_all([rule], {"result": {"metrics": {}}, "event": {}, "node": {}})[0][1] is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("rules:\n  - name: ok\n    when: result.status == 'fail'\n  - name: broken\n"
         "    severity: critical\n    when: result.status ==\n",
         r"bad\.yaml:6: rule 'broken': when: CEL error at 1:17: Syntax error"),
        ("rules:\n  - name: typo\n    when: resutl.status == 'fail'\n",
         r"bad\.yaml:3: rule 'typo': when: CEL error .*undeclared reference to 'resutl"),
        ("rules:\n  - name: both\n    when: result.status == 'fail' || event.name == 'x'\n",
         r"bad\.yaml:3: rule 'both': when: .*not both"),
        ("rules:\n  - name: job-and-result\n    when: job.failed && result.status == 'fail'\n",
         r"bad\.yaml:3: rule 'job-and-result': when: .*not both"),
        ("rules:\n  - name: j\n    when: job.failed\n    for: 5m\n",
         r"bad\.yaml:4: rule 'j': for: only rules on results can wait \(jobs are instants"),
        ("rules:\n  - name: j\n    when: job.failed\n    actions: [suspect, drain]\n",
         r"bad\.yaml:4: rule 'j': actions: suspect keeps the node in service"),
        ("rules:\n  - name: j\n    when: job.faild\n",
         r"bad\.yaml:3: rule 'j': when: unknown field `job.faild` at column 4 \(job has: codes, ended, exit_code"),
        ("rules:\n  - name: j\n    when: job.failed\n    description: '{{ result.check }}'\n",
         r"bad\.yaml:4: rule 'j': description: unknown field `result.check` \(a rule on jobs sees job\.\*, "
         r"event\.\*, node\.\*, fleet\.\*\)"),
        ("rules:\n  - name: k\n    when: result.status == 'fail'\n    actoins: [drain]\n",
         r"bad\.yaml:4: rule 'k': actoins: .*unknown field"),
        ("rules:\n  - name: a\n    when: 'true'\n    actions: [reboot]\n",
         r"bad\.yaml:4: rule 'a': actions: Invalid enum value 'reboot' \(expected one of: drain, alert, heal, mark_failed, suspect, diagnose\)"),
        ("rules:\n  - when: result.status == 'fail'\n", r"bad\.yaml:2: rule: name: .*missing required field"),
        ("rules:\n  - name: a\n    when: [\n", r"bad\.yaml:\d+: invalid YAML"),
        ("rule:\n  - name: a\n", r"bad\.yaml:1: rule: unknown key"),
    ],
)
def test_bad_rule_files_name_file_line_and_rule(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RuleError, match=expected):
        load_rules([path])


def test_a_rule_that_reads_job_is_a_rule_on_jobs_and_sees_the_node_job_end() -> None:
    [rule] = parse_rules("rules:\n  - name: j\n    when: job.failed && job.other_findings == 0 && "
                         "event.name == 'job_end' && event.data.state == 'FAILED'\n    count: 3\n    within: 24h\n"
                         "    actions: [suspect, alert]\n    annotations:\n      summary: '{{ job.user }} {{ event.message }}'\n",
                         "f")
    assert rule.input == "job" and rule.spec.actions == ["suspect", "alert"]
    job = {"failed": True, "other_findings": 0}
    assert evaluate_all([rule], {"job": job, "event": {"name": "job_end", "data": {"state": "FAILED"}},
                                 "node": {}})[0][1] is True
    [event_rule] = parse_rules("rules:\n  - name: e\n    when: event.data.user == 'alice'\n", "f")
    assert event_rule.input == "event"


def test_duplicate_names_across_files_are_rejected(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(GOOD)
    (tmp_path / "b.yaml").write_text("rules:\n  - name: hot\n    when: 'true'\n")
    with pytest.raises(RuleError, match=r"b\.yaml:2: rule 'hot': name already used at .*a\.yaml:6"):
        load_rules([tmp_path / "a.yaml", tmp_path / "b.yaml"])


def test_vetd_rules_check_command(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(GOOD)
    bad.write_text("rules:\n  - name: broken\n    when: result.status ==\n")
    ok = run_vetd("rules", "check", str(good))
    assert ok.returncode == 0 and "3 rules in 1 file(s) valid" in ok.stdout
    failed = run_vetd("rules", "check", str(good), str(bad))
    assert failed.returncode == 1
    assert f"{bad}:3: rule 'broken': when: CEL error" in failed.stderr


def test_the_shipped_default_rules_are_valid() -> None:
    root = Path(__file__).resolve().parents[2]
    rules = load_rules([root / "packaging" / "rules" / "default.yaml"])
    assert {"check-failed", "critical-event"} <= {r.name for r in rules.rules}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("rules:\n  - name: typo\n    when: result.stauts == 'fail'\n",
         ":3: rule 'typo': when: unknown field `result.stauts` at column 7 (result has: check, codes,"),
        ("rules:\n  - name: node-typo\n    when: event.name == 'xid' && node.lables.gpu == 'H200'\n",
         ":3: rule 'node-typo': when: unknown field `node.lables`"),
        ("rules:\n  - name: hot\n    when: has(result.metrics.temp_c) && result.metrics.temp_c > 'hot'\n",
         ":3: rule 'hot': when: type error at column 53: found no matching overload for '_>_' "
         "applied to '(double, string)'"),
        ("rules:\n  - name: not-bool\n    when: result.message\n",
         ":3: rule 'not-bool': when: the condition is a string, not a bool"),
        ("rules:\n  - name: open\n    when: result.status == 'fail'\n    annotations:\n"
         "      summary: '{{ node.name } failed'\n",
         ":5: rule 'open': annotations.summary: unclosed `{{` at column 1"),
        ("rules:\n  - name: unknown\n    when: result.status == 'fail'\n"
         "    description: '{{ result.metrics.temp_c }} on {{ result.gpu }}'\n",
         ":4: rule 'unknown': description: unknown field `result.gpu`"),
        ("rules:\n  - name: wrong-kind\n    when: event.name == 'xid'\n    annotations:\n"
         "      summary: '{{ result.entity }}'\n",
         ":5: rule 'wrong-kind': annotations.summary: unknown field `result.entity`"),
        ("rules:\n  - name: slow\n    when: result.metrics.tflops_fp16 < 0.9 * fleet.medain['gpu_gemm']['tflops_fp16']\n",
         ":3: rule 'slow': when: unknown field `fleet.medain` at column 41 (fleet has: labels, median, partition, peers)"),
        ("rules:\n  - name: few\n    when: result.check == 'gpu_gemm' && fleet.peers['gpu_gemm']['tflops_fp16'] >= '4'\n",
         ":3: rule 'few': when: type error at column 70: found no matching overload for '_>=_' "
         "applied to '(int, string)'"),
        ("rules:\n  - name: deep\n    when: result.status == 'pass'\n"
         "    description: '{{ fleet.median.gpu_gemm.tflops_fp16.x }}'\n",
         ":4: rule 'deep': description: unknown field `fleet.median.gpu_gemm.tflops_fp16.x`"),
    ],
)
def test_rules_check_catches_unknown_fields_type_errors_and_bad_templates(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    checked = run_vetd("rules", "check", str(path))
    assert checked.returncode == 1 and f"vetd: {path}{expected}" in checked.stderr, checked.stderr


def test_dynamic_map_keys_and_runtime_absences_still_pass(tmp_path: Path) -> None:
    path = tmp_path / "dynamic.yaml"
    path.write_text("""\
rules:
  - name: hot
    when: result.metrics.temp_c > 85
    annotations:
      summary: "{{ node.name }} at {{ result.metrics.temp_c }} C, {{ fleet.labels.driver }} {{node.labels}}"
  - name: partition-drift
    when: has(fleet.labels.partition) && node.labels.partition != fleet.labels.partition
  - name: job
    when: has(result.job_id) && result.job_id != "" && result.duration_s >= 3
  - name: by-key
    when: result["status"] == "fail" && "temp_c" in result.metrics
  - name: xid-gpu
    when: event.metrics.count == 2.0 && event.codes.exists(c, c.startsWith("xid_")) && !node.online
    description: "{{ event.entity }} on {{ node.cluster }}/{{ node.name }}"
""")
    checked = run_vetd("rules", "check", str(path))
    assert checked.returncode == 0 and "5 rules in 1 file(s) valid" in checked.stdout, checked.stderr


def test_the_checked_fields_are_the_wire_structs() -> None:
    """The fields rules may name come from the protocol's Structs, less routing (``ts`` stays)."""
    assert {name.partition(".")[2] for name in SCHEMAS["result"] if name.startswith("result.")} == (
        {f.name for f in msgspec.structs.fields(Result)} - {"v", "cluster", "node", "session", "seq"})
    assert SCHEMAS["event"]["event.severity"].name() == "STRING"
    assert SCHEMAS["result"]["result.metrics"].name() == "MAP<STRING, DOUBLE>"


def test_the_checks_and_metrics_a_fleet_relative_rule_names_are_the_ones_kept() -> None:
    rules = RuleSet(tuple(parse_rules("""\
rules:
  - name: slow
    when: >-
      result.check in ["gpu_gemm", 'nccl_allreduce'] && fleet.peers.gpu_gemm.tflops_bf16 >= 4 &&
      result.metrics.busbw_gbps < 0.9 * fleet.median[result.check]["busbw_gbps"]
  - name: failed
    when: result.status == "fail" && result.check == "host_env"
""", "r.yaml")), ("r.yaml",))
    assert rules.uses_peers and rules.uses_fleet
    assert rules.peer_names == {"gpu_gemm", "nccl_allreduce", "tflops_bf16", "busbw_gbps"}
