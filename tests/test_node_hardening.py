"""Issue 12, the node side: file modes, secrets' modes, broker URL credentials, terminal escapes."""

from __future__ import annotations

import io
import logging
import os
import stat
import time
from pathlib import Path

import pytest
import structlog

from vetd.controller.cli import show_node
from vetd.controller.config import ControllerConfig, StoreSection
from vetd.controller.service import Controller
from vetd.controller.store import Store
from vetd.core import logs, protocol
from vetd.core.configfile import ConfigError, read_key
from vetd.core.mqtt import BrokerAuth, client_options, parse_broker
from vetd.core.output import table
from vetd.core.protocol import Result, State

HOSTILE = "ok\x1b]0;owned\x07\x1b[2J\x1b[1A\rfake line\x9b31m\x07 end"


def test_the_controller_database_is_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        store = Store(tmp_path / "state" / "controller.db")
        store.close()
    finally:
        os.umask(old)
    for name in ("controller.db", "controller.db-wal"):  # before: 0644
        path = tmp_path / "state" / name
        if path.exists():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, name


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_key_file_others_can_read_is_refused(tmp_path: Path, mode: int) -> None:
    key = tmp_path / "command.key"
    key.write_text("k" * 64 + "\n")
    key.chmod(mode)
    with pytest.raises(ConfigError) as refused:  # before: read whatever its mode
        read_key(str(key), "controller.toml: command_key_file")
    message = str(refused.value)
    assert str(key) in message and f"{mode:04o}" in message and "\n" not in message
    key.chmod(0o600)
    assert read_key(str(key), "x") == b"k" * 64


def test_a_broker_password_file_others_can_read_is_refused(tmp_path: Path) -> None:
    password = tmp_path / "nid001.password"
    password.write_text("secret\n")
    password.chmod(0o644)
    with pytest.raises(ConfigError, match="0644"):
        client_options(parse_broker("mqtt://b"), BrokerAuth(username="nid001", password_file=str(password)),
                       "agent.toml: agent.auth")


def test_broker_url_credentials_are_used_and_never_logged(capsys: pytest.CaptureFixture[str]) -> None:
    address = parse_broker("mqtts://nid001:s%40cret@broker.example:8883")
    assert (address.host, address.port, address.tls, address.username, address.password) == (
        "broker.example", 8883, True, "nid001", "s@cret")
    options = client_options(parse_broker("mqtt://nid001:pw@b"), BrokerAuth(), "agent")
    assert (options["username"], options["password"]) == ("nid001", "pw")  # before: dropped silently
    assert "pw" not in repr(parse_broker("mqtt://nid001:pw@b"))
    with pytest.raises(ConfigError, match="one place"):
        client_options(parse_broker("mqtt://nid001:pw@b"), BrokerAuth(username="x"), "agent")
    logs.setup("info", json=True, stream=None)
    structlog.get_logger("t").warning("broker_unavailable", broker="mqtt://nid001:hunter2@b:1883")
    logging.getLogger("paho").warning("connecting to mqtts://u:hunter3@b")
    err = capsys.readouterr().err
    assert "hunter2" not in err and "hunter3" not in err and "mqtt://nid001:***@b:1883" in err


def test_clean_strips_escapes_and_control_characters() -> None:
    from vetd.core.output import clean

    assert clean(HOSTILE) == "okfake line end"
    for text in (HOSTILE, "\x1bP1;2q\x1b\\x", "a\x00b\x7fc\x85d", "\x1b[31mred\x1b[0m"):
        cleaned = clean(text)
        assert not any(ord(ch) < 0x20 or 0x7f <= ord(ch) <= 0x9f for ch in cleaned), repr(cleaned)
    assert clean("\x1b[31mred\x1b[0m") == "red"
    assert clean("line one\nline two") == "line one line two"
    out = table(("NODE", "MESSAGE"), [("nid001", HOSTILE)])
    assert "\x1b" not in out and "\r" not in out and "\x07" not in out and "\x9b" not in out


def test_vetd_node_prints_agent_text_without_escapes(tmp_path: Path) -> None:
    controller = Controller(ControllerConfig(cluster="alps", store=StoreSection(path=str(tmp_path / "c.db"))))
    base = {"cluster": "alps", "node": "nid001", "session": "s1", "ts": time.time()}
    batch = [State(**base, seq=0, online=True, started=time.time(), labels={"rack": HOSTILE[:200]}),
             Result(**base, seq=1, check="host_env", status="fail", message=HOSTILE, codes=["env_missing"])]
    controller.process([(protocol.topic_for(m), protocol.encode(m)) for m in batch])
    out = io.StringIO()
    assert show_node(controller.store, controller.config, "nid001", False, out) == 0
    text = out.getvalue()
    assert "host_env" in text and "fake line" in text  # before: the escapes reached the terminal
    assert not any(ord(ch) < 0x20 and ch != "\n" or 0x7f <= ord(ch) <= 0x9f for ch in text), repr(text)
    assert len(text.splitlines()) == len(text.split("\n")) - 1  # a message cannot add lines of its own


@pytest.mark.parametrize("nodes", ["-oSlurmctldHost=evil", "--help", "nid001,-o"])
def test_drain_refuses_a_node_name_that_scontrol_would_read_as_an_option(tmp_path: Path, nodes: str) -> None:
    from tests.support.procs import run_vetd

    config = tmp_path / "controller.toml"
    config.write_text('cluster = "alps"\n[store]\npath = "c.db"\n')
    done = run_vetd("drain", "--reason", "test", "--config", str(config), "--", nodes, timeout=60)
    assert done.returncode == 2 and "is not a node name" in done.stderr, done.stderr  # before: submitted
    store = Store(tmp_path / "c.db")
    assert store.db.execute("SELECT count(*) FROM requests").fetchone()[0] == 0
    store.close()


def test_the_shipped_agent_and_broker_configs_agree(tmp_path: Path) -> None:
    from vetd.agent.config import load_agent_config

    root = Path(__file__).resolve().parents[1]
    agent = load_agent_config(root / "packaging" / "config" / "agent.toml", environ={"VETD_NODE": "nid001"})
    conf = (root / "packaging" / "mosquitto" / "vetd.conf").read_text()
    assert agent.broker.tls and f"listener {agent.broker.port}\n" in conf  # before: mqtt:// to 1883, TLS on 8883
    acl = (root / "packaging" / "mosquitto" / "vetd.acl").read_text()
    patterns = [line for line in acl.splitlines() if line.startswith(("pattern", "topic"))]
    assert patterns and all("/CLUSTER/" in line for line in patterns)  # the cluster pinned, never `+`
    password = tmp_path / "broker.password"
    password.write_text("pw\n")
    password.chmod(0o600)
    config = tmp_path / "agent.toml"
    config.write_text(f'[agent.auth]\npassword_file = "{password}"\n')
    assert load_agent_config(config, environ={"VETD_NODE": "nid007"}).agent.auth.username == "nid007"
