"""Alerts: resolved ones resolve, firing ones are re-sent, silences hold, inhibition quiets GPUs."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tests.controller.test_end_to_end import AlertReceiver, receiver  # noqa: F401 - fixture
from tests.controller.test_http import call
from tests.support.procs import run_vetd
from tests.support.services import free_port
from tests.support.wait import async_wait_for
from vetd.controller.config import AlertsSection, ControllerConfig, HttpSection, StoreSection
from vetd.controller.http import HttpApi
from vetd.controller.service import Controller
from vetd.controller.silences import matches, parse_matcher
from vetd.core import protocol
from vetd.core.protocol import Event, Result, State

RULES = """\
rules:
  - name: gpu-hot
    when: result.check == "gpu_health" && "temp_high" in result.codes
    actions: [alert]
  - name: host-failed
    when: result.check == "host_env" && result.status == "fail"
    actions: [drain, alert]
  - name: xid
    when: event.name == "xid"
    actions: [alert]
"""


def make(tmp_path: Path, url: str, **alerts: object) -> Controller:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    return Controller(ControllerConfig(cluster="alps", rules=[str(rules)], store=StoreSection(path=str(tmp_path / "c.db")),
                                       alerts=AlertsSection(urls=[url], **alerts)))  # type: ignore[arg-type]


def feed(controller: Controller, *messages: protocol.Message) -> None:
    for message in messages:
        controller.executor.enqueue(controller.process([(protocol.topic_for(message), protocol.encode(message))],
                                                       now=message.ts))


def gpu(seq: int, ts: float, hot: bool) -> Result:
    return Result(cluster="alps", node="nid001", session="s", seq=seq, ts=ts, check="gpu_health", entity="gpu2",
                  status="warn" if hot else "pass", codes=["temp_high"] if hot else [])


def birth() -> State:
    return State(cluster="alps", node="nid001", session="s", seq=0, ts=1, online=True, started=1)


async def drain_actions(controller: Controller) -> None:
    await controller.executor.carry_out_queued()


def test_firing_alerts_are_resent_and_resolve(tmp_path: Path, receiver: AlertReceiver) -> None:  # noqa: F811
    controller = make(tmp_path, receiver.url, resend_interval=0.2)

    async def scenario() -> None:
        feed(controller, birth(), gpu(1, 10, True))
        await drain_actions(controller)
        resend = asyncio.create_task(controller.executor.resend(0.2, controller.engine.firing_alerts.values))

        async def resent() -> bool:
            await drain_actions(controller)  # the resend loop queues; carry its alerts out
            return len(receiver.alerts) >= 3

        await async_wait_for(resent, 10, "two re-sends of the firing alert")
        resend.cancel()
        feed(controller, gpu(2, 20, False))
        await drain_actions(controller)

    asyncio.run(scenario())
    hot = [a for a in receiver.alerts if a["labels"]["alertname"] == "gpu-hot"]
    assert len(hot) >= 3 and len({a["startsAt"] for a in hot}) == 1  # the same alert, kept alive
    assert "endsAt" not in hot[0] and hot[-1]["endsAt"].startswith("1970-01-01T00:00:20")
    assert controller.store.firing_alerts() == {}


def test_silences_hold_alerts_and_inhibition_quiets_gpus_of_an_excluded_node(
    tmp_path: Path, receiver: AlertReceiver  # noqa: F811
) -> None:
    controller = make(tmp_path, receiver.url)
    config = tmp_path / "controller.toml"
    config.write_text(f'cluster = "alps"\nrules = ["{tmp_path / "rules.yaml"}"]\n[store]\npath = "{tmp_path / "c.db"}"\n')
    added = run_vetd("silence", "add", "alertname=~xid.*", "node=nid001", "--for", "2h", "--comment", "GPU swap",
                     "--config", str(config))
    assert added.returncode == 0 and added.stdout.startswith("silence 1 until"), added.stderr
    assert "alertname=~xid.* node=nid001  GPU swap" in run_vetd("silence", "list", "--config", str(config)).stdout

    async def scenario() -> None:
        xid = Event(cluster="alps", node="nid001", session="s", seq=1, ts=5, name="xid", entity="gpu1",
                    codes=["xid_31"])
        fail = Result(cluster="alps", node="nid001", session="s", seq=2, ts=6, check="host_env", status="fail")
        feed(controller, birth(), xid, fail, gpu(3, 7, True))
        await drain_actions(controller)

    asyncio.run(scenario())
    names = [a["labels"]["alertname"] for a in receiver.alerts]
    assert names == ["host-failed"]  # xid silenced; gpu-hot inhibited (node excluded)
    outcomes = {(a["rule"], a["outcome"]) for a in controller.store.audit_log("alps", "nid001")
                if a["action"] == "alert"}
    assert {("xid", "silenced"), ("gpu-hot", "inhibited"), ("host-failed", "done")} <= outcomes
    assert run_vetd("silence", "expire", "1", "--config", str(config)).returncode == 0
    assert "no active silences" in run_vetd("silence", "list", "--config", str(config)).stdout
    assert json.loads(run_vetd("silence", "list", "--json", "--config", str(config)).stdout) == []


@pytest.mark.parametrize(
    ("matcher", "labels", "held"),
    [("node=nid001", {"node": "nid001"}, True), ("node!=nid001", {"node": "nid001"}, False),
     ("alertname=~xid.*", {"alertname": "xid31-twice"}, True), ("alertname=~xid", {"alertname": "xid31"}, False),
     ("severity!~crit.*", {"severity": "warning"}, True), ("team=gpu", {}, False)],
)
def test_matchers(matcher: str, labels: dict[str, str], held: bool) -> None:
    assert matches([matcher], labels) is held


def test_bad_matchers_are_rejected() -> None:
    with pytest.raises(ValueError, match="not a matcher"):
        parse_matcher("node")
    with pytest.raises(ValueError, match="bad regex"):
        parse_matcher("node=~(")
    assert json.dumps(parse_matcher("a!~b")) == '["a", "!~", "b"]'


def test_a_rule_that_errors_live_is_counted_and_alerted_by_name(
    tmp_path: Path, receiver: AlertReceiver  # noqa: F811
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - name: unguarded-hot\n    when: result.metrics.temp_c > 85.0\n"
                     "  - name: gpu-hot\n    when: '\"temp_high\" in result.codes'\n")
    controller = Controller(ControllerConfig(cluster="alps", rules=[str(rules)], alerts=AlertsSection(urls=[receiver.url]),
                                             store=StoreSection(path=str(tmp_path / "c.db"))))
    port = free_port()
    api = HttpApi(controller.store, list, "", "alps", HttpSection())

    async def scenario() -> str:
        serving = asyncio.create_task(api.serve("127.0.0.1", port), name="test.http")
        feed(controller, birth(), *(gpu(seq, 10 + seq, hot=False) for seq in range(1, 4)))  # no temp_c metric
        await drain_actions(controller)
        await async_wait_for(lambda: len(receiver.alerts) >= 1, 10, "the rule-error alert")
        await async_wait_for(lambda: asyncio.to_thread(_metrics_up, port), 10, "metrics served")
        _, text = await asyncio.to_thread(call, f"http://127.0.0.1:{port}/metrics")
        serving.cancel()
        return text

    text = asyncio.run(scenario())
    assert [(a["labels"]["alertname"], a["labels"]["rule"]) for a in receiver.alerts] == [
        ("vetd_rule_error", "unguarded-hot")]  # once for three failing messages
    assert "Key not found" in receiver.alerts[0]["annotations"]["description"]
    assert 'vetd_rule_errors_total{rule="unguarded-hot"} 3' in text
    assert 'vetd_controller_events_total{event="rule_errors"} 3' in text and "gpu-hot" not in text
    audit = [a for a in controller.store.audit_log("alps", "nid001") if a["action"] == "rule_error"]
    assert [a["rule"] for a in audit] == ["unguarded-hot"]


def _metrics_up(port: int) -> bool:
    try:
        return call(f"http://127.0.0.1:{port}/metrics")[0] == 200
    except OSError:
        return False
