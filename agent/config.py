"""Agent configuration (``/etc/vetd/agent.toml``).

Environment overrides, applied after the file: ``VETD_BROKER``
(``mqtt://host:port``), ``VETD_CLUSTER``, ``VETD_NODE``, ``VETD_STATE_DIR`` and
``VETD_ALLOW_UNSIGNED_COMMANDS=1`` (tests, demos). The node name defaults
to the short host name, which is what Slurm calls the node on most sites.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from vetd.core.configfile import ConfigError, Duration, convert, read_toml
from vetd.core.mqtt import BrokerAddress, BrokerAuth, parse_broker
from vetd.core.protocol import valid_name


class CheckOverride(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[checks.NAME]``: an operator's override of a check's schedule."""

    enabled: bool = True
    interval: Duration | None = None
    timeout: Duration | None = None


class AgentSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: The cluster's name in MQTT topics (``vetd/v1/CLUSTER/...``), e.g. ``alps``.
    cluster: str = "default"
    #: Empty: the short host name.
    node: str = ""
    #: The MQTT broker: ``mqtts://`` (TLS, port 8883, as packaging/mosquitto/vetd.conf listens) or
    #: ``mqtt://`` (plain, 1883). Credentials may be given as ``mqtts://user:password@host``, but
    #: ``[agent.auth] password_file`` keeps them out of a config that gets shared.
    broker: str = "mqtts://vetd-broker:8883"
    #: Default interval of periodic checks; a check may set its own.
    interval: Duration = Duration(60.0)
    #: How often telemetry sources are sampled.
    telemetry_interval: Duration = Duration(10.0)
    #: Share of an interval each run is shifted by at random, so nodes do not run in step.
    jitter: Annotated[float, msgspec.Meta(ge=0.0, le=0.5)] = 0.1
    #: How long in-flight checks may finish after SIGTERM.
    shutdown_grace: Duration = Duration(5.0)
    #: Plugins not to load, by name (``host``, or a third party's name).
    disable_plugins: list[str] = []
    #: Extra plugin modules to import and register, by dotted module name.
    load_plugins: list[str] = []
    #: Static labels sent in the birth message, e.g. ``{ partition = "normal", rack = "r12" }``.
    labels: dict[str, str] = {}
    #: Where the spool lives (env VETD_STATE_DIR overrides); the file is
    #: ``spool-<cluster>-<node>.db``. Empty: memory only (lost if the agent dies).
    state_dir: str = "/var/lib/vetd"
    #: Results and events held while the broker is unreachable (10/s for 3 h).
    spool_limit: Annotated[int, msgspec.Meta(ge=1)] = 100_000
    #: Results and events held in memory while the spool file cannot be written (a full disk);
    #: beyond it periodic results go first, critical events never.
    spool_memory_limit: Annotated[int, msgspec.Meta(ge=1)] = 10_000
    #: ``normal`` survives an agent crash; ``full`` also a power loss (fsync per message).
    spool_sync: Literal["normal", "full"] = "normal"
    #: Seconds between MQTT keepalives: a stalled broker is noticed within 1.5×.
    keepalive: Annotated[int, msgspec.Meta(ge=1)] = 30
    #: Broker credentials and TLS (``[agent.auth]``).
    auth: BrokerAuth = msgspec.field(default_factory=BrokerAuth)
    #: Messages per second at most, so catching up after an outage stays below
    #: the controller's per-node limit (``[limits] per_node_rate``).
    max_publish_rate: Annotated[float, msgspec.Meta(gt=0.0)] = 1000.0


class CommandsSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[commands]``: what the controller may ask this node to do.

    Anything not in ``allow`` is refused (and logged). Commands run as argv
    lists, never through a shell; ``{gpu}`` and ``{service}`` are filled in.
    """

    #: Actions allowed: ``ping``, ``revet``; add ``gpu_reset`` and ``restart_service`` to let vetd heal.
    allow: list[str] = msgspec.field(default_factory=lambda: ["ping", "revet"])
    #: Services ``restart_service`` may restart.
    services: list[str] = []
    #: The command a ``gpu_reset`` of one GPU runs.
    gpu_reset: list[str] = msgspec.field(default_factory=lambda: ["nvidia-smi", "-r", "-i", "{gpu}"])
    #: The command a ``gpu_reset`` of every GPU runs.
    gpu_reset_all: list[str] = msgspec.field(default_factory=lambda: ["nvidia-smi", "-r"])
    #: The command ``restart_service`` runs.
    restart_service: list[str] = msgspec.field(default_factory=lambda: ["systemctl", "restart", "{service}"])
    #: Deadline of a command; beyond it the command is killed and reported failed.
    timeout: Duration = Duration(300.0)
    #: This node's command key (mode 0600), derived from the controller's master key:
    #: ``vetd keys derive --cluster C --node N --master FILE --out FILE`` on the controller host.
    #: Only commands signed with it, unexpired and not seen before, run. Required unless allow_unsigned.
    key_file: str = ""
    #: Run commands without a signature (tests and `vetd up` demos only; env VETD_ALLOW_UNSIGNED_COMMANDS=1).
    #: Without it and without key_file the agent does not start.
    allow_unsigned: bool = False


class AgentConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    agent: AgentSection = msgspec.field(default_factory=AgentSection)
    commands: CommandsSection = msgspec.field(default_factory=CommandsSection)
    #: ``[plugins.NAME]`` tables, decoded by the plugin that owns them.
    plugins: dict[str, dict[str, Any]] = {}
    checks: dict[str, CheckOverride] = {}
    #: Where this config came from (for error messages), not a TOML key.
    source: str = "<defaults>"
    source_text: str = ""

    @property
    def broker(self) -> BrokerAddress:
        return parse_broker(self.agent.broker)

    @property
    def spool_path(self) -> Path | None:
        if not self.agent.state_dir:
            return None
        return Path(self.agent.state_dir) / f"spool-{self.agent.cluster}-{self.agent.node}.db"


def short_hostname() -> str:
    return socket.gethostname().split(".")[0]


def load_agent_config(path: Path | str | None, environ: dict[str, str] | None = None) -> AgentConfig:
    """Load and validate the agent config, then apply environment overrides."""
    env = os.environ if environ is None else environ
    if path is None:
        data: dict[str, Any] = {}
        text, source = "", "<defaults>"
    else:
        data, text = read_toml(Path(path))
        source = str(path)
    data.pop("source", None)
    data.pop("source_text", None)
    config = convert(data, AgentConfig, path=source, text=text)
    section = config.agent
    overrides = {
        "broker": env.get("VETD_BROKER"),
        "cluster": env.get("VETD_CLUSTER"),
        "node": env.get("VETD_NODE"),
        "state_dir": env.get("VETD_STATE_DIR"),
    }
    section = msgspec.structs.replace(section, **{k: v for k, v in overrides.items() if v})
    if not section.node:
        section = msgspec.structs.replace(section, node=short_hostname())
    if env.get("VETD_ALLOW_UNSIGNED_COMMANDS") == "1":
        config = msgspec.structs.replace(config, commands=msgspec.structs.replace(config.commands,
                                                                                  allow_unsigned=True))
    for key in ("cluster", "node"):
        value = getattr(section, key)
        if not valid_name(value):
            raise ConfigError(
                f"{source}: agent.{key}: {value!r} is not a valid name "
                "(letters, digits, '_', '.', '-'; at most 64)"
            )
    try:
        parse_broker(section.broker)
    except ValueError as exc:
        raise ConfigError(f"{source}: agent.broker: {exc}") from exc
    if section.auth.password_file and not section.auth.username and not parse_broker(section.broker).username:
        # the shipped ACL knows a node by its username: the node name
        section = msgspec.structs.replace(section, auth=msgspec.structs.replace(section.auth, username=section.node))
    if not 0 <= section.jitter <= 0.5:
        raise ConfigError(f"{source}: agent.jitter: must be between 0 and 0.5")
    if section.interval <= 0 or section.telemetry_interval <= 0:
        raise ConfigError(f"{source}: agent.interval: intervals must be > 0")
    return msgspec.structs.replace(config, agent=section, source=source, source_text=text)
