"""for:, keep_firing_for:, count windows, annotations and static labels, on message time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vetd.controller.config import AlertsSection, ControllerConfig, StoreSection, load_controller_config
from vetd.controller.service import Controller
from vetd.core import protocol
from vetd.core.configfile import ConfigError
from vetd.core.protocol import Event, Result, State

DEFAULT_RULES = Path(__file__).resolve().parents[2] / "controller" / "default_rules.yaml"


def make(tmp_path: Path, rules: str, **config: object) -> Controller:
    path = tmp_path / "rules.yaml"
    path.write_text(rules)
    return Controller(ControllerConfig(cluster="alps", rules=[str(path)], store=StoreSection(path=str(tmp_path / "c.db")),
                                       **config))  # type: ignore[arg-type]


class Feed:
    """Messages of one node with increasing sequence numbers and chosen times."""

    def __init__(self, controller: Controller, node: str = "nid001") -> None:
        self.controller, self.node, self.seq = controller, node, 0

    def result(self, ts: float, status: str, check: str = "host_env", entity: str = "node", **kw: object) -> None:
        self.seq += 1
        message = Result(cluster="alps", node=self.node, session="s", seq=self.seq, ts=ts, check=check,
                         status=status, entity=entity, **kw)  # type: ignore[arg-type]
        self.controller.process([(protocol.topic_for(message), protocol.encode(message))], now=ts)

    def event(self, ts: float, name: str, entity: str, codes: list[str]) -> None:
        self.seq += 1
        message = Event(cluster="alps", node=self.node, session="s", seq=self.seq, ts=ts, name=name,
                        entity=entity, codes=codes)
        self.controller.process([(protocol.topic_for(message), protocol.encode(message))], now=ts)

    def actions(self, action: str) -> list[float]:
        return sorted(a["ts"] for a in self.controller.store.audit_log("alps", self.node) if a["action"] == action)


def test_for_waits_and_resets(tmp_path: Path) -> None:
    feed = Feed(make(tmp_path, "rules:\n  - name: r\n    when: result.status == 'fail'\n    for: 5m\n"
                               "    actions: [drain]\n"))
    feed.result(0, "fail")
    feed.result(120, "fail")
    feed.result(200, "pass")  # cleared before 5 min: pending resets
    feed.result(300, "fail")
    feed.result(500, "fail")
    assert feed.actions("rule_fired") == []
    feed.result(600, "fail")  # 300 s after 300
    assert feed.actions("rule_fired") == [600]
    assert feed.controller.store.nodes[("alps", "nid001")].state == "excluded"


def test_keep_firing_for_rides_out_flapping(tmp_path: Path) -> None:
    feed = Feed(make(tmp_path, "rules:\n  - name: r\n    when: result.status == 'fail'\n"
                               "    keep_firing_for: 10m\n    actions: [alert]\n"))
    feed.result(0, "fail")
    feed.result(60, "pass")
    feed.result(120, "fail")  # back within 10 min: same firing, no new one
    feed.result(180, "pass")
    feed.result(600, "pass")
    assert feed.actions("rule_fired") == [0] and feed.actions("rule_resolved") == []
    feed.result(781, "pass")  # 10 min after the condition cleared at 180
    assert feed.actions("rule_resolved") == [781]


def test_count_within_per_entity(tmp_path: Path) -> None:
    feed = Feed(make(tmp_path, "rules:\n  - name: xid31-twice\n"
                               "    when: event.name == 'xid' && 'xid_31' in event.codes\n"
                               "    count: 2\n    within: 24h\n    per: entity\n    actions: [drain]\n"))
    hour = 3600.0
    feed.event(0, "xid", "gpu1", ["xid_31"])
    feed.event(2 * hour, "xid", "gpu2", ["xid_31"])  # another GPU: not the same offender
    feed.event(25 * hour, "xid", "gpu1", ["xid_31"])  # gpu1 again, but 25 h later
    assert feed.actions("rule_fired") == []
    feed.event(30 * hour, "xid", "gpu1", ["xid_31"])
    assert feed.actions("rule_fired") == [30 * hour]
    reason = feed.controller.store.nodes[("alps", "nid001")].reason
    assert reason.startswith("vetd: xid31-twice: xid[gpu1]")


def test_windows_survive_a_restart(tmp_path: Path) -> None:
    rules = "rules:\n  - name: twice\n    when: result.status == 'fail'\n    count: 2\n    within: 1h\n"
    feed = Feed(make(tmp_path, rules))
    feed.result(0, "fail")
    feed.controller.store.close()
    feed.controller = make(tmp_path, rules)
    feed.result(60, "pass")
    feed.result(120, "fail")
    assert feed.actions("rule_fired") == [120]


def test_mark_failed_and_annotations_and_static_labels(tmp_path: Path) -> None:
    controller = make(
        tmp_path,
        "rules:\n  - name: hbm\n    when: result.check == 'gpu_health' && 'row_remap_failure' in result.codes\n"
        "    severity: critical\n    actions: [mark_failed, alert]\n    labels: {team: gpu}\n"
        "    annotations:\n      summary: '{{ node.name }} ({{ node.labels.partition }}): {{ result.entity }} "
        "{{ result.codes }} at {{ result.metrics.temp_c }} C'\n      runbook_url: https://wiki/hbm\n",
        labels={"nid[001-004]": {"partition": "normal", "gpu": "GH200"}},
        alerts=AlertsSection(urls=["http://unused"]),
    )
    birth = State(cluster="alps", node="nid001", session="s", seq=0, ts=1, online=True, started=1,
                  labels={"partition": "debug", "rack": "r3"})
    controller.process([(protocol.topic_for(birth), protocol.encode(birth))], now=1)
    feed = Feed(controller)  # reads the audit log
    message = Result(cluster="alps", node="nid001", session="s", seq=1, ts=5, check="gpu_health", status="fail",
                     entity="gpu3", codes=["row_remap_failure"], metrics={"temp_c": 41.0})
    decisions = controller.process([(protocol.topic_for(message), protocol.encode(message))], now=5)
    node = controller.store.nodes[("alps", "nid001")]
    assert node.state == "failed" and [d.node for d in decisions.drains] == ["nid001"]
    assert feed.actions("mark_failed") == [5]
    alert = next(a for a in decisions.alerts if a.rule == "hbm").alerts[0]
    assert alert["annotations"]["summary"] == "nid001 (normal): gpu3 row_remap_failure at 41 C"
    assert alert["annotations"]["runbook_url"] == "https://wiki/hbm"
    assert alert["labels"]["partition"] == "normal" and alert["labels"]["rack"] == "r3"
    assert alert["labels"]["team"] == "gpu" and alert["labels"]["entity"] == "gpu3"


def test_the_default_rules_alert_on_a_gpu_driver_that_drifted_from_its_partition(tmp_path: Path) -> None:
    controller = Controller(ControllerConfig(cluster="alps", rules=[str(DEFAULT_RULES)], store=StoreSection(path=str(tmp_path / "c.db")),
                                             labels={"nid[005-006]": {"partition": "debug"}},
                                             alerts=AlertsSection(urls=["http://unused"])))
    drivers = {"nid001": "550.54.15", "nid002": "550.54.15", "nid003": "550.54.15", "nid004": "535.104.05",
               "nid005": "560.28.03", "nid006": "560.28.03"}  # the debug partition tries a newer one
    births = [State(cluster="alps", node=node, session="s", seq=0, ts=1, online=True, started=1,
                    labels={"gpu_driver": driver, "partition": "normal"}) for node, driver in drivers.items()]
    controller.process([(protocol.topic_for(b), protocol.encode(b)) for b in births], now=1)

    def drift(node: str, seq: int) -> list[dict[str, Any]]:
        result = Result(cluster="alps", node=node, session="s", seq=seq, ts=1 + seq, check="gpu_health",
                        entity="node", status="pass", metrics={"driver_major": 550.0})
        decisions = controller.process([(protocol.topic_for(result), protocol.encode(result))], now=1 + seq)
        return [a for alert in decisions.alerts if alert.rule == "gpu-driver-drift" for a in alert.alerts]

    assert [drift(node, 1) for node in ("nid001", "nid005", "nid006")] == [[], [], []]
    (alert,) = drift("nid004", 1)
    assert alert["labels"]["severity"] == "warning" and alert["labels"]["node"] == "nid004"
    assert alert["annotations"]["summary"] == \
        "nid004 runs GPU driver 535.104.05; most of partition normal runs 550.54.15"
    # a rollout half way: two of the four upgraded: no majority, nothing drifted
    upgrade = [State(cluster="alps", node=n, session="s2", seq=0, ts=5, online=True, started=5,
                     labels={"gpu_driver": "560.28.03", "partition": "normal"}) for n in ("nid001", "nid002")]
    controller.process([(protocol.topic_for(b), protocol.encode(b)) for b in upgrade], now=5)
    assert controller.fleet_of(controller.store.nodes[("alps", "nid003")]) == {
        "partition": "normal", "labels": {"partition": "normal"}}
    assert drift("nid003", 2) == []
    (resolved,) = drift("nid004", 2)  # the alert nid004 had is resolved
    assert resolved["endsAt"] == "1970-01-01T00:00:03Z"
    assert controller.fleet_of(controller.store.nodes[("alps", "nid005")]) == {
        "partition": "debug", "labels": {"gpu_driver": "560.28.03", "partition": "debug"}}


def test_bad_static_labels_are_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "controller.toml"
    path.write_text('[labels]\n"nid[001-" = {partition = "x"}\n')
    with pytest.raises(ConfigError, match=r"controller\.toml:1: labels: 'nid\[001-' is not a hostlist"):
        load_controller_config(path, environ={})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("rules:\n  - name: e\n    when: event.name == 'x'\n    for: 5m\n", r":4: rule 'e': for: only rules on results"),
        ("rules:\n  - name: c\n    when: result.status == 'fail'\n    count: 3\n", r":2: rule 'c': within: count above 1"),
        ("rules:\n  - name: h\n    when: result.status == 'fail'\n    actions: [heal]\n", r"rule 'h': heal: the heal action"),
        ("rules:\n  - name: h\n    when: result.status == 'fail'\n    actions: [heal]\n    heal: [reset_gpu]\n",
         r":5: rule 'h': heal: unknown step 'reset_gpu'"),
        ("rules:\n  - name: h\n    when: result.status == 'fail'\n    actions: [heal]\n    heal: [revet]\n",
         r"revet needs an argument"),
    ],
)
def test_timing_and_heal_validation(tmp_path: Path, text: str, expected: str) -> None:
    from vetd.controller.rules import RuleError, load_rules

    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RuleError, match=expected):
        load_rules([path])
