"""Agent configuration (``/etc/vetd/agent.toml``).

Environment overrides, applied after the file: ``VETD_BROKER``
(``mqtt://host:port``), ``VETD_CLUSTER``, ``VETD_NODE``, ``VETD_STATE_DIR``, ``VETD_CONTROL_SOCKET`` and
``VETD_ALLOW_UNSIGNED_COMMANDS=1`` (tests, demos). The node name defaults
to the short host name, which is what Slurm calls the node on most sites.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec

from vetd.core.configfile import ConfigError, Duration, convert, read_toml, where
from vetd.core.mqtt import BrokerAddress, BrokerAuth, parse_broker
from vetd.core.protocol import valid_name

if TYPE_CHECKING:
    from vetd.agent.checks import Check


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
    #: A result or event leaves the spool only when the controller acknowledges it (on
    #: ``vetd/v1/<cluster>/ack/<node>``). When the oldest one sent has had no ack for this long, what
    #: is unacknowledged is sent again, oldest first, then with back-off up to 10 minutes while acks
    #: stay away (1s to 1h; shorter resends more duplicates while a controller works through a backlog).
    ack_timeout: Duration = Duration(30.0)
    #: Broker credentials and TLS (``[agent.auth]``).
    auth: BrokerAuth = msgspec.field(default_factory=BrokerAuth)
    #: Messages per second at most, so catching up after an outage stays below
    #: the controller's per-node limit (``[limits] per_node_rate``).
    max_publish_rate: Annotated[float, msgspec.Meta(gt=0.0)] = 1000.0
    #: The local control socket (a Unix socket for `vetd-oci-hook`, prologs and other local tools:
    #: service state, latest verdicts, run checks now, job start and end). Empty: no socket.
    control_socket: str = "/run/vetd/agent.sock"
    #: A group whose members may use the control socket too (mode 0660); empty: root only (0600).
    control_socket_group: str = ""
    #: Clients served at once; more wait for the kernel's backlog.
    control_max_clients: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 64


class CommandsSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[commands]``: what the controller may ask this node to do.

    Anything not in ``allow`` is refused (and logged). Commands run as argv
    lists, never through a shell; ``{gpu}`` and ``{service}`` are filled in.
    """

    #: Actions allowed: ``ping``, ``revet`` (re-vetting of a drained node), ``diagnose`` (a profile run
    #: on a node in service, asked by a rule; GPUs with compute processes are left alone); add
    #: ``gpu_reset`` and ``restart_service`` to let vetd heal, and ``vet`` to take part in the
    #: controller's campaigns (bandwidth to the peers it names, on an idle node; never during a job).
    allow: list[str] = msgspec.field(default_factory=lambda: ["ping", "revet", "diagnose"])
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


#: An annotation value's parameter, filled into a requirement (``{variant}``): a plain word, so that
#: a container's annotation cannot point a path outside the folder the site wrote.
PARAM_PATTERN = r"\A[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}\Z"
_Param = Annotated[str, msgspec.Meta(pattern=PARAM_PATTERN)]
_Patterns = Annotated[list[Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]], msgspec.Meta(max_length=64)]


class Requirement(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """What a container annotation needs from the node (``[hooks.annotations."NAME"]``).

    It applies when the container's annotation NAME is ``true`` (``1``, ``yes``, ``on``). ``{param}`` in
    any value is replaced by the annotation next to it (``com.hooks.X.param`` beside ``com.hooks.X.enabled``),
    else by ``params``' default. Every item must hold, within the hook's deadline.
    """

    #: What it is, for the message a refused container gets.
    description: str = ""
    #: Defaults of the ``{param}`` placeholders; an annotation beside NAME overrides each.
    params: dict[str, _Param] = {}
    #: Paths or globs that must each match something (``/dev/cxi*``).
    paths: _Patterns = []
    #: Shared libraries that must load (dlopen in a child process): a path or a name the loader finds.
    libraries: _Patterns = []
    #: Programs (argv, no shell) that must exit 0, e.g. ``["fi_info", "-p", "cxi"]``.
    commands: Annotated[list[_Patterns], msgspec.Meta(max_length=16)] = []
    #: ``host:port`` endpoints that must accept a TCP connection.
    tcp: _Patterns = []
    #: TCP ports that must be free (nothing listening on them).
    ports_free: _Patterns = []
    #: Environment variables of the agent that must be set (``""``) or equal a value.
    env: dict[str, str] = {}


def default_requirements() -> dict[str, Requirement]:
    """The hooks CSCS's container engine switches on by annotation; a site overrides or adds tables."""
    return {
        "com.hooks.aws_ofi_nccl.enabled": Requirement(
            description="the AWS OFI NCCL network plugin",
            params={"variant": "cuda12", "provider": "cxi"},
            paths=["/opt/cscs/aws-ofi-nccl/{variant}/lib/libnccl-net.so"],
            libraries=["/opt/cscs/aws-ofi-nccl/{variant}/lib/libnccl-net.so"],
            commands=[["fi_info", "-p", "{provider}"]],
        ),
        "com.hooks.cxi.enabled": Requirement(
            description="the Slingshot CXI devices and libfabric's cxi provider",
            paths=["/dev/cxi*"],
            commands=[["fi_info", "-p", "cxi"]],
        ),
        "com.hooks.dcgm.enabled": Requirement(
            description="the DCGM host engine",
            tcp=["127.0.0.1:5555"],
        ),
        "com.hooks.ssh.enabled": Requirement(
            description="a free port for the container's SSH server",
            params={"port": "15263"},
            ports_free=["{port}"],
        ),
    }


class HooksSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[hooks]``: what `vetd-oci-hook` asks before a container starts on this node.

    A container is refused when the node is unfit (a check's latest verdict failed, errored or timed
    out) or when a requirement its annotations switch on does not hold. vetd's own failure (no agent,
    no socket, the deadline passed) never refuses a container.
    """

    #: The hook's whole deadline, its own start-up included; past it the container starts (0.1s to 60s).
    deadline: Duration = Duration(5.0)
    #: Refuse containers while a check's latest verdict is fail, error or timeout.
    refuse_when_unfit: bool = True
    #: Checks whose failing verdict does not make the node unfit for containers.
    ignore_checks: list[str] = []
    #: Requirements by annotation name; these replace the defaults of the same name, others are kept.
    annotations: dict[str, Requirement] = {}

    def requirements(self) -> dict[str, Requirement]:
        """The shipped defaults with this config's tables over them."""
        return {**default_requirements(), **self.annotations}


class SlurmSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[slurm]``: `vetd slurm prolog` and `vetd slurm epilog` (slurm.conf ``Prolog=`` / ``Epilog=``).

    A node fault (a check ``fail``, a critical event on the job's GPUs, the controller's exclusion)
    makes them exit 1 with a ``vetd:`` drain reason: Slurm drains the node (and requeues the job).
    vetd's own failure (no agent, the deadline passed, a check that errored or timed out) never does:
    the job runs, and why is logged.
    """

    #: The prolog's whole deadline, its start-up included; keep it below slurm.conf's
    #: PrologEpilogTimeout. Past it the job runs (0.5s to 1h).
    prolog_deadline: Duration = Duration(30.0)
    #: The epilog's whole deadline, as the prolog's (0.5s to 1h).
    epilog_deadline: Duration = Duration(30.0)
    #: The profile the prolog runs (`vetd check --list` shows each check's).
    prolog_profile: str = "prolog"
    #: The profile the epilog runs ([profiles] epilog below: stray processes, GPU memory not freed, a GPU
    #: that needs a reset).
    epilog_profile: str = "epilog"
    #: On a node fault, set the node's drain reason (`vetd: prolog nid001: …`) with `scontrol update`
    #: before failing, so Slurm shows why and the controller may resume the node (it only resumes
    #: drains whose reason starts with `vetd:`); false: Slurm's own reason ("Prolog error").
    set_reason: bool = True
    #: The scontrol program (a path, or a name looked up in PATH, /usr/bin and /usr/sbin).
    scontrol: str = "scontrol"
    #: A critical event (an XID NVIDIA's catalog says needs a reset or reboot) on the node or on one of
    #: the job's GPUs while the job ran fails the epilog.
    epilog_fails_on_critical_events: bool = True


def default_profiles() -> dict[str, list[str]]:
    """Profiles made of named checks, besides those plugins tag their checks with."""
    return {"epilog": ["gpu_idle", "gpu_health"]}


class AgentConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    agent: AgentSection = msgspec.field(default_factory=AgentSection)
    commands: CommandsSection = msgspec.field(default_factory=CommandsSection)
    hooks: HooksSection = msgspec.field(default_factory=HooksSection)
    slurm: SlurmSection = msgspec.field(default_factory=SlurmSection)
    #: ``[profiles]``: profile name → checks it runs besides those their plugins put in it;
    #: these replace the defaults of the same name (:func:`default_profiles`), others are kept.
    profiles: dict[str, list[str]] = {}
    #: ``[plugins.NAME]`` tables, decoded by the plugin that owns them.
    plugins: dict[str, dict[str, Any]] = {}
    checks: dict[str, CheckOverride] = {}
    #: Where this config came from (for error messages), not a TOML key.
    source: str = "<defaults>"
    source_text: str = ""

    @property
    def broker(self) -> BrokerAddress:
        return parse_broker(self.agent.broker)

    def profile_checks(self, profile: str, checks: Iterable[Check]) -> list[Check]:
        """The enabled checks of ``profile``: those their plugin put in it and those ``[profiles]`` names."""
        named = {**default_profiles(), **self.profiles}.get(profile, [])
        return [check for check in checks
                if (profile in check.profiles or check.name in named)
                and ((override := self.checks.get(check.name)) is None or override.enabled)]

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
        "control_socket": env.get("VETD_CONTROL_SOCKET"),
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
    if not 0.1 <= config.hooks.deadline <= 60:
        raise ConfigError(f"{where(source, text, 'hooks.deadline')}: must be between 100ms and 60s")
    for key in ("prolog_deadline", "epilog_deadline"):
        if not 0.5 <= getattr(config.slurm, key) <= 3600:
            raise ConfigError(f"{where(source, text, f'slurm.{key}')}: must be between 500ms and 1h")
    if not 1 <= section.ack_timeout <= 3600:
        raise ConfigError(f"{where(source, text, 'agent.ack_timeout')}: must be between 1s and 1h, "
                          f"got {section.ack_timeout:g}s")
    if section.interval <= 0 or section.telemetry_interval <= 0:
        raise ConfigError(f"{source}: agent.interval: intervals must be > 0")
    return msgspec.structs.replace(config, agent=section, source=source, source_text=text)
