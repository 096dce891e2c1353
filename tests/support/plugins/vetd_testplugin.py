"""A plugin for scheduler tests: checks that pass, raise and hang, and a command that blocks the loop.

Not a hardware stand-in: it exercises how the agent treats any misbehaving
plugin. Loaded with ``[agent] load_plugins = ["vetd_testplugin"]``.
"""

from __future__ import annotations

import threading
import time

import msgspec

from vetd.agent.api import hookimpl
from vetd.agent.checks import Check, Outcome
from vetd.agent.commands import AgentCommand, Answer
from vetd.core.configfile import Duration

_never = threading.Event()


class TestPluginConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    interval: Duration = Duration(0.2)
    hang_timeout: Duration = Duration(0.3)
    #: Register only these checks (default: all three).
    only: list[str] = []


def _raise() -> Outcome:
    raise RuntimeError("sensor exploded")


def _hang() -> Outcome:
    _never.wait()
    return Outcome(status="pass")


@hookimpl
def vetd_config_tables():
    return {"testplugin": TestPluginConfig}


@hookimpl
def vetd_register_checks(registry, configs):
    config = configs.typed("testplugin", TestPluginConfig)
    interval = float(config.interval)
    checks = [
        Check("steady", lambda: Outcome(status="pass", metrics={"x": 1}), interval=interval),
        Check("raises", _raise, interval=interval),
        Check("hangs", _hang, interval=interval, timeout=float(config.hang_timeout)),
    ]
    for check in checks:
        if not config.only or check.name in config.only:
            registry.add(check)


async def _block_loop(args, _context):
    """What a plugin must not do: blocking work on the event loop (commands run there). A stuck
    loop is what systemd's watchdog is for; ``[commands] allow = ["block_loop"]`` to use it."""
    seconds = float(args.get("seconds", "2"))
    time.sleep(seconds)
    return Answer(True, f"blocked the loop {seconds:g}s", {})


@hookimpl
def vetd_register_commands(registry):
    registry.add(AgentCommand("block_loop", _block_loop, description="block the event loop (tests only)"))
