"""The controller's retained service notice reaches the node's agent (real Mosquitto, controller, agent, slurmctld)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tests.controller.test_end_to_end import controller_config, start_controller, vetd_json
from tests.support.procs import VetdProcess, publish_raw, run_vetd, vetd_env
from tests.support.services import Mosquitto, Slurm
from tests.support.wait import wait_for
from vetd.agent.controlclient import ask
from vetd.core import protocol
from vetd.core.protocol import ServiceNotice

AGENT = '[agent]\nshutdown_grace = "1s"\nload_plugins = ["vetd_testplugin"]\ndisable_plugins = ["host"]\n' \
        '[plugins.testplugin]\ninterval = "300ms"\nonly = ["steady"]\n'


def start_agent(tmp_path: Path, broker: Mosquitto, cluster: str, node: str) -> tuple[VetdProcess, str]:
    sock = str(tmp_path / f"{node}.sock")
    path = tmp_path / f"{node}.toml"
    path.write_text(AGENT)
    proc = VetdProcess(["agent", "--config", str(path)], tmp_path / f"{node}.log",
                       vetd_env(VETD_BROKER=broker.url, VETD_CLUSTER=cluster, VETD_NODE=node,
                                VETD_CONTROL_SOCKET=sock)).start()
    wait_for(lambda: Path(sock).exists(), 20, "the control socket")
    return proc, sock


def service(sock: str) -> dict[str, Any]:
    answer = ask(sock, {"op": "status"}, 5)
    assert answer["ok"], answer
    return dict(answer["service"])


def test_the_agent_learns_when_the_controller_takes_its_node_out_of_service(
        tmp_path: Path, mosquitto: Mosquitto, cluster_name: str) -> None:
    config = controller_config(tmp_path, cluster_name, "none")
    controller = start_controller(tmp_path, config, mosquitto, {})
    agent, sock = start_agent(tmp_path, mosquitto, cluster_name, "nid001")
    try:
        wait_for(lambda: (service(sock).get("controller") or {}).get("service") == "in_service", 20,
                 "the controller's first notice")
        assert service(sock)["state"] == "in_service"
        assert service(sock)["controller"]["state"] == "healthy"

        done = run_vetd("drain", "nid001", "--reason", "disk swap", "--config", str(config))
        assert done.returncode == 0, done.stderr
        seen = wait_for(lambda: (s := service(sock))["state"] == "excluded" and s, 15, "the exclusion at the agent")
        assert seen["source"] == "controller" and seen["controller"]["state"] == "excluded"
        # backend none: out of service in vetd only, so "excluded", never "drained"
        assert seen["controller"]["reason"].startswith("vetd: operator ") and "disk swap" in seen["reason"]
        assert seen["reason"].startswith("excluded by the vetd controller (excluded): vetd: operator")

        # retained: an agent that starts later learns it on connecting
        assert agent.stop() == 0
        agent, sock = start_agent(tmp_path, mosquitto, cluster_name, "nid001")
        wait_for(lambda: service(sock)["state"] == "excluded", 15, "the retained notice at a new agent")

        done = run_vetd("resume", "nid001", "--config", str(config))
        assert done.returncode == 0, done.stderr
        back = wait_for(lambda: (s := service(sock))["state"] == "in_service" and s, 15, "back in service")
        assert back["controller"] | {"service": "in_service", "state": "healthy", "reason": ""} == back["controller"]
    finally:
        agent.stop()
        controller.stop()
    assert '"event": "service_notice"' in controller.output


def test_a_drain_slurm_confirmed_reads_drained(
        tmp_path: Path, mosquitto: Mosquitto, slurm: Slurm, cluster_name: str) -> None:
    config = controller_config(tmp_path, cluster_name, "slurm")
    controller = start_controller(tmp_path, config, mosquitto, {"SLURM_CONF": str(slurm.conf)})
    agent, sock = start_agent(tmp_path, mosquitto, cluster_name, "nid003")
    try:
        wait_for(lambda: service(sock).get("controller"), 20, "the controller's first notice")
        wait_for(lambda: "nid003" in run_vetd("nodes", "--config", str(config)).stdout, 15, "the node known")
        assert run_vetd("drain", "nid003", "--reason", "fan", "--config", str(config)).returncode == 0
        wait_for(lambda: service(sock)["state"] == "drained", 20, "the drain Slurm confirmed, at the agent")
        assert slurm.show("nid003")["Reason"].startswith("vetd: operator ")
        assert vetd_json("nodes", "--config", str(config), "--json")[0]["state"] == "excluded"
        assert run_vetd("resume", "nid003", "--config", str(config)).returncode == 0
        wait_for(lambda: service(sock)["state"] == "in_service", 20, "resumed")
    finally:
        agent.stop()
        controller.stop()
        slurm.resume("nid003")


def notice(cluster: str, node: str, service: str, **fields: Any) -> bytes:
    return protocol.encode(ServiceNotice(cluster=cluster, node=node, session="ctl", seq=0, ts=time.time(),
                                         service=service, **fields))  # type: ignore[arg-type]


def test_a_malformed_notice_is_counted_and_dropped(tmp_path: Path, mosquitto: Mosquitto, cluster_name: str) -> None:
    agent, sock = start_agent(tmp_path, mosquitto, cluster_name, "nid001")
    topic = protocol.service_topic(cluster_name, "nid001")
    try:
        wait_for(lambda: '"event": "broker_connected"' in agent.output, 20, "the agent connected")
        assert service(sock)["controller"] is None  # no controller: nothing heard, the agent's own view
        publish_raw(mosquitto.port, topic, notice(cluster_name, "nid001", "drained", state="excluded",
                                                  reason="vetd: check-failed: gpu_health"), retain=True)
        wait_for(lambda: service(sock)["state"] == "drained", 10, "a well-formed notice")
        publish_raw(mosquitto.port, topic, b"\x92\xc1garbage", retain=True)
        publish_raw(mosquitto.port, topic, notice(cluster_name, "nid002", "in_service"), retain=True)  # not its own
        publish_raw(mosquitto.port, topic, notice(cluster_name, "nid001", "on_fire"), retain=True)  # no such state
        wait_for(lambda: agent.output.count('"event": "service_notice_malformed"') == 3, 10, "three dropped")
        assert service(sock)["state"] == "drained"  # what the controller last said well still stands
        assert '"count": 3' in agent.output
        publish_raw(mosquitto.port, topic, b"", retain=True)  # the retained notice cleared
        wait_for(lambda: service(sock)["controller"] is None, 10, "cleared")
        assert service(sock)["state"] == "in_service"
    finally:
        assert agent.stop() == 0
