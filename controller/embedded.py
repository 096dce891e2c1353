"""``vetd up``: the whole system on one machine, nothing to install beyond vetd.

An embedded MQTT broker (amqtt) on 127.0.0.1, the controller with SQLite state
and the default rules (scheduler backend ``none``), and an agent for this
machine, in one process. The configs it writes into the state folder are the
same files a production install uses, so ``vetd nodes --config
vetd-state/controller.toml`` works from another shell.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
import sys
import time
from importlib import resources
from pathlib import Path

from vetd.agent.config import load_agent_config
from vetd.agent.daemon import Agent
from vetd.controller.config import load_controller_config
from vetd.controller.service import Controller
from vetd.controller.store import Store
from vetd.controller.views import format_nodes, node_summaries
from vetd.core.configfile import parse_duration


class UpError(Exception):
    """``vetd up`` cannot start: said in one line, exit 2."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_configs(state_dir: Path, port: int, interval: str, http_port: int) -> tuple[Path, Path]:
    state_dir.mkdir(parents=True, exist_ok=True)
    rules = state_dir / "rules.yaml"
    if not rules.exists():
        rules.write_text(resources.files("vetd.controller").joinpath("default_rules.yaml").read_text())
    controller = state_dir / "controller.toml"
    controller.write_text(
        "# Written by `vetd up`; edit rules.yaml to change what vetd does.\n"
        f'broker = "mqtt://127.0.0.1:{port}"\ncluster = "local"\n'
        "# A demo on one machine: commands unsigned (production: command_key_file).\n"
        "allow_unsigned_commands = true\n"
        'rules = ["rules.yaml"]\n\n[store]\npath = "controller.db"\n\n'
        '[scheduler]\nbackend = "none"\n\n'
        f'[http]\nlisten = "127.0.0.1:{http_port}"\n'
    )
    agent = state_dir / "agent.toml"
    agent.write_text(
        "# Written by `vetd up`.\n"
        f'[agent]\ncluster = "local"\nbroker = "mqtt://127.0.0.1:{port}"\n'
        f'interval = "{interval}"\ntelemetry_interval = "{interval}"\nstate_dir = "{state_dir}"\n'
        "\n[commands]\n# A demo on one machine: commands unsigned (production: key_file).\nallow_unsigned = true\n"
    )
    return controller, agent


async def _up(args: argparse.Namespace) -> int:
    from amqtt.broker import Broker
    from amqtt.errors import BrokerError

    state_dir = Path(args.state_dir).resolve()
    port = args.port or free_port()
    parse_duration(args.interval)
    http_port = free_port()
    controller_path, agent_path = write_configs(state_dir, port, args.interval, http_port)
    broker = Broker(
        {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
    )
    try:
        await broker.start()
    except BrokerError as exc:
        raise UpError(f"cannot start the embedded broker on 127.0.0.1:{port}: {exc.__cause__ or exc}") from None
    controller = Controller(load_controller_config(controller_path))
    agent = Agent(load_agent_config(agent_path), agent_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    out = sys.stdout
    out.write(
        "vetd up: everything on this machine\n"
        f"  broker      mqtt://127.0.0.1:{port} (embedded)\n"
        f"  controller  {controller_path}\n"
        f"  rules       {state_dir / 'rules.yaml'}\n"
        f"  state       {controller.store.path}\n"
        f"  metrics     http://127.0.0.1:{http_port}/metrics\n"
        f"  agent       node {agent.identity.node}, config {agent_path}\n"
        f"  log         {state_dir / 'vetd.log'}\n"
        f"In another shell: vetd nodes --config {controller_path}\n"
        "Ctrl-C stops.\n\n"
    )
    out.flush()
    deadline = time.monotonic() + parse_duration(args.duration) if args.duration else None
    try:
        async with asyncio.TaskGroup() as group:
            controller_task = group.create_task(controller.run(signals=False), name="vetd.up.controller")
            agent_task = group.create_task(agent.run(signals=False), name="vetd.up.agent")
            shown = ""
            while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
                table = _table(controller.store.path)
                if table and table != shown:
                    out.write(time.strftime("%H:%M:%S ") + "nodes:\n" + table + "\n")
                    out.flush()
                    shown = table
            agent.stop.set()
            await agent_task
            controller.stop.set()
            await controller_task
    finally:
        await broker.shutdown()
    return 0


def _table(db: Path) -> str:
    try:
        store = Store(db, readonly=True)
    except FileNotFoundError:
        return ""
    try:
        summaries = node_summaries(store)
    finally:
        store.close()
    # "last seen" changes every second; show it only when something else changed.
    return format_nodes([{**s, "last_seen": time.time()} for s in summaries]) if summaries else ""


def up(args: argparse.Namespace) -> int:
    from vetd.core import logs

    state_dir = Path(args.state_dir)
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        lock = (state_dir / "vetd-up.lock").open("a+", encoding="utf-8")
    except OSError as exc:
        print(f"vetd up: cannot use {state_dir}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            print(f"vetd up: another `vetd up` (pid {lock.read().strip() or '?'}) is running in {state_dir}; "
                  "stop it or give --state-dir another folder", file=sys.stderr)
            return 2
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        # The terminal shows the node table; the log goes to a file beside the state.
        log_file = (state_dir / "vetd.log").open("a", encoding="utf-8")
        logs.setup(getattr(args, "log_level", "info"), json=True, stream=log_file)
        logging.getLogger("amqtt").setLevel(logging.ERROR)
        try:
            return asyncio.run(_up(args))
        except UpError as exc:
            print(f"vetd up: {exc}", file=sys.stderr)
            return 2
        finally:
            log_file.close()
