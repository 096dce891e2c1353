"""Agent → real Mosquitto → controller → real slurmctld, and what operators see."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.support.procs import VetdProcess, publish_raw, run_vetd, vetd_env
from tests.support.services import Mosquitto, Slurm
from tests.support.wait import wait_for
from tests.test_hostile_input import deep_result

RULES = Path(__file__).resolve().parents[2] / "packaging" / "rules" / "default.yaml"


class AlertReceiver:
    """A real HTTP server standing where Alertmanager would."""

    def __init__(self) -> None:
        self.alerts: list[dict[str, Any]] = []
        received = self.alerts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.extend(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/api/v2/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def receiver() -> Iterator[AlertReceiver]:
    server = AlertReceiver()
    yield server
    server.close()


def controller_config(tmp_path: Path, cluster: str, backend: str, alert_url: str = "") -> Path:
    path = tmp_path / "controller.toml"
    path.write_text(
        f'cluster = "{cluster}"\nclient_id = "vetd-controller-{cluster}"\nrules = ["{RULES}"]\n'
        f'[store]\npath = "state/controller.db"\n[scheduler]\nbackend = "{backend}"\n'
        f'[alerts]\nurls = [{json.dumps(alert_url) if alert_url else ""}]\n'
    )
    return path


def start_controller(tmp_path: Path, config: Path, broker: Mosquitto, env: dict[str, str]) -> VetdProcess:
    proc = VetdProcess(["controller", "--config", str(config)], tmp_path / "controller.log",
                       vetd_env(VETD_BROKER=broker.url, **env)).start()
    wait_for(lambda: "broker_connected" in proc.output, 20, "controller connected")
    return proc


def start_agent(tmp_path: Path, broker: Mosquitto, cluster: str, node: str, config: str) -> VetdProcess:
    path = tmp_path / f"{node}.toml"
    path.write_text(config)
    return VetdProcess(["agent", "--config", str(path)], tmp_path / f"{node}.log",
                       vetd_env(VETD_BROKER=broker.url, VETD_CLUSTER=cluster, VETD_NODE=node)).start()


def vetd_json(*args: str, env: dict[str, str] | None = None) -> Any:
    done = run_vetd(*args, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_failing_host_check_drains_the_node_in_slurm(
    tmp_path: Path, mosquitto: Mosquitto, slurm: Slurm, cluster_name: str, receiver: AlertReceiver
) -> None:
    config = controller_config(tmp_path, cluster_name, "slurm", receiver.url)
    controller = start_controller(tmp_path, config, mosquitto, {"SLURM_CONF": str(slurm.conf)})
    bad = start_agent(tmp_path, mosquitto, cluster_name, "nid002",
                      '[agent]\ninterval = "500ms"\n[plugins.host]\nrequired_paths = ["/lustre/scratch"]\n'
                      "load_warn_per_core = 0.0\n")
    good = start_agent(tmp_path, mosquitto, cluster_name, "nid004",
                       '[agent]\ninterval = "500ms"\n[plugins.host]\nload_warn_per_core = 0.0\n')
    try:
        wait_for(lambda: "drain" in slurm.states().get("nid002", ""), 30, "nid002 drained in Slurm")
        reason = slurm.show("nid002")["Reason"]
        assert reason.startswith("vetd: check-failed: host_paths missing: /lustre/scratch")
        sinfo = slurm.run("sinfo", "-R", "-h", "-o", "%E|%N")
        assert "vetd: check-failed: host_paths" in sinfo and "nid002" in sinfo
        assert slurm.states()["nid004"] == "idle"

        env = vetd_env()
        wait_for(lambda: run_vetd("nodes", "--config", str(config), "--json").stdout.count('"node"') == 2,
                 15, "both nodes known")
        nodes = {n["node"]: n for n in vetd_json("nodes", "--config", str(config), "--json", env=env)}
        assert nodes["nid002"]["state"] == "excluded" and nodes["nid002"]["online"] is True
        assert nodes["nid002"]["failing"] == ["host_paths"]
        assert nodes["nid002"]["reason"].startswith("vetd: check-failed")
        assert nodes["nid004"]["state"] == "healthy" and nodes["nid004"]["failing"] == []

        excluded = run_vetd("excluded", "--config", str(config))
        assert excluded.stdout.strip() == "nid002"
        table = run_vetd("nodes", "--config", str(config)).stdout.splitlines()
        assert table[0].split()[:3] == ["NODE", "STATE", "ONLINE"]
        assert any(line.startswith("nid002") and "excluded" in line for line in table)

        drains = wait_for(lambda: [a for a in vetd_json("node", "nid002", "--config", str(config), "--json")["audit"]
                                   if a["action"] == "drain"], 10, "the drain audited")
        assert len(drains) == 1 and drains[0]["rule"] == "check-failed" and drains[0]["evidence"]
        wait_for(lambda: any(a["action"] == "drain" and a["outcome"] == "done" for a in
                             vetd_json("node", "nid002", "--config", str(config), "--json")["audit"]),
                 15, "drain outcome audited")

        alert = wait_for(lambda: [a for a in receiver.alerts if a["labels"]["alertname"] == "check-failed"],
                         15, "alert delivered")[0]
        assert alert["labels"] | {"node": "nid002", "severity": "critical", "cluster": cluster_name} == alert["labels"]
        assert alert["startsAt"].endswith("Z") and "endsAt" not in alert
    finally:
        bad.stop(), good.stop(), controller.stop()
        slurm.resume("nid002")
    # the drain happened once, although the check kept failing every 500 ms
    assert controller.output.count('"event": "drain_done"') == 1


def test_a_node_an_operator_drained_is_left_alone(
    tmp_path: Path, mosquitto: Mosquitto, slurm: Slurm, cluster_name: str
) -> None:
    slurm.drain("nid003", "ops: replacing DIMM")
    config = controller_config(tmp_path, cluster_name, "slurm")
    controller = start_controller(tmp_path, config, mosquitto, {"SLURM_CONF": str(slurm.conf)})
    agent = start_agent(tmp_path, mosquitto, cluster_name, "nid003",
                        '[agent]\ninterval = "500ms"\n[plugins.host]\nrequired_paths = ["/nope"]\n')
    try:
        wait_for(lambda: '"event": "drain_skipped"' in controller.output, 30, "drain decision carried out")
        assert slurm.show("nid003")["Reason"].startswith("ops: replacing DIMM")
        detail = vetd_json("node", "nid003", "--config", str(config), "--json")
        drain = next(a for a in detail["audit"] if a["action"] == "drain")
        assert drain["outcome"] == "skipped" and "ops: replacing DIMM" in drain["detail"]
    finally:
        agent.stop(), controller.stop()
        slurm.resume("nid003")


def test_malformed_payloads_are_counted_and_the_controller_keeps_working(
    tmp_path: Path, mosquitto: Mosquitto, cluster_name: str
) -> None:
    config = controller_config(tmp_path, cluster_name, "none")
    controller = start_controller(tmp_path, config, mosquitto, {})
    base = f"vetd/v1/{cluster_name}/node"
    junk = [
        (f"{base}/nid001/result", os.urandom(512)),
        (f"{base}/nid001/result", b"\x85\xa4kind\xa6result\xa5check\x07\xa6status\xa4pass\xa4node\x01"),
        (f"{base}/nid001/event", b"\xdb" + (200_000).to_bytes(4, "big") + b"A" * 200_000),
        (f"{base}/nid001/state", b""),
        (f"{base}/nid001/bogus", b"\x80"),
        (f"{base}/nid001/result", deep_result(100_000, cluster_name)),
    ]
    for topic, payload in junk:
        publish_raw(mosquitto.port, topic, payload)
    agent = start_agent(tmp_path, mosquitto, cluster_name, "nid001",
                        '[agent]\ninterval = "500ms"\n[plugins.host]\nrequired_paths = ["/nope"]\n')
    try:
        wait_for(lambda: run_vetd("excluded", "--config", str(config)).stdout.strip() == "nid001", 30,
                 "the good node processed after the junk")
        assert controller.process is not None and controller.process.poll() is None
        assert controller.output.count('"event": "message_malformed"') == len(junk)
    finally:
        agent.stop()
        assert controller.stop() == 0
    from vetd.controller.store import Store

    store = Store(tmp_path / "state" / "controller.db", readonly=True)
    assert store.counters()["malformed"] == len(junk)
    store.close()


def test_a_fatal_xid_in_a_scenario_drains_the_node_and_a_warning_only_alerts(
    tmp_path: Path, mosquitto: Mosquitto, slurm: Slurm, cluster_name: str, receiver: AlertReceiver
) -> None:
    config = controller_config(tmp_path, cluster_name, "slurm", receiver.url)
    controller = start_controller(tmp_path, config, mosquitto, {"SLURM_CONF": str(slurm.conf)})
    scenario = tmp_path / "xid.yaml"
    scenario.write_text("gpus: 4\ntimeline:\n"
                        "  - {at: 1s, gpu: 1, xid: 94, message: Contained ECC error}\n"
                        "  - {at: 2s, gpu: 3, xid: 79, message: GPU has fallen off the bus.}\n")
    started = time.time()
    agent = start_agent(tmp_path, mosquitto, cluster_name, "nid004",
                        f'[agent]\ninterval = "1h"\n[plugins.gpu_health]\nsource = "scenario"\n'
                        f'scenario = "{scenario}"\n[plugins.host]\nload_warn_per_core = 0.0\n')
    try:
        wait_for(lambda: "drain" in slurm.states().get("nid004", ""), 30, "nid004 drained on XID 79")
        reason = slurm.show("nid004")["Reason"]
        assert reason.startswith("vetd: critical-event: xid[gpu3] Xid 79 on gpu3")
        alerts = wait_for(lambda: {a["labels"]["alertname"] for a in receiver.alerts} >= {"warning-event",
                                                                                          "critical-event"} and
                          receiver.alerts, 15, "both alerts")
        warning = next(a for a in alerts if a["labels"]["alertname"] == "warning-event")
        assert warning["labels"]["entity"] == "gpu1" and warning["labels"]["severity"] == "warning"
        events = [h for h in vetd_json("node", "nid004", "--config", str(config), "--json")["history"]
                  if h["kind"] == "event"]
        by_code = {e["codes"][0]: e for e in events}
        assert sorted(by_code) == ["xid_79", "xid_94"]
        # ts is the agent's clock when the XID happened, received_at the controller's when it
        # stored it (one host, one clock): each event happened after the agent started, 1 s
        # apart as the scenario has them, and reached the store a little later, not at once
        # and not long after (latency itself: bench/drain_latency.py)
        first, second = by_code["xid_94"], by_code["xid_79"]
        assert started < first["ts"] < second["ts"] < time.time()
        assert 0.5 < second["ts"] - first["ts"] < 2.5
        assert all(0 < e["received_at"] - e["ts"] < 10 for e in events), events
    finally:
        agent.stop(), controller.stop()
        slurm.resume("nid004")


def test_operator_drain_and_resume_through_the_controller(
    tmp_path: Path, mosquitto: Mosquitto, slurm: Slurm, cluster_name: str
) -> None:
    config = controller_config(tmp_path, cluster_name, "slurm")
    controller = start_controller(tmp_path, config, mosquitto, {"SLURM_CONF": str(slurm.conf)})
    slurm.drain("nid001", "ops: reseating GPU 3")
    try:
        done = run_vetd("drain", "nid[003-004]", "--reason", "fan noise; check \"bay 7\"\nnow",
                        "--config", str(config))
        assert done.returncode == 0, done.stderr
        wait_for(lambda: all("drain" in slurm.states()[n] for n in ("nid003", "nid004")), 20, "both drained")
        reason = slurm.show("nid003")["Reason"]
        assert reason.startswith("vetd: operator ") and 'fan noise; check "bay 7" now' in reason
        assert run_vetd("excluded", "--config", str(config)).stdout.strip() == "nid[003-004]"

        done = run_vetd("resume", "nid[003-004]", "--config", str(config))
        assert done.returncode == 0, done.stderr
        wait_for(lambda: all(slurm.states()[n] == "idle" for n in ("nid003", "nid004")), 20, "both resumed")
        assert run_vetd("excluded", "--config", str(config)).stdout.strip() == ""

        # a drain that is not vetd's is never resumed by vetd
        done = run_vetd("resume", "nid001", "--config", str(config))
        assert done.returncode == 0, done.stderr
        wait_for(lambda: any(a["action"] == "resume" and a["outcome"] == "refused" for a in
                             vetd_json("node", "nid001", "--config", str(config), "--json")["audit"]),
                 15, "refusal audited")
        assert slurm.show("nid001")["Reason"].startswith("ops: reseating GPU 3")
        assert "drain" in slurm.states()["nid001"]
        actors = {a["actor"] for a in vetd_json("node", "nid003", "--config", str(config), "--json")["audit"]}
        assert all(actor.startswith("operator:") for actor in actors)
    finally:
        controller.stop()
        for node in ("nid001", "nid003", "nid004"):
            slurm.resume(node)


def test_breaker_status_and_a_bad_hostlist(tmp_path: Path, cluster_name: str) -> None:
    config = controller_config(tmp_path, cluster_name, "none")
    done = run_vetd("breaker", "status", "--config", str(config))
    assert done.returncode == 0 and "closed in every partition" in done.stdout
    unknown = run_vetd("drain", "nid[001-002", "--reason", "x", "--config", str(config))
    assert unknown.returncode == 2 and "not a hostlist" in unknown.stderr


def test_rules_reload_keeps_good_rules_when_the_new_file_is_bad(
    tmp_path: Path, mosquitto: Mosquitto, cluster_name: str
) -> None:
    rules = tmp_path / "site.yaml"
    rules.write_text("rules:\n  - name: a\n    when: result.status == 'fail'\n")
    config = tmp_path / "controller.toml"
    config.write_text(f'cluster = "{cluster_name}"\nclient_id = "c-{cluster_name}"\nrules = ["{rules}"]\n'
                      '[store]\npath = "state/controller.db"\n')
    controller = start_controller(tmp_path, config, mosquitto, {})
    try:
        rules.write_text("rules:\n  - name: a\n    when: result.status ==\n")
        bad = run_vetd("rules", "reload", "--config", str(config))
        assert bad.returncode == 1
        assert f"{rules}:3: rule 'a': when: CEL error" in bad.stderr and "1 rules in force are kept" in bad.stderr
        rules.write_text("rules:\n  - name: a\n    when: result.status == 'fail'\n"
                         "  - name: b\n    when: event.severity == 'critical'\n")
        good = run_vetd("rules", "reload", "--config", str(config))
        assert good.returncode == 0 and good.stdout.strip() == "rules=2", good.stderr
    finally:
        controller.stop()


def test_the_breaker_trips_at_its_threshold_in_slurm(
    tmp_path: Path, mosquitto: Mosquitto, slurm: Slurm, cluster_name: str
) -> None:
    config = controller_config(tmp_path, cluster_name, "slurm")
    config.write_text(config.read_text() + "[breaker]\nmax_fraction = 0.25\nalways_allow = 1\n"
                      '[labels]\n"nid[001-004]" = { partition = "debug" }\n')
    controller = start_controller(tmp_path, config, mosquitto, {"SLURM_CONF": str(slurm.conf)})
    healthy = '[agent]\ninterval = "1h"\n[plugins.host]\nload_warn_per_core = 0.0\n'
    agents = [start_agent(tmp_path, mosquitto, cluster_name, node, healthy) for node in ("nid001", "nid004")]
    try:
        wait_for(lambda: len(vetd_json("nodes", "--config", str(config), "--json")) == 2, 20, "two healthy nodes")
        agents += [start_agent(tmp_path, mosquitto, cluster_name, node,
                               '[agent]\ninterval = "1h"\n[plugins.host]\nrequired_paths = ["/nope"]\n')
                   for node in ("nid002", "nid003")]
        wait_for(lambda: '"event": "breaker_open"' in controller.output, 30, "the breaker to open")
        states = {n["node"]: n["state"] for n in vetd_json("nodes", "--config", str(config), "--json")}
        assert sorted(states.values()) == ["excluded", "healthy", "healthy", "suspect"]
        drained = [n for n in ("nid002", "nid003") if "drain" in slurm.states()[n]]
        assert len(drained) == 1  # one of four is 25 %: a second would be too many
        status = run_vetd("breaker", "--config", str(config)).stdout
        assert status.splitlines()[1].split()[:2] == ["debug", "OPEN"], status
        assert re.search(r"would have 2 of [34] nodes excluded \(allowed 1\)", status), status
        (breaker,) = vetd_json("breaker", "--json", "--config", str(config))
        assert breaker["partition"] == "debug" and breaker["open"] and "allowed 1" in breaker["reason"]
        reset = run_vetd("breaker", "reset", "--partition", "debug", "--config", str(config))
        assert reset.returncode == 0 and "partition=debug outcome=closed" in reset.stdout
    finally:
        for agent in agents:
            agent.stop()
        controller.stop()
        for node in ("nid002", "nid003"):
            slurm.resume(node)
