"""Signed commands: the agent runs only what the controller signed, once, in time."""

from __future__ import annotations

import time
from pathlib import Path

import msgspec

from tests.support.procs import VetdProcess, Watcher, publish_raw, run_vetd, vetd_env
from tests.support.services import Mosquitto
from tests.support.wait import wait_for
from vetd.core import protocol
from vetd.core.protocol import Command, Reply, sign_command, verify_command

KEY = b"0123456789abcdef0123456789abcdef-cluster-key"


def command(**fields: object) -> Command:
    base: dict[str, object] = {"cluster": "alps", "node": "nid001", "session": "ctl", "seq": 0, "ts": time.time(),
                               "id": "c1", "action": "ping", "expires": time.time() + 60}
    return Command(**{**base, **fields})  # type: ignore[arg-type]


def test_signatures_cover_target_action_args_and_expiry() -> None:
    now = time.time()
    signed = sign_command(command(args={"gpu": "3"}), KEY)
    assert verify_command(signed, KEY, now) is None
    assert verify_command(command(), KEY, now) == "unsigned"
    assert verify_command(signed, b"another key of at least thirty-two bytes", now) == "bad signature"
    for tampered in ({"args": {"gpu": "4"}}, {"node": "nid002"}, {"action": "gpu_reset"}, {"expires": now + 999}):
        assert verify_command(msgspec.structs.replace(signed, **tampered), KEY, now) == "bad signature"
    assert verify_command(sign_command(command(expires=now - 1), KEY), KEY, now) == "expired"
    # a body (a campaign's step) is signed too; a command without one is signed as before bodies existed
    with_body = sign_command(command(action="vet", body=b"\x81\xa4kind\xa4plan"), KEY)
    assert verify_command(with_body, KEY, now) is None
    assert verify_command(msgspec.structs.replace(with_body, body=b"\x81\xa4kind\xa2go"), KEY, now) == "bad signature"
    assert verify_command(msgspec.structs.replace(with_body, body=b""), KEY, now) == "bad signature"
    plain = command(args={"gpu": "3"})
    assert protocol.command_digest_input(plain) == msgspec.msgpack.encode(
        [plain.cluster, plain.node, plain.id, plain.action, sorted(plain.args.items()), plain.expires])
    assert verify_command(sign_command(command(expires=now + 7 * 86400), KEY), KEY, now) == "valid for too long"


def test_the_agent_refuses_unsigned_forged_expired_and_replayed_commands(
    tmp_path: Path, mosquitto: Mosquitto, cluster_name: str
) -> None:
    key_file = tmp_path / "cluster.key"
    key_file.write_bytes(KEY + b"\n")
    key_file.chmod(0o600)
    config = tmp_path / "agent.toml"
    config.write_text(f'[agent]\nshutdown_grace = "1s"\ninterval = "1h"\n[commands]\nkey_file = "{key_file}"\n')
    env = vetd_env(VETD_BROKER=mosquitto.url, VETD_CLUSTER=cluster_name, VETD_NODE="nid001",
                   VETD_STATE_DIR=str(tmp_path / "state"))
    watcher = Watcher(mosquitto.port, f"vetd/v1/{cluster_name}/node/nid001/reply")
    agent = VetdProcess(["agent", "--config", str(config)], tmp_path / "agent.log", env).start()
    topic = protocol.topic(cluster_name, "nid001", "cmd")

    def send(cmd: Command) -> str:
        publish_raw(mosquitto.port, topic, protocol.encode(cmd))
        reply = wait_for(lambda: [m for m in watcher.select(lambda m: isinstance(m, Reply)) if m.id == cmd.id
                                  and m not in seen], 10, f"a reply to {cmd.id}")[-1]
        seen.append(reply)
        return f"{reply.ok} {reply.message}"

    seen: list[Reply] = []
    try:
        wait_for(lambda: "broker_connected" in agent.output, 15, "agent connected")
        c = command(cluster=cluster_name)
        assert send(msgspec.structs.replace(c, id="u1")) == "False refused: unsigned"
        good = sign_command(msgspec.structs.replace(c, id="g1"), KEY)
        assert send(good) == "True pong"
        forged = msgspec.structs.replace(sign_command(msgspec.structs.replace(c, id="f1"), KEY), action="gpu_reset")
        assert send(forged) == "False refused: bad signature"
        late = sign_command(msgspec.structs.replace(c, id="e1", expires=time.time() - 5), KEY)
        assert send(late) == "False refused: expired"
        assert agent.stop() == 0
        agent = VetdProcess(["agent", "--config", str(config)], tmp_path / "agent2.log", env).start()
        wait_for(lambda: "broker_connected" in agent.output, 15, "agent back")
        assert send(good) == "False refused: replayed (this command id was already received)"
        assert agent.output.count('"command_refused"') == 1
    finally:
        agent.stop()
        watcher.close()


MASTER = b"f" * 64


def test_each_node_has_its_own_key_derived_from_the_master() -> None:
    from vetd.core.protocol import node_key

    a, b = node_key(MASTER, "alps", "nid001"), node_key(MASTER, "alps", "nid002")
    assert a != b and node_key(MASTER, "todi", "nid001") != a and len(a) == 64
    assert node_key(MASTER, "alps", "nid001") == a  # the controller and `vetd keys derive` agree
    # node B's key signs nothing A accepts: before, every agent held the one cluster key
    for_a = sign_command(command(node="nid001"), b)
    assert verify_command(for_a, a, time.time()) == "bad signature"
    assert verify_command(sign_command(command(node="nid001"), a), a, time.time()) is None


def test_vetd_keys_derive_writes_a_private_key_file(tmp_path: Path) -> None:
    from vetd.core.protocol import node_key

    master = tmp_path / "master.key"
    master.write_bytes(MASTER + b"\n")
    master.chmod(0o600)
    out = tmp_path / "nid001.key"
    done = run_vetd("keys", "derive", "--master", str(master), "--cluster", "alps", "--node", "nid001",
                    "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert out.read_bytes().strip() == node_key(MASTER, "alps", "nid001") and out.stat().st_mode & 0o777 == 0o600
    bad = run_vetd("keys", "derive", "--master", str(master), "--cluster", "alps", "--node=-o")
    assert bad.returncode == 2 and "not a node or cluster name" in bad.stderr


def test_signing_is_required_by_default(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('[agent]\ninterval = "1h"\n')
    env = vetd_env(VETD_STATE_DIR=str(tmp_path / "state"))
    del env["VETD_ALLOW_UNSIGNED_COMMANDS"]
    done = run_vetd("agent", "--config", str(config), env=env, timeout=30)  # before: ran, commands unsigned
    assert done.returncode == 2 and "commands.key_file: no command key" in done.stderr
    assert "vetd keys derive" in done.stderr and "allow_unsigned" in done.stderr
    controller = tmp_path / "controller.toml"
    controller.write_text('[store]\npath = "c.db"\n')
    done = run_vetd("controller", "--config", str(controller), env=env, timeout=30)
    assert done.returncode == 2 and "command_key_file: no master key" in done.stderr
