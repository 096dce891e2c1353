"""The engine is pure: built from an in-memory model with no store, it returns every
change to persist and every action to carry out as decisions."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

from tests.controller.test_ingest import RULES
from vetd.controller.actions import ActionOutcome
from vetd.controller.config import BreakerSection, ControllerConfig, RepeatSection
from vetd.controller.counters import Counters
from vetd.controller.decisions import Decisions, Resume
from vetd.controller.engine import Engine
from vetd.controller.model import FleetState, RuleState
from vetd.controller.rules import RuleSet, parse_rules
from vetd.core.configfile import Duration
from vetd.core.protocol import Result, State

#: The engine and its parts, by module name under vetd.controller.
ENGINE = ("engine", "model", "decisions", "rulestate", "fleet", "breaker", "lifecycle", "healing", "jobs",
          "history", "diagnose")
#: What no engine module may import, directly or through another vetd module.
NEVER = ("vetd.controller.store", "sqlite3")
#: What no engine module imports itself: network, processes, event loops, the executor's side.
NOT_DIRECTLY = ("subprocess", "socket", "asyncio", "aiomqtt", "paho", "urllib", "http", "vetd.core.proc",
                "vetd.core.mqtt", "vetd.controller.ingest", "vetd.controller.executor", "vetd.controller.service")



def imports(module: str) -> set[str]:
    """The modules ``module`` imports, leaving out those only type checkers see."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None, module
    tree = ast.parse(Path(spec.origin).read_text())
    skipped = {id(node) for top in ast.walk(tree) if isinstance(top, ast.If)
               and ast.unparse(top.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
               for node in ast.walk(top)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def reachable(module: str) -> set[str]:
    """``module``'s imports, followed through every vetd module."""
    seen, todo = set(), [module]
    while todo:
        for name in imports(todo.pop()):
            if name not in seen:
                seen.add(name)
                if name.startswith("vetd.") and importlib.util.find_spec(name) is not None:
                    todo.append(name)
    return seen


def under(name: str, roots: tuple[str, ...]) -> bool:
    return any(name == root or name.startswith(root + ".") for root in roots)


def test_the_engine_modules_do_no_io() -> None:
    for part in ENGINE:
        module = f"vetd.controller.{part}"
        assert not {name for name in imports(module) if under(name, NOT_DIRECTLY)}, module
        assert not {name for name in reachable(module) if under(name, NEVER)}, module


def engine(state: FleetState, **config: object) -> Engine:
    rules = RuleSet(tuple(parse_rules(RULES, "rules.yaml")), ("rules.yaml",))
    return Engine(ControllerConfig(**config), state, Counters(), rules=lambda: rules,  # type: ignore[arg-type]
                  steps={}, alerting=True, session="test")


def fail(seq: int, node: str = "nid001") -> Result:
    return Result(cluster="alps", node=node, session="s1", seq=seq, ts=100.0 + seq, check="host_env",
                  status="fail", message="unset: NCCL_NET")


def birth(node: str = "nid001") -> State:
    return State(cluster="alps", node=node, session="s1", seq=0, ts=1.0, online=True, started=1.0,
                 labels={"partition": "gpu"})


def test_a_failing_result_decides_a_drain_and_says_what_to_persist() -> None:
    state = FleetState()
    decided = engine(state).process([(birth(), None), (fail(1), 41)], now=101.0)
    node = state.nodes[("alps", "nid001")]
    assert (node.state, node.online, node.reason) == ("excluded", True, "vetd: host-failed: host_env unset: NCCL_NET")
    [drain] = decided.drains
    assert (drain.node, drain.rule, drain.reason) == ("nid001", "host-failed", node.reason)
    assert [a.rule for a in decided.alerts] == ["host-failed"]
    changes = decided.changes
    assert changes.nodes == {("alps", "nid001"): node}
    assert [(a.action, a.outcome, a.evidence) for a in changes.audit] == [
        ("rule_fired", "", [41]), ("drain", "pending", [41])]
    assert drain.audit is changes.audit[1]  # the store gives it its id before the executor acts
    key = ("host-failed", "alps", "nid001", "result:host_env:node")
    assert changes.rule_states == {key: RuleState("firing", 101.0)} and state.rule_states[key] == RuleState("firing", 101.0)
    assert list(changes.firing_alerts) == list(state.firing_alerts) == ["host-failed|alps|nid001|result:host_env:node"]
    assert state.take_changes() == type(changes)()  # taken: the next decisions carry only what changes next


def test_a_duplicate_is_counted_and_decides_nothing() -> None:
    state = FleetState()
    eng = engine(state)
    eng.process([(fail(1), 1)], now=101.0)
    again = eng.process([(fail(1), None)], now=102.0)
    assert eng.counters["duplicates"] == 1 and eng.counters["results"] == 1
    assert list(again) == [] and again.changes.audit == [] and again.changes.rule_states == {}
    assert state.nodes[("alps", "nid001")].last_seen == 102.0  # the agent is there, though


def test_operator_requests_come_back_as_decisions() -> None:
    state = FleetState()
    eng = engine(state)
    eng.process([(fail(1), 1)], now=101.0)
    resumed = eng.operator_resume("alps", "nid001", "operator:ops", now=200.0)
    assert [type(a) for a in resumed] == [Resume]
    assert state.nodes[("alps", "nid001")].state == "healthy"
    assert set(resumed.changes.rule_states.values()) == {None}  # a clean slate: the rule may fire again
    assert [(a.action, a.actor, a.detail) for a in resumed.changes.audit] == [("resume", "operator:ops", "was excluded")]
    drained = eng.operator_drain("alps", "nid002", "vetd: operator ops: fan", "operator:ops", now=201.0)
    assert [(d.node, d.rule) for d in drained.drains] == [("nid002", "")]
    assert eng.node_state("alps", "nid002") == "excluded"


def test_a_drain_that_failed_is_no_repeat_offence() -> None:
    state = FleetState()
    eng = engine(state, repeat=RepeatSection(count=2, window=Duration(3600.0)))

    def excluded_then_resumed(seq: int, outcome: str) -> Decisions:
        decided = eng.process([(fail(seq), seq)], now=100.0 + seq)
        [drain] = decided.drains
        drain.audit.id = seq  # as the store would
        eng.on_outcome(drain, ActionOutcome(outcome == "done", outcome, "scontrol"), now=100.0 + seq)
        eng.operator_resume("alps", "nid001", "operator:ops", now=100.5 + seq)
        return decided

    excluded_then_resumed(1, "failed")
    assert excluded_then_resumed(2, "done").drains[0].reason.startswith("vetd: host-failed")
    third = eng.process([(fail(3), 3)], now=103.0)
    assert state.nodes[("alps", "nid001")].state == "failed"
    assert "repeat offender (2 exclusions" in third.drains[0].reason


def test_the_breaker_opens_in_memory_and_an_operator_resets_it() -> None:
    state = FleetState()
    eng = engine(state, breaker=BreakerSection(max_fraction=0.0, always_allow=1))
    eng.process([(birth(f"nid00{i}"), None) for i in range(4)], now=1.0)
    assert len(eng.process([(fail(1, "nid000"), 1)], now=101.0).drains) == 1
    blocked = eng.process([(fail(1, "nid001"), 2)], now=102.0)
    assert blocked.drains == [] and state.nodes[("alps", "nid001")].state == "suspect"
    assert state.breaker_open("gpu") is not None and blocked.changes.breakers["gpu"].open
    assert [a.action for a in blocked.changes.audit] == ["rule_fired", "breaker_open", "drain"]
    reset = eng.breaker_reset("gpu", "operator:ops", now=103.0)
    assert state.breaker_open("gpu") is None and state.nodes[("alps", "nid001")].state == "healthy"
    assert reset.changes.nodes == {("alps", "nid001"): state.nodes[("alps", "nid001")]}


def test_the_controllers_own_alerts_fire_until_resolved() -> None:
    """vetd-circuit-breaker and vetd-node-failed are re-sent like rule alerts (an Alertmanager outage
    longer than the sender's retries must not lose them) and resolved when their cause ends."""
    state = FleetState()
    eng = engine(state, breaker=BreakerSection(max_fraction=0.0, always_allow=1))
    eng.process([(birth(f"nid00{i}"), None) for i in range(4)], now=1.0)
    eng.process([(fail(1, "nid000"), 1)], now=101.0)
    eng.process([(fail(1, "nid001"), 2)], now=102.0)
    def own() -> list[str]:
        return [a["labels"]["alertname"] for a in eng.firing_alerts.values() if a["labels"]["alertname"][:5] == "vetd-"]

    assert own() == ["vetd-circuit-breaker"]
    reset = eng.breaker_reset("gpu", "operator:ops", now=103.0)
    assert own() == []
    [ended] = [a for alert in reset.alerts for a in alert.alerts]
    assert ended["labels"]["alertname"] == "vetd-circuit-breaker" and "endsAt" in ended
    assert reset.changes.firing_alerts["vetd-circuit-breaker|gpu"].payload is None

    node = state.nodes[("alps", "nid000")]
    failed = Decisions()
    eng.lifecycle.mark_failed(node, "vetd: healing exhausted", "rule", 1, 104.0, failed)
    assert own() == ["vetd-node-failed"]
    back = eng.operator_resume("alps", "nid000", "operator:ops", now=105.0)
    assert own() == []
    assert any(a["labels"]["alertname"] == "vetd-node-failed" and "endsAt" in a
               for alert in back.alerts for a in alert.alerts)



DEFAULT_RULES = Path(__file__).resolve().parents[2] / "controller" / "default_rules.yaml"
H100 = "NVIDIA H100 80GB HBM3"


def gemm(node: str, gpu: int, seq: int, fp16: float, status: str = "pass") -> Result:
    return Result(cluster="alps", node=node, session="s1", seq=seq, ts=100.0 + seq, check="gpu_gemm",
                  entity=f"gpu{gpu}", status=status, metrics={"tflops_fp16": fp16, "checksum_error_fp16": 1e-3},
                  message=f"fp16 {fp16} TFLOP/s")


def test_the_default_rules_alert_on_the_one_gpu_below_90_percent_of_its_peers() -> None:
    rules = RuleSet(tuple(parse_rules(DEFAULT_RULES.read_text(), "default.yaml")), ("default.yaml",))
    eng = Engine(ControllerConfig(), FleetState(), Counters(), rules=lambda: rules, steps={}, alerting=True,
                 session="test")
    births = [State(cluster="alps", node=f"nid00{i}", session="s1", seq=0, ts=1.0, online=True, started=1.0,
                    labels={"partition": "gpu", "gpu_model": "NVIDIA H200" if i == 6 else H100}) for i in range(1, 7)]
    eng.process([(b, None) for b in births], now=1.0)
    alerted = []
    history = iter(range(1, 1000))
    for node, gpu, fp16 in [("nid001", 0, 700), ("nid001", 1, 690), ("nid002", 0, 705),
                            ("nid003", 0, 600),  # 3 peers so far: too few to judge
                            ("nid006", 0, 1000),  # another GPU model: not a peer
                            ("nid004", 0, 698), ("nid005", 0, 702), ("nid005", 1, 699),
                            ("nid003", 1, 620),  # 7 peers (nid003 gpu0 among them), median 699: below
                            ("nid003", 0, 600)]:  # again, with enough peers now
        decided = eng.process([(gemm(node, gpu, next(history), fp16), next(history))], now=200.0)
        alerted += [(a.node, p["labels"]["entity"]) for a in decided.alerts for p in a.alerts]
    assert alerted == [("nid003", "gpu1"), ("nid003", "gpu0")]
    assert eng.counters["rule_errors"] == 0
    median, peers = eng.peer_metrics.view(("alps", "gpu", H100), "nid003", "gpu0")
    # nid003 gpu0 left out: 620 690 698 699 700 702 705 → 699
    assert median["gpu_gemm"] == {"tflops_fp16": 699.0} and peers["gpu_gemm"] == {"tflops_fp16": 7}
    assert "checksum_error_fp16" not in peers["gpu_gemm"]  # no rule names it: not kept
    # the slow GPU measures normally again: its alert is resolved
    decided = eng.process([(gemm("nid003", 1, next(history), 697), next(history))], now=300.0)
    assert [(a.rule, p["endsAt"]) for a in decided.alerts for p in a.alerts] == [
        ("gpu-slower-than-peers", "1970-01-01T00:05:00Z")]


def test_peer_values_are_kept_only_when_a_rule_asks_for_them() -> None:
    eng = engine(FleetState())  # rules that never read fleet.median
    eng.process([(birth(), None), (gemm("nid001", 0, 1, 700.0), 1)], now=101.0)
    assert eng.peer_metrics.groups == {} and not eng.rules.uses_peers


def test_a_node_whose_gpu_model_changes_is_compared_with_its_new_peers() -> None:
    rules = RuleSet(tuple(parse_rules(DEFAULT_RULES.read_text(), "default.yaml")), ("default.yaml",))
    eng = Engine(ControllerConfig(), FleetState(), Counters(), rules=lambda: rules, steps={}, alerting=True,
                 session="test")
    eng.process([(birth(), None), (gemm("nid001", 0, 1, 700.0), 1)], now=101.0)
    moved = State(cluster="alps", node="nid001", session="s2", seq=0, ts=2.0, online=True, started=2.0,
                  labels={"partition": "gpu", "gpu_model": H100})
    eng.process([(moved, None), (birth("nid002"), None), (gemm("nid002", 0, 1, 650.0), 2)], now=102.0)
    eng.process([(Result(cluster="alps", node="nid001", session="s2", seq=1, ts=103.0, check="gpu_gemm",
                         entity="gpu1", status="pass", metrics={"tflops_fp16": 710.0}), 3)], now=103.0)
    groups = eng.peer_metrics.groups
    assert groups[("alps", "gpu", "")]["gpu_gemm"]["tflops_fp16"].by_subject == {("nid002", "gpu0"): 650.0}
    assert groups[("alps", "gpu", H100)]["gpu_gemm"]["tflops_fp16"].by_subject == {
        ("nid001", "gpu0"): 700.0, ("nid001", "gpu1"): 710.0}
