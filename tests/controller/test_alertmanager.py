"""Alerts delivered to a real Alertmanager and read back through its API v2 (and amtool).

The controller runs in-process (as in test_alerts.py) with real time stamps;
each test keeps apart on the shared Alertmanager by its own ``cluster`` label.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.controller.test_alerts import drain_actions, feed
from tests.controller.test_end_to_end import start_controller, vetd_json
from tests.support.procs import VetdProcess, publish_raw
from tests.support.services import Alertmanager, Mosquitto
from tests.support.wait import wait_for
from vetd.controller.config import (
    AlertsSection,
    BreakerSection,
    ControllerConfig,
    RepeatSection,
    StoreSection,
)
from vetd.controller.service import Controller
from vetd.core import protocol
from vetd.core.protocol import Result, State

RULES = """\
rules:
  - name: host-failed
    when: result.check == "host_env" && result.status == "fail"
    severity: critical
    labels:
      team: hpc-ops
    annotations:
      summary: "{{ node.name }} failed {{ result.check }}"
    description: A host check failed; the node is excluded.
    actions: [drain, alert]
"""


def make(tmp_path: Path, url: str, cluster: str, **sections: Any) -> Controller:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    return Controller(ControllerConfig(cluster=cluster, rules=[str(rules)], store=StoreSection(path=str(tmp_path / "c.db")),
                                       alerts=AlertsSection(urls=[url]), **sections))


class Node:
    """One simulated agent session: birth, then results with real time stamps."""

    def __init__(self, cluster: str, name: str) -> None:
        self.cluster, self.name, self.session, self.seq = cluster, name, f"s-{name}", 0

    def _next(self) -> dict[str, Any]:
        self.seq += 1
        return {"cluster": self.cluster, "node": self.name, "session": self.session, "seq": self.seq,
                "ts": time.time()}

    def birth(self) -> State:
        stamp = self._next() | {"seq": 0}
        return State(**stamp, online=True, started=stamp["ts"])

    def host_env(self, ok: bool) -> Result:
        return Result(**self._next(), check="host_env", status="pass" if ok else "fail",
                      message="" if ok else "LD_PRELOAD set")


def by_name(alerts: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {a["labels"]["alertname"]: a for a in alerts}


def test_a_rule_alert_arrives_with_its_labels_and_annotations(
    tmp_path: Path, alertmanager: Alertmanager, cluster_name: str
) -> None:
    controller = make(tmp_path, alertmanager.alerts_url, cluster_name)
    node = Node(cluster_name, "nid001")
    feed(controller, node.birth(), node.host_env(ok=False))
    asyncio.run(drain_actions(controller))
    alerts = wait_for(lambda: alertmanager.alerts(f'cluster="{cluster_name}"'), 10, "the alert in Alertmanager")
    assert len(alerts) == 1
    alert = alerts[0]
    assert alert["labels"] == {"alertname": "host-failed", "cluster": cluster_name, "node": "nid001",
                               "severity": "critical", "team": "hpc-ops"}
    assert alert["annotations"]["summary"] == "nid001 failed host_env"
    assert alert["annotations"]["description"].startswith("A host check failed")
    assert alert["status"]["state"] == "active" and alert["generatorURL"] == f"vetd://{cluster_name}/node/nid001"
    # amtool, as an operator reads it, agrees
    done = subprocess.run(["amtool", f"--alertmanager.url={alertmanager.url}", "alert", "query", "-o", "json",
                           f"cluster={cluster_name}"], capture_output=True, text=True, check=True, timeout=30)
    assert [a["labels"]["alertname"] for a in json.loads(done.stdout)] == ["host-failed"]


def test_the_circuit_breaker_alert(tmp_path: Path, alertmanager: Alertmanager, cluster_name: str) -> None:
    controller = make(tmp_path, alertmanager.alerts_url, cluster_name, breaker=BreakerSection(max_fraction=0.25, always_allow=1))
    nodes = [Node(cluster_name, f"nid00{i}") for i in range(1, 5)]
    feed(controller, *(n.birth() for n in nodes))
    feed(controller, nodes[0].host_env(ok=False), nodes[1].host_env(ok=False))  # the second is one too many
    asyncio.run(drain_actions(controller))
    alerts = wait_for(lambda: by_name(alertmanager.alerts(f'cluster="{cluster_name}"')).get("vetd-circuit-breaker"),
                      10, "the breaker's alert")
    assert alerts["labels"] | {"node": "nid002", "severity": "critical", "partition": "default"} == alerts["labels"]
    assert "nothing more is drained there until `vetd breaker reset`" in alerts["annotations"]["description"]
    # the first node's rule alert arrived beside it; the second node was only held suspect
    fired = alertmanager.alerts(f'cluster="{cluster_name}"', 'alertname="host-failed"')
    assert sorted(a["labels"]["node"] for a in fired) == ["nid001", "nid002"]
    assert controller.engine.node_state(cluster_name, "nid002") == "suspect"


def test_a_repeat_offender_is_failed_with_the_node_failed_alert(
    tmp_path: Path, alertmanager: Alertmanager, cluster_name: str
) -> None:
    """vetd has no alert of its own for a repeat offender: it marks the node ``failed`` and
    sends ``vetd-node-failed`` whose description says why."""
    controller = make(tmp_path, alertmanager.alerts_url, cluster_name, repeat=RepeatSection(count=2))
    node = Node(cluster_name, "nid003")
    feed(controller, node.birth(), node.host_env(ok=False))
    asyncio.run(drain_actions(controller))
    assert controller.engine.node_state(cluster_name, "nid003") == "excluded"
    with controller.store.transaction():  # an operator resumes it; it fails again
        decisions = controller.engine.operator_resume(cluster_name, "nid003", "operator:test", time.time())
        controller.store.apply(decisions.changes)
    controller.executor.enqueue(decisions)
    feed(controller, node.host_env(ok=True), node.host_env(ok=False))
    asyncio.run(drain_actions(controller))
    assert controller.engine.node_state(cluster_name, "nid003") == "failed"
    failed = wait_for(lambda: by_name(alertmanager.alerts(f'cluster="{cluster_name}"')).get("vetd-node-failed"),
                      10, "the node-failed alert")
    assert failed["labels"] | {"node": "nid003", "severity": "critical"} == failed["labels"]
    assert failed["annotations"]["summary"] == "nid003 needs a person"
    assert "repeat offender (2 exclusions in 7d)" in failed["annotations"]["description"]


def test_alertmanager_down_for_a_while_loses_nothing(
    tmp_path: Path, own_alertmanager: Alertmanager, cluster_name: str
) -> None:
    """Stopped while alerts are raised: the sender retries with back-off and, once Alertmanager
    is back on its port and storage, every alert is there."""
    controller = make(tmp_path, own_alertmanager.alerts_url, cluster_name, breaker=BreakerSection(max_fraction=1.0))
    nodes = [Node(cluster_name, f"nid00{i}") for i in range(1, 4)]
    own_alertmanager.stop()
    feed(controller, *(n.birth() for n in nodes), *(n.host_env(ok=False) for n in nodes))

    async def scenario() -> None:
        delivery = asyncio.create_task(drain_actions(controller))
        await asyncio.sleep(2.0)  # down for a while: the first attempts fail
        assert not delivery.done()  # still retrying, not given up
        await asyncio.to_thread(own_alertmanager.start)
        await asyncio.wait_for(delivery, 30)

    asyncio.run(scenario())
    fired = wait_for(lambda: own_alertmanager.alerts(f'cluster="{cluster_name}"'), 10, "alerts after the restart")
    assert sorted(a["labels"]["node"] for a in fired) == ["nid001", "nid002", "nid003"]
    assert {a["labels"]["alertname"] for a in fired} == {"host-failed"}


def outage(tmp_path: Path, mosquitto: Mosquitto, alertmanager: Alertmanager, cluster: str,
           repeat: str = "") -> tuple[VetdProcess, Path]:
    """A ``vetd controller`` (re-sending every second) whose Alertmanager is down; three nodes fail a
    check and wait until the sender has given up on every alert of theirs (its retries span ~7.5 s)."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    config = tmp_path / "controller.toml"
    config.write_text(f'cluster = "{cluster}"\nclient_id = "vetd-controller-{cluster}"\nrules = ["{rules}"]\n'
                      '[store]\npath = "state/controller.db"\n[breaker]\nmax_fraction = 1.0\n'
                      f'{repeat}[alerts]\nurls = ["{alertmanager.alerts_url}"]\nresend_interval = "1s"\n')
    alertmanager.stop()
    controller = start_controller(tmp_path, config, mosquitto, {})
    nodes = [Node(cluster, f"nid00{i}") for i in range(1, 4)]
    for node in nodes:
        for message in (node.birth(), node.host_env(ok=False)):
            publish_raw(mosquitto.port, protocol.topic_for(message), protocol.encode(message))

    def given_up(node: str) -> bool:
        done = vetd_json("node", node, "--config", str(config), "--json")["audit"]
        return any(a["action"] == "alert" and a["outcome"] == "failed" for a in done)

    started = time.monotonic()
    wait_for(lambda: all(given_up(n.name) for n in nodes), 40, "the sender to give up on every node's alert")
    assert time.monotonic() - started > 5  # the retries took their time: this outage outlasted them
    return controller, config


def test_alerts_raised_during_an_outage_longer_than_the_retries_arrive_through_the_resend_loop(
    tmp_path: Path, mosquitto: Mosquitto, own_alertmanager: Alertmanager, cluster_name: str
) -> None:
    controller, _ = outage(tmp_path, mosquitto, own_alertmanager, cluster_name)
    try:
        assert own_alertmanager.process is None  # still down
        own_alertmanager.start()
        wait_for(lambda: len(own_alertmanager.alerts(f'cluster="{cluster_name}"')) >= 3, 15,
                 "the three rule alerts after Alertmanager is back")
        fired = own_alertmanager.alerts(f'cluster="{cluster_name}"')
        assert sorted(a["labels"]["node"] for a in fired) == ["nid001", "nid002", "nid003"]
        assert all(a["annotations"]["summary"].endswith("failed host_env") for a in fired)
    finally:
        controller.stop()


def test_a_node_failed_alert_raised_during_a_long_outage_arrives_through_the_resend_loop(
    tmp_path: Path, mosquitto: Mosquitto, own_alertmanager: Alertmanager, cluster_name: str
) -> None:
    controller, config = outage(tmp_path, mosquitto, own_alertmanager, cluster_name,
                                repeat="[repeat]\ncount = 1\n")
    try:
        for node in ("nid001", "nid002", "nid003"):  # raised (and given up on) while Alertmanager was down
            trail = vetd_json("node", node, "--config", str(config), "--json")["audit"]
            assert [a["outcome"] for a in trail if a["action"] == "mark_failed"] == ["failed"]
        own_alertmanager.start()
        wait_for(lambda: len(own_alertmanager.alerts(f'cluster="{cluster_name}"', 'alertname="host-failed"')) >= 3,
                 15, "the rule alerts after Alertmanager is back")
        failed = wait_for(lambda: own_alertmanager.alerts(f'cluster="{cluster_name}"',
                                                          'alertname="vetd-node-failed"'), 10,
                          "vetd-node-failed after Alertmanager is back")
        assert sorted(a["labels"]["node"] for a in failed) == ["nid001", "nid002", "nid003"]
    finally:
        controller.stop()
