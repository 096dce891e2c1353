"""Run vetd itself as real processes (agent, controller) and watch the wire."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import paho.mqtt.client as paho

from vetd.core import protocol
from vetd.core.protocol import Message

REPO = Path(__file__).resolve().parents[2]
#: Agents' spools in tests: one folder per test run, never /var/lib/vetd.
STATE_DIR = tempfile.mkdtemp(prefix="vetd-test-state-")
TEST_PLUGINS = REPO / "tests" / "support" / "plugins"


def vetd_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "vetd.core.cli", *args]


def vetd_env(**extra: str) -> dict[str, str]:
    # Commands unsigned unless a test gives keys (signing is required by default).
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "VETD_LOG_LEVEL": "debug", "VETD_STATE_DIR": STATE_DIR,
           "VETD_ALLOW_UNSIGNED_COMMANDS": "1",
           # each agent its own control socket, never the machine's /run/vetd/agent.sock
           "VETD_CONTROL_SOCKET": f"{STATE_DIR}/ctl-{uuid.uuid4().hex[:8]}.sock"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TEST_PLUGINS), env.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


def run_vetd(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(vetd_argv(*args), env=env or vetd_env(), capture_output=True, text=True, check=False,
                          timeout=timeout)


class VetdProcess:
    """``vetd agent`` or ``vetd controller`` running in the background, logging to a file."""

    def __init__(self, args: Sequence[str], log: Path, env: dict[str, str], nofile: int = 0,
                 prefix: Sequence[str] = ()) -> None:
        self.args, self.log_path, self.env = list(args), log, env
        #: The process's ``ulimit -n`` when set (through the shell: ``preexec_fn`` is unsafe with threads).
        self.nofile = nofile
        #: Runs vetd through this (``ip netns exec NAME``: a node in its network namespace).
        self.prefix = list(prefix)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> VetdProcess:
        log = self.log_path.open("ab")
        argv = [*self.prefix, *vetd_argv(*self.args)]
        if self.nofile:
            argv = ["/bin/sh", "-c", f'ulimit -n {self.nofile} && exec "$@"', "sh", *argv]
        self.process = subprocess.Popen(argv, stdout=log, stderr=log, env=self.env)
        return self

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, timeout: float = 15) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(f"{self.args[0]} did not stop within {timeout}s on SIGTERM") from None
        return int(self.process.returncode)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Watcher:
    """Subscribes (with paho) and keeps every decoded vetd message it sees."""

    def __init__(self, port: int, topic: str, session: str | None = None) -> None:
        """``session``: a client id whose session the broker keeps (clean_session off), so what is
        published while the watcher is away, or while the broker restarts, still reaches it."""
        self.messages: list[tuple[str, Message]] = []
        self.undecodable: list[str] = []
        self._lock = threading.Lock()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2,
                                  client_id=session or f"watch-{uuid.uuid4().hex[:8]}",
                                  clean_session=session is None)
        self.client.reconnect_delay_set(0.1, 1)  # back soon after a broker restart
        self.client.on_message = self._on_message
        self._subscribed = threading.Event()
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(topic, qos=1)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise AssertionError("watcher could not subscribe")

    def _on_message(self, client: object, userdata: object, msg: paho.MQTTMessage) -> None:
        try:
            decoded = protocol.decode_from(msg.topic, msg.payload)
        except protocol.ProtocolError:
            with self._lock:
                self.undecodable.append(msg.topic)
            return
        with self._lock:
            self.messages.append((msg.topic, decoded))

    def select(self, predicate: Callable[[Message], bool] = lambda _: True) -> list[Message]:
        with self._lock:
            return [m for _, m in self.messages if predicate(m)]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def publish_raw(port: int, topic: str, payload: bytes, retain: bool = False) -> None:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}")
    client.connect("127.0.0.1", port)
    client.loop_start()
    info = client.publish(topic, payload, qos=1, retain=retain)
    info.wait_for_publish(10)
    client.loop_stop()
    client.disconnect()
