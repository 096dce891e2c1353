"""Nobody in: the shipped Mosquitto config and ACL, TLS and passwords, against a real broker.

Negative checks do not sleep: after a forbidden publish the same client sends
an allowed one; a broker delivers one client's messages in order, so had the
forbidden one passed it would have arrived first.
"""

from __future__ import annotations

import contextlib
import json
import re
import ssl
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as paho

from tests.support.procs import VetdProcess, run_vetd, vetd_env
from tests.support.services import SecureMosquitto
from tests.support.wait import wait_for
from vetd.core import protocol
from vetd.core.protocol import Command, Result


class Client:
    def __init__(self, broker: SecureMosquitto, user: str, subscribe: str | None = None) -> None:
        self.received: list[str] = []
        self.granted: list[int] = []
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"{user}-{uuid.uuid4().hex[:6]}")
        self.client.username_pw_set(user, broker.passwords[user])
        self.client.tls_set(ca_certs=str(broker.ca), cert_reqs=ssl.CERT_REQUIRED)
        self.client.on_message = lambda _client, _userdata, msg: self.received.append(msg.topic)
        subscribed = threading.Event()

        def on_subscribe(_client: object, _userdata: object, _mid: int, codes: list[object], _props: object) -> None:
            self.granted += [int(getattr(code, "value", code)) for code in codes]
            subscribed.set()

        self.client.on_subscribe = on_subscribe
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        if subscribe:
            self.client.subscribe(subscribe, qos=1)
            assert subscribed.wait(10)

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def result(node: str) -> tuple[str, bytes]:
    message = Result(cluster="alps", node=node, session="s", seq=1, ts=time.time(), check="c", status="fail")
    return protocol.topic_for(message), protocol.encode(message)


def command(node: str) -> tuple[str, bytes]:
    message = Command(cluster="alps", node=node, session="s", seq=0, ts=time.time(), id=uuid.uuid4().hex,
                      action="ping")
    return protocol.topic_for(message), protocol.encode(message)


def test_a_node_cannot_speak_for_another_send_commands_or_read_anothers(secure_mosquitto: SecureMosquitto) -> None:
    controller = Client(secure_mosquitto, "vetd-controller", "vetd/v1/#")
    node_a = Client(secure_mosquitto, "nid001", "vetd/v1/alps/node/+/cmd")  # asks for every node's commands
    node_b = Client(secure_mosquitto, "nid002", "vetd/v1/alps/node/nid002/cmd")
    try:
        node_a.publish(*result("nid002"))  # pretending to be nid002
        node_a.publish(*result("nid001"))
        wait_for(lambda: "vetd/v1/alps/node/nid001/result" in controller.received, 10, "A's own result")
        assert "vetd/v1/alps/node/nid002/result" not in controller.received

        node_a.publish(*command("nid002"))  # a node sending a command
        controller.publish(*command("nid002"))
        wait_for(lambda: node_b.received, 10, "the controller's command at B")
        assert node_b.received == ["vetd/v1/alps/node/nid002/cmd"]  # one: the controller's

        controller.publish(*command("nid001"))  # sent after the one to nid002
        wait_for(lambda: node_a.received, 10, "A's own command")
        assert node_a.received == ["vetd/v1/alps/node/nid001/cmd"]  # B's command never reached A
    finally:
        for client in (controller, node_a, node_b):
            client.close()


def spooled(path: Path) -> int:
    """Rows in an agent's spool file (sent or not, not yet acknowledged by the controller)."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(path, timeout=5)) as db:
        return int(db.execute("SELECT count(*) FROM spool").fetchone()[0])


def refusals(proc: VetdProcess) -> list[str]:
    """The ``error`` of each ``broker_unavailable`` event the process logged (JSON lines)."""
    events = [json.loads(line) for line in proc.output.splitlines() if line.startswith("{")]
    return [e["error"] for e in events if e.get("event") == "broker_unavailable"]


def test_vetd_over_tls_with_passwords_and_refusals(tmp_path: Path, secure_mosquitto: SecureMosquitto) -> None:
    d = secure_mosquitto.workdir
    config = tmp_path / "controller.toml"
    config.write_text(f'cluster = "alps"\nclient_id = "vetd-controller-tls"\n[store]\npath = "state/c.db"\n'
                      f'[auth]\nusername = "vetd-controller"\npassword_file = "{d / "vetd-controller.password"}"\n'
                      f'ca_file = "{secure_mosquitto.ca}"\n')
    controller = VetdProcess(["controller", "--config", str(config)], tmp_path / "controller.log",
                             vetd_env(VETD_BROKER=secure_mosquitto.url)).start()

    def agent(name: str, password: str, ca: Path) -> VetdProcess:
        (tmp_path / f"{name}.pw").write_text(password)
        (tmp_path / f"{name}.pw").chmod(0o600)
        conf = tmp_path / f"{name}.toml"
        conf.write_text(f'[agent]\ninterval = "1h"\n[agent.auth]\nusername = "nid001"\n'
                        f'password_file = "{tmp_path / f"{name}.pw"}"\nca_file = "{ca}"\n')
        return VetdProcess(["agent", "--config", str(conf)], tmp_path / f"{name}.log",
                           vetd_env(VETD_BROKER=secure_mosquitto.url, VETD_CLUSTER="alps", VETD_NODE="nid001",
                                    VETD_STATE_DIR=str(tmp_path / name))).start()

    good = agent("good", secure_mosquitto.passwords["nid001"], secure_mosquitto.ca)
    wrong_password = agent("wrongpw", "guess", secure_mosquitto.ca)
    other_ca = tmp_path / "other-ca.crt"
    other_ca.write_bytes((d / "broker.crt").read_bytes())  # not the CA that signed the broker
    wrong_ca = agent("wrongca", secure_mosquitto.passwords["nid001"], other_ca)
    try:
        wait_for(lambda: '"broker_connected"' in controller.output, 20, "controller over TLS")
        wait_for(lambda: "nid001" in run_vetd("nodes", "--config", str(config)).stdout, 20,
                 "the agent's results at the controller over TLS")
        # the controller's acks get through the shipped ACL: the agent's spool empties
        wait_for(lambda: spooled(tmp_path / "good" / "spool-alps-nid001.db") == 0, 20, "the agent's spool acked")
        # Each connection attempt is refused, and for the reason meant: the broker's CONNACK
        # "not authorised" (MQTT 5 reason 135, 3.1.1 return code 5) for the password, the TLS
        # handshake for the CA. Not a word found anywhere in the log ("authori" is in "authority").
        refused = wait_for(lambda: refusals(wrong_password), 20, "wrong password refused")
        assert all(re.fullmatch(r"\[code:(135|5)\] Not authori[sz]ed", error) for error in refused), refused
        refused = wait_for(lambda: refusals(wrong_ca), 20, "unknown CA refused")
        assert all("CERTIFICATE_VERIFY_FAILED" in error for error in refused), refused
        assert '"broker_connected"' not in wrong_password.output + wrong_ca.output
    finally:
        for proc in (good, wrong_password, wrong_ca, controller):
            proc.stop()


def test_a_node_cannot_publish_under_another_cluster(secure_mosquitto: SecureMosquitto) -> None:
    """The shipped ACL pins the cluster as well as the node (before: `vetd/v1/+/node/%u/...`)."""
    observer = Client(secure_mosquitto, "test-observer", "vetd/v1/#")
    node = Client(secure_mosquitto, "nid001")
    try:
        for cluster in ("todi", "alps-evil", "x1"):
            message = Result(cluster=cluster, node="nid001", session="s", seq=1, ts=time.time(), check="c",
                             status="fail")
            node.publish(protocol.topic_for(message), protocol.encode(message))
        node.publish(*result("nid001"))  # its own cluster, sent last
        wait_for(lambda: "vetd/v1/alps/node/nid001/result" in observer.received, 10, "the node's own result")
        assert observer.received == ["vetd/v1/alps/node/nid001/result"]
    finally:
        observer.close()
        node.close()


def test_credentials_in_the_broker_url_are_used_and_not_logged(tmp_path: Path,
                                                               secure_mosquitto: SecureMosquitto) -> None:
    password = secure_mosquitto.passwords["nid001"]
    url = f"mqtts://nid001:{password}@127.0.0.1:{secure_mosquitto.port}"
    conf = tmp_path / "agent.toml"
    conf.write_text(f'[agent]\ninterval = "1h"\n[agent.auth]\nca_file = "{secure_mosquitto.ca}"\n')
    agent = VetdProcess(["agent", "--config", str(conf)], tmp_path / "agent.log",
                        vetd_env(VETD_BROKER=url, VETD_CLUSTER="alps", VETD_NODE="nid001",
                                 VETD_STATE_DIR=str(tmp_path / "state"))).start()
    try:  # before: the credentials were dropped (not authorised) and the URL logged as written
        wait_for(lambda: '"broker_connected"' in agent.output, 20, "the agent connected with the URL's credentials")
        assert password not in agent.output and "nid001:***@127.0.0.1" in agent.output
    finally:
        agent.stop()


def ack(node: str) -> tuple[str, bytes]:
    from vetd.core.protocol import Ack, AckRange

    message = Ack(cluster="alps", node=node, session="ctl", seq=0, ts=time.time(), ranges=[AckRange("s", 1, 1)])
    return protocol.ack_topic("alps", node), protocol.encode(message)


def test_acks_come_only_from_the_controller_and_a_node_reads_only_its_own(
        secure_mosquitto: SecureMosquitto) -> None:
    node_a = Client(secure_mosquitto, "nid001", "vetd/v1/alps/ack/+")  # asks for every node's acks
    node_b = Client(secure_mosquitto, "nid002", "vetd/v1/alps/ack/nid002")
    controller = Client(secure_mosquitto, "vetd-controller")
    try:
        node_a.publish(*ack("nid002"))  # a node forging the controller's ack to another node
        controller.publish(*ack("nid002"))
        wait_for(lambda: node_b.received, 10, "the controller's ack at B")
        assert node_b.received == ["vetd/v1/alps/ack/nid002"]  # one: the controller's
        controller.publish(*ack("nid001"))  # after the one to nid002
        wait_for(lambda: node_a.received, 10, "A's own ack")
        assert node_a.received == ["vetd/v1/alps/ack/nid001"]  # B's ack never reached A
    finally:
        for client in (controller, node_a, node_b):
            client.close()


def service_notice(node: str) -> tuple[str, bytes]:
    from vetd.core.protocol import ServiceNotice

    message = ServiceNotice(cluster="alps", node=node, session="ctl", seq=0, ts=time.time(), service="drained")
    return protocol.service_topic("alps", node), protocol.encode(message)


def test_service_notices_come_only_from_the_controller_and_a_node_reads_only_its_own(
        secure_mosquitto: SecureMosquitto) -> None:
    node_a = Client(secure_mosquitto, "nid001", "vetd/v1/alps/service/+")  # asks for every node's notice
    node_b = Client(secure_mosquitto, "nid002", "vetd/v1/alps/service/nid002")
    controller = Client(secure_mosquitto, "vetd-controller")
    try:
        node_a.publish(*service_notice("nid002"))  # a node putting another out of service
        controller.publish(*service_notice("nid002"))
        wait_for(lambda: node_b.received, 10, "the controller's notice at B")
        assert node_b.received == ["vetd/v1/alps/service/nid002"]  # one: the controller's
        controller.publish(*service_notice("nid001"))
        wait_for(lambda: node_a.received, 10, "A's own notice")
        assert node_a.received == ["vetd/v1/alps/service/nid001"]  # B's never reached A
    finally:
        for client in (controller, node_a, node_b):
            client.close()
