"""``example``: a vetd plugin to copy. It checks that a file was touched recently.

Hooks register; objects do the work: each hook below adds an object to the
registry it is given, and the agent runs the object's function in a worker
thread with a deadline (a check that raises becomes an ``error`` result, one
that hangs a ``timeout``). Everything a plugin needs is imported from
``vetd.agent.api``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

import msgspec

from vetd.agent.api import (
    AgentCommand,
    Answer,
    Check,
    CheckRegistry,
    CommandContext,
    CommandRegistry,
    Duration,
    Outcome,
    PluginConfigs,
    TelemetryRegistry,
    TelemetrySource,
    hookimpl,
)


class ExampleConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[plugins.example]``: every field has a default; a typo is an error naming file, line and key."""

    #: The file whose age is checked (e.g. a heartbeat a site's cron job touches).
    path: str = "/var/run/heartbeat"
    #: Older than this: warn; missing: fail.
    max_age: Duration = Duration(600.0)
    #: Bounds are part of the type: vetd rejects ``timeout = -1`` naming file, line and key.
    timeout: Annotated[float, msgspec.Meta(gt=0.0)] = 5.0


def check_heartbeat(config: ExampleConfig) -> Outcome:
    path = Path(config.path)
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return Outcome(status="fail", codes=["heartbeat_missing"], message=f"{path} does not exist")
    status = "warn" if age > float(config.max_age) else "pass"
    return Outcome(status=status, codes=["heartbeat_old"] if status == "warn" else [],
                   metrics={"heartbeat_age_s": age}, message=f"{path} touched {age:.0f} s ago")


async def touch(args: Mapping[str, str], context: CommandContext) -> Answer:
    """A command the controller may send once ``[commands] allow`` lists ``touch_heartbeat``."""
    return await context.run(["touch", args.get("path", "/var/run/heartbeat")])


@hookimpl
def vetd_config_tables() -> Mapping[str, type[msgspec.Struct]]:
    return {"example": ExampleConfig}


@hookimpl
def vetd_register_checks(registry: CheckRegistry, configs: PluginConfigs) -> None:
    config = configs.typed("example", ExampleConfig)
    registry.add(Check("example_heartbeat", lambda: check_heartbeat(config), timeout=config.timeout,
                       profiles=frozenset({"prolog", "periodic"}), description="a heartbeat file is fresh"))


@hookimpl
def vetd_register_telemetry(registry: TelemetryRegistry, configs: PluginConfigs) -> None:
    config = configs.typed("example", ExampleConfig)
    registry.add(TelemetrySource("example", lambda: {"node": {"heartbeat_age_s": _age(config.path)}}))


@hookimpl
def vetd_register_commands(registry: CommandRegistry) -> None:
    registry.add(AgentCommand("touch_heartbeat", touch, description="touch the heartbeat file"))


def _age(path: str) -> float:
    try:
        return time.time() - Path(path).stat().st_mtime
    except OSError:
        return -1.0
